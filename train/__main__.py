"""`python -m train ...` is `rwkv-music train ...` (torchrun runs it this way)."""

import argparse
import logging
import sys

from train.cli import add_arguments, run_train

parser = argparse.ArgumentParser(prog="python -m train", description="Train an RWKV-7 model.")
add_arguments(parser)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
sys.exit(run_train(parser.parse_args()))
