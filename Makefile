# modelkit: `make demo` (the main job) and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject) to the local CPU wheel: any other spec pulls a
# multi-GB CUDA build. Users installing modelkit elsewhere keep their own torch.
TORCH_SPEC ?= torch==2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.modelkit-installed

.PHONY: install test test-fast fuzz demo bench bench-quick clean-reports browser-deps screenshots

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(FIND_LINKS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet $(FIND_LINKS) -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# the long fuzz profile: thousands of random hostile artifacts (make test runs ~240 fixed ones);
# outcome counts go to reports/fuzz-counts.json (see README, Reliability)
FUZZ_EXAMPLES ?= 700
fuzz: install
	mkdir -p reports
	MODELKIT_FUZZ=long MODELKIT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) MODELKIT_FUZZ_REPORT=reports/fuzz-counts.json \
		$(PY) -m pytest tests/test_fuzz.py -q

demo: install
	$(VENV)/bin/modelkit demo --root demo

# every benchmark runs (a miss does not stop the others); one summary table, JSON under
# benchmarks/results/, exit 1 if any target was missed. bench-quick: small sizes (smoke test).
bench: install
	$(PY) benchmarks/run_all.py

bench-quick: install
	$(PY) benchmarks/run_all.py --quick

# The README's screenshots: the browser test run with its screenshots written into the repo
# (`make test` writes them to a temp folder and never touches tracked files).
screenshots: install
	MODELKIT_SCREENSHOTS=$(CURDIR)/reports/screenshots $(PY) -m pytest tests/test_browser.py -q -p no:cacheprovider
	rm -f reports/screenshots/failure-*.png

browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
