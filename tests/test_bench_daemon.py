"""`rwkv-music bench daemon --phrase`: the daemon answers a piano phrase
played again and again, through the session's JACK server, with `rwkv-music watch` subscribed,
and the figures come back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_daemon_answers_a_played_piano_phrase(jack_server):
    command = [sys.executable, "-m", "tools", "bench", "daemon", "--random", "L2-D64", "--phrase",
               str(ROOT / "examples" / "satie-gymnopedie-1.mid"), "--phrase-bars", "1", "--length", "1",
               "--bars", "12", "--tempo", "200", "--watcher", "on", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "JACK_DEFAULT_SERVER": jack_server.name})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "answering satie-gymnopedie-1.mid (1 bars, 3/4)" and report["watcher"] is True
    # 12 bars hold two phrase-and-answer cycles of 1 + 1 + 2 bars (the first a bar in); each
    # phrase gets an answer.
    assert report["answers"] >= 2 and report["messages"] > 0, result.stderr[-3000:]
    # Timing figures are the benchmark's to report, not this test's to judge (a loaded machine).
    for key in ("error_p50_ms", "error_p99_ms", "first_notes_late"):
        assert report[key] >= 0
    assert isinstance(report["ready_before_bar_p50_ms"], float)
