# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# torch==2.13.0 is installed before the project so pip takes the local CPU build instead of
# pulling the registry's newest build with gigabytes of CUDA wheels.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Debian packages the tests talk to: JACK (virtual MIDI ports), mosquitto (MQTT), liblo (oscsend),
# a C compiler for the CPU step kernel (built on first use), and tmux (the test of `rwkv-music watch`).
DEB_PKGS := jackd2 mosquitto mosquitto-clients liblo-tools gcc tmux
DEB_CMDS := jackd mosquitto mosquitto_sub oscsend cc tmux
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint bench system-packages clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, miditok, rwkv, safetensors" 
	@touch $@

system-packages:
	@missing=""; for c in $(DEB_CMDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEB_PKGS) >/dev/null; \
	fi

test: $(STAMP) system-packages
	$(PY) -m pytest

# Extra daemon arguments, e.g. make run ARGS="--set clock.tempo=96"
ARGS ?=
# With no MIDI backend (no ALSA sequencer, no JACK server) the daemon starts a private JACK
# server and prints how to connect to it.
run: $(STAMP) system-packages
	$(VENV)/bin/rwkv-music daemon --private-jack auto $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(VENV)/bin/rwkv-music bench step

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
