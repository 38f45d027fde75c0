"""`python -m daemon ...` is `rwkv-music daemon ...`."""

import sys

from tools.cli import main

sys.exit(main(["daemon", *sys.argv[1:]]))
