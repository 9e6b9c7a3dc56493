# The README's two set-up commands: `make demo` and `make test`. Each creates .venv when
# it is missing and installs what it needs (again only when a requirements file changed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime $@

demo: $(VENV)/.runtime
	$(PY) main.py --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
