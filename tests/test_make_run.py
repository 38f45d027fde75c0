"""`make run` on a machine with no MIDI backend, and the private JACK server it relies on.

`make run` starts `rwkv-music daemon --private-jack auto $(ARGS)`: with no ALSA sequencer and no
JACK server for the process (JACK_DEFAULT_SERVER names one that does not exist), the daemon
starts a private JACK dummy server, says how to connect to it, opens its ports there, and on
Ctrl-C (SIGINT to the foreground process group, as a terminal sends it) stops cleanly, server
included.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.errors import DaemonError
from daemon.jack_server import (
    JackdNotFoundError,
    JackServerError,
    PrivateJackServer,
    private_jack_wanted,
)
from tests.fixtures.jack import jack_server_runs
from tools.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
MAKE_RUN_TIMEOUT_S = 90.0
ALSA_SEQUENCER = "/dev/snd/seq"
# The programs the Makefile's system-packages target checks for (it installs them when missing).
MAKE_SYSTEM_COMMANDS = ("jackd", "mosquitto", "mosquitto_sub", "oscsend", "cc", "make")
DAEMON_PORTS = ("RWKV-Music in:RWKV-Music in", "RWKV-Music out:RWKV-Music out")


def jack_ports(server: str) -> list[str]:
    """Port names on a JACK server, from jack_lsp (an independent client)."""
    result = subprocess.run(["jack_lsp", "-s", server], capture_output=True, text=True, timeout=10)
    return [line for line in result.stdout.splitlines() if line and not line.startswith(" ")]


def wait_for_log(log: Path, pattern: str, process: subprocess.Popen, deadline: float) -> re.Match:
    while True:
        text = log.read_text(errors="replace")
        found = re.search(pattern, text)
        if found:
            return found
        assert process.poll() is None, f"make run exited with {process.returncode}:\n{text}"
        assert time.monotonic() < deadline, f"no {pattern!r} in time:\n{text}"
        time.sleep(0.1)


@pytest.mark.skipif(
    not all(shutil.which(c) for c in MAKE_SYSTEM_COMMANDS), reason="make run would install system packages first"
)
@pytest.mark.skipif(os.path.exists(ALSA_SEQUENCER), reason="ALSA is usable here: no private JACK server")
@pytest.mark.skipif(not (ROOT / "checkpoints" / "default.safetensors").is_file(), reason="no default checkpoint")
def test_make_run_starts_a_private_jack_server_and_stops_on_ctrl_c(tmp_path, monkeypatch):
    missing = f"rwkv-no-such-server-{os.getpid()}"
    env = {**os.environ, "JACK_DEFAULT_SERVER": missing, "PYTHONUNBUFFERED": "1"}
    venv = Path(sys.prefix)
    # The venv running these tests is the one make would build: -o keeps make from rebuilding
    # (re-installing into) it when its stamp is missing or older than pyproject.toml.
    command = ["make", "-o", str(venv / ".installed"), "run", f"VENV={venv}", "ARGS=--set osc.port=0"]
    log = tmp_path / "make-run.log"
    deadline = time.monotonic() + MAKE_RUN_TIMEOUT_S
    with open(log, "w") as out:
        # A session of its own: SIGINT to its process group is a terminal's Ctrl-C.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        server = wait_for_log(log, r"private JACK server named '([^']+)'", process, deadline).group(1)
        ready = wait_for_log(log, r"ready: model .*", process, deadline).group(0)
        assert "MIDI jack" in ready
        assert "in virtual 'RWKV-Music in'" in ready and "out virtual 'RWKV-Music out'" in ready
        text = log.read_text()
        for port in DAEMON_PORTS:
            assert f"jack_connect -s {server} " in text and port in text
        assert jack_server_runs(server)
        ports = jack_ports(server)
        assert all(port in ports for port in DAEMON_PORTS), ports

        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = log.read_text(errors="replace")
    # make passes the daemon's status 0 on, or dies of the SIGINT it re-raises once its child is done.
    assert code in (0, -signal.SIGINT), text
    assert re.search(r"daemon\.app: stopped", text), text
    assert f"private JACK server {server!r} stopped" in text, text
    assert "Traceback" not in text and "Error" not in text, text
    assert not jack_server_runs(server)


# -- the private JACK server ------------------------------------------------------------------------

needs_jackd = pytest.mark.skipif(shutil.which("jackd") is None, reason="jackd is not installed")


PRIVATE_SERVER_SCRIPT = """
import os, subprocess, sys
from pathlib import Path
import pytest, rtmidi
from daemon.jack_server import JackServerError, PrivateJackServer, private_jack_wanted, usable_midi_api
from daemon.jack_watch import JackServerWatch
from daemon.midi_ports import jack_server_running

