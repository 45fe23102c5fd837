# Set-up and checks. `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU install pins torch 2.13.0 (a local wheel on the dev/CI machines); the GPU machines run 2.11.
TORCH_PIN := torch==2.13.0
TEST_EXTRAS := test,dev

.PHONY: demo test test-core test-interpret check-ep4-tp2 lint format clean

# uv reads neither pip's configuration nor its PIP_* variables: it gets pip's find-links (the folder where a machine
# keeps local wheels, such as the CPU torch) from the environment or from pip's configuration.
FIND_LINKS := $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_LINKS := $(foreach d,$(FIND_LINKS),--find-links $(d))

# torch installs with uv too: 22 s against pip's 45 s (plus 11 s of pip upgrading itself) on a fresh machine, the same
# local wheel; uv writes the .pyc files in parallel where pip writes them one by one. pip does it if uv cannot.
$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q uv && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) $(UV_LINKS) $(TORCH_PIN) \
	  || $(PIP) install -q $(TORCH_PIN)
	touch $@

# The extras install with uv, which resolves and downloads in parallel: 15 s against pip's 45 s on a fresh machine
# (the same packages and versions; torch is already the pinned local wheel, which satisfies every requirement on
# it). --compile-bytecode writes the .pyc files at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (CI
# machines) nothing else writes them, and every process the tests start would compile transformers' sources again
# (+1.7 s an import). pip does it all if uv cannot.
define install_extras
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) $(UV_LINKS) -e ".[$(1)]" $(TORCH_PIN) \
	  || $(PIP) install -q -e ".[$(1)]" $(TORCH_PIN)
endef

$(VENV)/.hf: $(VENV)/.base setup.cfg
	$(call install_extras,hf)
	touch $@

$(VENV)/.test: $(VENV)/.base setup.cfg
	$(call install_extras,$(TEST_EXTRAS))
	touch $@

demo: $(VENV)/.hf
	$(PY) examples/quickstart.py

# pytest exits 5 when it collected nothing: that is a failure here, never a silent pass.
test: $(VENV)/.test
	$(MAKE) --no-print-directory test-core
	$(MAKE) --no-print-directory test-interpret

# Two workers (CI has 2 cores; most time is single-threaded Dynamo / AOT tracing; the 15 slowest tests are listed at
# the end, so a CI log shows where its minutes went); a file's tests stay on
# one worker so module-scoped fixtures (e.g. the 4-process distributed run) run once. A test still running after
# $(TEST_TIMEOUT) s is a hang: pytest-timeout dumps every thread's stack and ends that worker (a failure, not a CI
# run that waits out its limit).
TEST_TIMEOUT ?= 600
test-core:
	@$(PY) -m pytest -q -m "not interpret" --ignore=tests/interpret -p no:cacheprovider -n 2 --dist loadfile \
	  --timeout $(TEST_TIMEOUT) --timeout-method thread --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# Triton kernels under the interpreter: TRITON_INTERPRET must be set before triton is imported,
# so these run in their own pytest session (two workers, which inherit the variable).
test-interpret:
	@if ls tests/interpret/test_*.py >/dev/null 2>&1; then \
	  TRITON_INTERPRET=1 $(PY) -m pytest -q -m interpret tests/interpret -p no:cacheprovider -n 2 \
	    --timeout $(TEST_TIMEOUT) --timeout-method thread; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "interpreter suite collected no tests: failing"; exit 1; fi; exit $$rc; \
	else echo "no Triton interpreter tests in this tree"; fi

# The one layout of DESIGN's EP x TP matrix that needs 8 processes (about a minute on 2 cores; not in `make test`).
check-ep4-tp2: $(VENV)/.test
	$(PY) tests/check_ep4_tp2.py

lint: $(VENV)/.test
	$(VENV)/bin/ruff check moeq tests examples benchmarks
	$(VENV)/bin/ruff format --check moeq tests examples benchmarks

format: $(VENV)/.test
	$(VENV)/bin/ruff format moeq tests examples benchmarks
	$(VENV)/bin/ruff check --fix moeq tests examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
