"""Shared pytest fixtures. Real components (JACK, mosquitto, corpus MIDI files) are started or
built by the fixture modules under tests/fixtures/, each owned by the part it serves."""

import faulthandler
import importlib.util
import os
import sys

import pytest

# Fixture modules are added here as they appear; a missing one is simply not loaded.
_FIXTURE_MODULES = [
    "tests.fixtures.corpus",
    "tests.fixtures.jack",
    "tests.fixtures.mosquitto",
]

pytest_plugins = [m for m in _FIXTURE_MODULES if importlib.util.find_spec(m) is not None]


# A test blocked inside C (libjack closing a client, with python-rtmidi holding the interpreter
# lock) is out of pytest-timeout's reach: its signal handler never runs. faulthandler's watchdog
# is a C thread: past this limit it prints every thread's traceback and ends the run, so CI
# fails with a reason instead of hanging until its own limit.
HARD_TIMEOUT_S = 660  # above pytest-timeout's 600 s, which fires first when it can


def _real_stderr(config: pytest.Config):
    """A file on stderr as it was before pytest captured it, where a dying run can still be
    read (pytest keeps that descriptor in its capture manager; else the current stderr)."""
    capture = getattr(config.pluginmanager.getplugin("capturemanager"), "_global_capturing", None)
    saved_fd = getattr(getattr(capture, "err", None), "targetfd_save", None)
    try:
        return os.fdopen(os.dup(saved_fd if isinstance(saved_fd, int) else 2), "w")
    except OSError:
        return sys.__stderr__


_WATCHDOG_OUTPUT = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _WATCHDOG_OUTPUT
    if _WATCHDOG_OUTPUT is None:
        _WATCHDOG_OUTPUT = _real_stderr(item.config)
    faulthandler.dump_traceback_later(HARD_TIMEOUT_S, exit=True, file=_WATCHDOG_OUTPUT)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