def jack_ports(server):
    result = subprocess.run(["jack_lsp", "-s", server], capture_output=True, text=True, timeout=10)
    return [line for line in result.stdout.splitlines() if line and not line.startswith(" ")]

log_dir = Path(sys.argv[1])
os.environ["JACK_DEFAULT_SERVER"] = "rwkv-before"
assert usable_midi_api("jack") is None
with PrivateJackServer(log_path=log_dir / "jackd.log") as server:
    assert os.environ["JACK_DEFAULT_SERVER"] == server.name and server.running
    assert usable_midi_api("jack") == "jack"
    assert not private_jack_wanted("auto", "jack")
    # A real client of this process sees the server, as does an independent tool.
    with JackServerWatch("probe-watch") as watch:  # each change settles (daemon.jack_watch)
        with watch.change():
            port = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name="probe-client")
        with watch.change():
            port.open_virtual_port("probe")
        try:
            assert "probe-client:probe" in jack_ports(server.name)
        finally:
            with watch.change():
                port.delete()
    # A second server of the same name is refused, not mistaken for this one.
    with pytest.raises(JackServerError, match="runs already"):
        PrivateJackServer(server.name, log_path=log_dir / "second.log").start()
    assert os.environ["JACK_DEFAULT_SERVER"] == server.name
assert os.environ["JACK_DEFAULT_SERVER"] == "rwkv-before"
assert not server.running
os.environ["JACK_DEFAULT_SERVER"] = server.name
assert not jack_server_running()
print("ok")
"""


@needs_jackd
def test_private_jack_server_runs_for_the_block_and_restores_the_environment(tmp_path):
    # In a process of its own: libjack keeps per-process state, and this process holds clients
    # of the session's JACK server (two servers in one process crashed libjack here).
    result = subprocess.run([sys.executable, "-c", PRIVATE_SERVER_SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    assert "jackdmp" in (tmp_path / "jackd.log").read_text()  # a log the caller named is kept


def test_private_jack_server_without_jackd_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no jackd on PATH
    monkeypatch.delenv("JACK_DEFAULT_SERVER", raising=False)
    with pytest.raises(JackdNotFoundError, match="jackd is not installed"):
        PrivateJackServer().start()
    assert "JACK_DEFAULT_SERVER" not in os.environ


def fake_jackd(folder: Path, script: str) -> None:
    """A `jackd` on PATH that does not serve: how a broken JACK install behaves (a real jackd
    cannot be made to fail at start on purpose; it accepts any dummy-driver setting)."""
    path = folder / "jackd"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def test_private_jack_server_reports_a_jackd_that_exits(monkeypatch, tmp_path):
    fake_jackd(tmp_path, 'echo "jackd: cannot open the dummy driver" >&2; exit 3')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("JACK_DEFAULT_SERVER", "rwkv-before")
    server = PrivateJackServer("rwkv-broken")
    with pytest.raises(JackServerError, match=r"exited with status 3: jackd: cannot open the dummy driver") as err:
        server.start()
    assert err.value.log_path == server.log_path and server.log_path.is_file()  # kept for the user
    assert os.environ["JACK_DEFAULT_SERVER"] == "rwkv-before"
    server.log_path.unlink()


def test_private_jack_server_gives_up_on_a_jackd_that_never_serves(monkeypatch, tmp_path):
    fake_jackd(tmp_path, "echo starting; exec sleep 60")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    server = PrivateJackServer("rwkv-silent", log_path=tmp_path / "silent.log", start_timeout_s=1.0)
    with pytest.raises(JackServerError, match=r"did not accept clients within 1 s: starting"):
        server.start()
    assert server.process is None  # the hung jackd was stopped


@needs_jackd
def test_daemon_private_jack_choices(jack_server, monkeypatch, capsys):
    # A server runs (the session's): auto leaves it to the daemon, always starts one anyway.
    assert not private_jack_wanted("auto", "auto")
    assert private_jack_wanted("always", "jack") and not private_jack_wanted("never", "jack")
    monkeypatch.setenv("JACK_DEFAULT_SERVER", f"rwkv-no-such-server-{os.getpid()}")
    assert private_jack_wanted("auto", "auto") == (not os.path.exists(ALSA_SEQUENCER))
    assert not private_jack_wanted("auto", "alsa")  # a JACK server would not help an ALSA daemon
    with pytest.raises(DaemonError, match="needs midi.api = auto or jack"):
        private_jack_wanted("always", "alsa")
    # The same mistake from the command line: one line, exit status 2, before anything starts.
    assert cli_main(["daemon", "--private-jack", "always", "--set", "midi.api=alsa"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs midi.api = auto or jack, not 'alsa'" in lines[0], lines
