# Two commands: `make demo` (setup + the main job) and `make test` (setup + the whole suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts libusb-1.0-0
# MBROLA's English voices and SVOX Pico, more training speech for the audio demo, are in Debian's contrib and
# non-free components (MBROLA's voices are licensed for non-commercial use; Pico's language data ships without its
# sources). As root on Debian, install adds those two components in a sources file of their own.
APT_NONFREE  := mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 libttspico-utils
NONFREE_LIST := /etc/apt/sources.list.d/uniperc-contrib-non-free.sources
STAMP  := $(VENV)/.installed
LOCK   := requirements-lock.txt

.PHONY: install test demo bench results clean

install: $(STAMP)

# Debian packages (speech synthesis for the audio demo: espeak-ng, flite, MBROLA and Pico for training, festival and
# its English voices for the held-out-synthesiser test set; libusb for open3d) when run as root, then a
# virtual environment with the project and its test extras. On CPython 3.11 / x86_64 the pinned lock is
# installed first (no dependency resolution: about 2 minutes instead of 8); elsewhere pip resolves. The installed
# packages are then byte-compiled on every core at once (pip's own compile step runs on one): where
# PYTHONDONTWRITEBYTECODE is set, as on this project's machines, nothing else would ever write the .pyc files and
# every process would compile torch's Python source again (importing uniperc took 8.7 s instead of 4.9).
# compile_dir's result is not checked on purpose: some packages ship modules only newer Pythons parse (e.g.
# torch/testing/_internal/py312_intrinsics.py), which are never imported here.
$(STAMP): pyproject.toml $(LOCK)
	@missing=$$(for p in $(APT_PACKAGES) $(APT_NONFREE); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	nonfree=$$(for p in $(APT_NONFREE); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    if [ -n "$$nonfree" ] && grep -qs '^ID=debian' /etc/os-release \
	       && ! grep -rqsE '(^|[[:space:]])non-free([[:space:]]|$$)' /etc/apt/sources.list /etc/apt/sources.list.d; then \
	      echo "enabling Debian's contrib and non-free components in $(NONFREE_LIST) (for $(APT_NONFREE))"; \
	      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: contrib non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
	        "$$(. /etc/os-release && echo $$VERSION_CODENAME)" > $(NONFREE_LIST); \
	    fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "warning: missing Debian packages: $$missing (run 'sudo apt-get install $$missing'; $(APT_NONFREE) are in contrib/non-free)"; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	if $(PY) -c 'import platform, sys; sys.exit(not (platform.machine() == "x86_64" and sys.version_info[:2] == (3, 11)))'; then \
	  $(PY) -m pip install -q --no-compile --no-deps -r $(LOCK); fi
	$(PY) -m pip install -q --no-compile -e ".[test]"
	$(PY) -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

demo: install
	$(PY) -c "import uniperc.modalities as m, uniperc.train as t; c = t.compose(['audio']); \
	  print('audio demo set:', m.get('audio').ensure_demo(seed=c['seed'], **c['modalities']['audio']['demo']))"
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train.py --modality audio
	$(PY) -m uniperc.evaluate --checkpoint runs/audio --split test
	$(PY) -m uniperc.evaluate --checkpoint runs/audio --split test_festival

bench: install
	$(PY) -m uniperc.bench backbone --model unireplknet_a --batch 32 --size 128

# The results table (docs/results.md): every shipped recipe trained and scored beside its baselines. Not part of
# `make test` (it trains every recipe in full); RESULTS_ARGS adds options, e.g. RESULTS_ARGS="--joint --only audio".
RESULTS_ARGS ?=
results: install
	OMP_NUM_THREADS=1 $(PY) -m uniperc.bench recipes --runs runs/recipes --output docs/results.md $(RESULTS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
