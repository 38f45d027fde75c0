"""`rwkv-music bench soak`, the short variant CI runs: 24 s of autopilot at 300 BPM with
a peer playing phrases into the daemon, through the test JACK server. The 30-minute run and its
figures are in docs/reliability.md."""

from __future__ import annotations

import json

from tools.cli import main as cli_main


def test_bench_soak_short_run_reports_windows_with_flat_memory(jack_server, capsys):
    argv = ["bench", "soak", "--minutes", "0.4", "--window-minutes", "0.08", "--warmup-minutes", "0.1",
            "--random", "L1-D64", "--phrase-every", "6", "--json"]
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    windows = result["windows"]
    assert len(windows) == 5
    assert all(w["messages"] > 0 and w["answers"] > 0 for w in windows), windows
    assert all(w["status_requests"] >= 5 and w["status_unanswered"] == 0 for w in windows), windows
    assert result["answers"] >= 10 and result["phrases_played"] >= 2 and result["takeovers"] >= 1
    assert result["failed"] == 0
    # Memory after the warm-up: every queue and history is bounded.
    assert result["memory_ok"] and result["rss_growth_pct"] < 5.0, result
    assert result["rss_end_mib"] > 100  # it measured the daemon, torch and all


def test_bench_soak_rejects_bad_arguments(capsys):
    assert cli_main(["bench", "soak", "--minutes", "1", "--warmup-minutes", "2"]) == 2
    assert "--warmup-minutes" in capsys.readouterr().err
