# Two entry points for people: `make test` and (with the pipelines issue) `make demo`.
# Both create .venv at the repo root from the lock when it is missing and reuse it when present.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp
# The consumer install (`pip install dpmedtf`, no extras, no TensorFlow), which the tests drive as a
# user would: tests/release/test_consumer_install.py verifies and predicts with it.
CONSUMER_VENV := .venv-consumer
CONSUMER_DEPS_STAMP := $(CONSUMER_VENV)/.dependencies-stamp
CONSUMER_STAMP := $(CONSUMER_VENV)/.installed-stamp
# What a wheel of dpmedtf ships: the package, plus release/ and pipelines/ as package data.
PACKAGE_FILES := $(shell find dpmedtf release pipelines -type f ! -path '*/__pycache__/*' ! -name '*.pyc')
CHECK_PYTHON = @$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "dpmedtf needs Python 3.11, found " + sys.version.split()[0] + " at $(PYTHON); set PYTHON=/path/to/python3.11")'
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: test test-slow demo bench lock consumer-venv clean-venv node-example

# Re-installs only when the lock or the package metadata changed since the last install.
$(STAMP): pyproject.toml constraints.txt
	$(CHECK_PYTHON)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[train,test]"
	@touch $(STAMP)

# A fresh venv whenever the dependencies or the lock change, so a package that left the base install
# cannot linger in it; a change to the package alone only reinstalls dpmedtf (a regular install, not
# editable: the consumer gets the wheel's files, package data included).
$(CONSUMER_DEPS_STAMP): pyproject.toml constraints.txt
	$(CHECK_PYTHON)
	rm -rf $(CONSUMER_VENV) && $(PYTHON) -m venv $(CONSUMER_VENV)
	$(CONSUMER_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(CONSUMER_VENV)/bin/python -m pip install --quiet -c constraints.txt .
	@touch $(CONSUMER_DEPS_STAMP)

$(CONSUMER_STAMP): $(CONSUMER_DEPS_STAMP) $(PACKAGE_FILES)
	$(CONSUMER_VENV)/bin/python -m pip install --quiet --no-deps --force-reinstall -c constraints.txt .
	@touch $(CONSUMER_STAMP)

consumer-venv: $(CONSUMER_STAMP)

# pytest-xdist on both cores; loadfile keeps a file's tests (and its session fixtures) in one worker.
test: $(STAMP) $(CONSUMER_STAMP)
	DPMEDTF_CONSUMER_PYTHON=$(CURDIR)/$(CONSUMER_VENV)/bin/python \
	  $(VENV)/bin/python -m pytest -n 2 --dist loadfile -m "not slow" --durations=15 tests

# Heavier checks kept out of `make test` (the vectorized engine under MirroredStrategy): run before a release.
test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow --durations=15 tests

# The whole product on the embedded SYNTHETIC cohort; re-running resumes or skips finished stages.
demo: $(STAMP)
	$(VENV)/bin/dpmedtf demo --out runs/demo

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/calibration.py --paper-grid
	$(VENV)/bin/python benchmarks/secure_rng.py
	$(VENV)/bin/python benchmarks/data_pipeline.py
	$(VENV)/bin/python benchmarks/bootstrap.py
	$(VENV)/bin/python benchmarks/dp_engines.py --large 128:224
	$(VENV)/bin/python benchmarks/keras_api.py
	$(VENV)/bin/python benchmarks/keras_api.py --large --repeats 3 --steps 15 --warmup 3
	$(VENV)/bin/python benchmarks/distributed.py
	$(VENV)/bin/python benchmarks/synthetic_utility.py
	$(VENV)/bin/python benchmarks/mia_audit.py
	$(VENV)/bin/python benchmarks/canary_audit.py

# A non-Python consumer: onnxruntime for Node.js reproduces `dpmedtf predict` on the same input.
BUNDLE ?= runs/demo/bundle
node-example: $(STAMP)
	bash examples/node/check.sh $(BUNDLE)

# Deliberate re-resolution of the stack: a fresh venv from pyproject.toml, frozen into constraints.txt.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade "pip>=24"
	.venv-lock/bin/python -m pip install --quiet -e ".[train,test]"
	{ echo "# Lock for dpmedtf: every install (make test, make demo, Docker) resolves to exactly these versions."; \
	  echo "# Regenerate only deliberately: make lock (re-resolves from pyproject.toml and rewrites this file)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i '^dpmedtf'; } > constraints.txt
	rm -rf .venv-lock

clean-venv:
	rm -rf $(VENV) $(CONSUMER_VENV)

# The input path at hospital scale (not in `make bench`: ~30–40 min and ~16 GB of disk at the default 20,000 images).
.PHONY: bench-scale
bench-scale: $(STAMP)
	$(VENV)/bin/python benchmarks/scale.py
