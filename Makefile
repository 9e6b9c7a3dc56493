# The README's two set-up commands: `make demo` and `make test`. Each creates .venv when
# it is missing and installs what it needs, this package included (`pip install -e .`;
# again only when a requirements file or pyproject.toml changed). `make test-newest` runs
# the same tests in .venv-newest: Python 3.13 and the newest releases the requirements allow;
# `make test-slow` the few long end-to-end runs (marked `slow`) that `make test` leaves out.
PYTHON ?= python3
PYTHON313 ?= python3.13
VENV := .venv
PY := $(VENV)/bin/python
NEWEST := .venv-newest
NEWEST_PY := $(NEWEST)/bin/python
WORKDIR ?= runs/demo

# The ten slowest tests are printed after each run. The tests run in TEST_WORKERS processes
# (pytest-xdist; `auto`: one per core, at most 4): XLA compiles on one thread, and
# compiling is most of the suite's time. Each test file runs whole in one worker
# (--dist loadfile): a file's tests share compiled steps and module-scoped fixtures.
# `make test TEST_WORKERS=0` runs them all in one process.
TEST_WORKERS ?= auto
PYTEST = -m pytest -q --durations=10 -n $(TEST_WORKERS) --maxprocesses=4 --dist loadfile

.PHONY: demo test test-slow test-newest clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

# pip byte-compiles what it installs one file at a time; compileall does it on every core
# (TensorFlow, PyTorch and the references are tens of thousands of files). Like pip, it goes
# on past a file that does not compile (some packages ship such files as test data).
COMPILE = -m compileall -q -j 0

$(VENV)/.dev: requirements.txt requirements-dev.txt requirements-references.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --no-compile -r requirements-dev.txt -e .
	$(PY) -m pip install --quiet --no-compile --no-deps -r requirements-references.txt
	$(PY) $(COMPILE) $(VENV)/lib >/dev/null || true
	touch $(VENV)/.runtime $@

# pyenv's python3.13 shim runs only where 3.13 is a selected version: when $(PYTHON313)
# does not run as it is, pyenv's newest 3.13 is selected for it.
$(NEWEST_PY):
	$(PYTHON313) --version >/dev/null 2>&1 || export PYENV_VERSION=$$(pyenv versions \
	  --bare 2>/dev/null | grep -E '^3\.13(\.[0-9]+)?$$' | tail -1); \
	  $(PYTHON313) -m venv $(NEWEST)
	$(NEWEST_PY) -m pip install --quiet --upgrade pip

# --upgrade: the newest releases that the requirements allow, also when the venv is old.
$(NEWEST)/.dev: requirements.txt requirements-dev.txt requirements-references.txt pyproject.toml | $(NEWEST_PY)
	$(NEWEST_PY) -m pip install --quiet --no-compile --upgrade -r requirements-dev.txt -e .
	$(NEWEST_PY) -m pip install --quiet --no-compile --no-deps -r requirements-references.txt
	$(NEWEST_PY) $(COMPILE) $(NEWEST)/lib >/dev/null || true
	touch $@

# Trains, then evaluates the newest checkpoint with its HTML report; the last line printed
# is the report's path.
demo: $(VENV)/.runtime
	$(PY) main.py --config=configs/demo.py --workdir=$(WORKDIR)
	$(PY) main.py --config=configs/demo.py --workdir=$(WORKDIR) --mode=evaluate

test: $(VENV)/.dev
	$(PY) $(PYTEST) -m "not slow" tests

test-slow: $(VENV)/.dev
	$(PY) $(PYTEST) -m slow tests

test-newest: $(NEWEST)/.dev
	$(NEWEST_PY) $(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV) $(NEWEST) runs .pytest_cache
