# Two entry points for people: `make test` and (with the pipelines issue) `make demo`.
# Both create .venv at the repo root from the lock when it is missing and reuse it when present.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: test test-slow demo bench lock clean-venv node-example

# Re-installs only when the lock or the package metadata changed since the last install.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "dpmedtf needs Python 3.11, found " + sys.version.split()[0] + " at $(PYTHON); set PYTHON=/path/to/python3.11")'
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" --durations=15 tests

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
	.venv-lock/bin/python -m pip install --quiet -e ".[test]"
	{ echo "# Lock for dpmedtf: every install (make test, make demo, Docker) resolves to exactly these versions."; \
	  echo "# Regenerate only deliberately: make lock (re-resolves from pyproject.toml and rewrites this file)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i '^dpmedtf'; } > constraints.txt
	rm -rf .venv-lock

clean-venv:
	rm -rf $(VENV)
