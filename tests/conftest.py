"""Shared pytest fixtures. Real components (JACK, mosquitto, corpus MIDI files) are started or
built by the fixture modules under tests/fixtures/, each owned by the part it serves."""

import importlib.util

# Fixture modules are added here as they appear; a missing one is simply not loaded.
_FIXTURE_MODULES = [
    "tests.fixtures.corpus",
    "tests.fixtures.jack",
    "tests.fixtures.mosquitto",
]

pytest_plugins = [m for m in _FIXTURE_MODULES if importlib.util.find_spec(m) is not None]
