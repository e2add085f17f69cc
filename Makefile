# Two environments: .venv-serve has only what serving needs (no TensorFlow);
# .venv has everything for training, tests and benchmarks.
PYTHON ?= python3
SERVE_VENV := .venv-serve
DEV_VENV := .venv
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: serve test lint format clean

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q -e '.[serve]'
	touch $@

$(DEV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install -q --upgrade pip
	$(DEV_VENV)/bin/pip install -q -e '.[serve,train,dev]'
	touch $@

serve: $(SERVE_VENV)/.installed  ## run the API on the bundled default model
	$(SERVE_VENV)/bin/python -m service --host $(HOST) --port $(PORT)

lint: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check .
	$(DEV_VENV)/bin/ruff format --check .

test: lint  ## ruff, then the whole test suite
	$(DEV_VENV)/bin/python -m pytest

.PHONY: lint-deploy
lint-deploy: $(DEV_VENV)/.installed  ## hadolint, compose schema, k8s manifests, dashboards
	$(DEV_VENV)/bin/python -m pytest -q tests/test_deploy.py

format: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check --fix .
	$(DEV_VENV)/bin/ruff format .

clean:
	rm -rf $(SERVE_VENV) $(DEV_VENV) .pytest_cache .ruff_cache
