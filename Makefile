# Two commands: `make demo` (setup + the main job) and `make test` (setup + the whole suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := espeak-ng libusb-1.0-0
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# Debian packages (speech synthesis for the audio demo, libusb for open3d) when run as root,
# then a virtual environment with the project and its test extras.
$(STAMP): pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "warning: missing Debian packages: $$missing (run 'sudo apt-get install $$missing')"; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup

demo: install
	$(PY) -m uniperc.demo

bench: install
	$(PY) -m uniperc.bench backbone --model unireplknet_a --batch 32 --size 128

clean:
	rm -rf $(VENV) .pytest_cache
