# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
# Every test, the slow real-model ones included: what CI runs. Two workers (pytest-xdist), each
# test file on one of them: the slow files' module fixtures are built once.
PYTEST_ARGS ?= -q -n 2 --dist loadfile
# The unit tests: no real pretrained model, no harness CLI in a subprocess (under 3 minutes).
FAST_MARKERS := not slow and not e2e
# The venv's ruff once installed, else the one on PATH (CI's activated environment).
RUFF ?= $(shell test -x $(VENV)/bin/ruff && echo $(VENV)/bin/ruff || echo ruff)

.PHONY: install test test-fast test-installed demo lint format

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	cd tests && ../$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install
	cd tests && ../$(VENV)/bin/pytest -q -m "$(FAST_MARKERS)"

# For an environment that is already active (CI installs the wheel, then runs this).
test-installed:
	cd tests && pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/lmms-talo demo

lint:
	$(RUFF) check .
	$(RUFF) format --check .

format:
	$(RUFF) check --fix .
	$(RUFF) format .
