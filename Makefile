# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
# Every test, the slow real-model ones included (about 4 minutes); PYTEST_ARGS='-q -m "not slow"' skips them.
PYTEST_ARGS ?= -q

.PHONY: install test test-installed demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	cd tests && ../$(VENV)/bin/pytest $(PYTEST_ARGS)

# For an environment that is already active (CI installs the wheel, then runs this).
test-installed:
	cd tests && pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/lmms-talo demo
