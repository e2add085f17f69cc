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
	$(DEV_VENV)/bin/pip install -q -e '.[serve,train,dev,batch]'
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

.PHONY: bench
bench: $(DEV_VENV)/.installed  ## benchmarks: raw onnxruntime, the service under load, Keras; JSON in bench/results/
	$(DEV_VENV)/bin/python -m bench $(BENCH_ARGS)

format: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check --fix .
	$(DEV_VENV)/bin/ruff format .

clean:
	rm -rf $(SERVE_VENV) $(DEV_VENV) .pytest_cache .ruff_cache

.PHONY: soak
soak: $(DEV_VENV)/.installed  ## 4x overload, then SIGTERM under load, on a live uvicorn on 127.0.0.1 (~90 s)
	$(DEV_VENV)/bin/python -m bench.soak $(SOAK_ARGS)

# pip-audit needs a vulnerability database: PyPI's JSON API (AUDIT_SERVICE=pypi) or OSV
# (AUDIT_SERVICE=osv). A canary that has known advisories (urllib3 1.24.1) shows whether it
# answers; where it does not (a registry mirror that serves no per-version JSON, no route to
# OSV), the target says so and skips instead of reporting "no known vulnerabilities".
AUDIT_SERVICE ?= pypi
AUDIT_FLAGS = --no-deps --disable-pip --progress-spinner off --vulnerability-service $(AUDIT_SERVICE)

.PHONY: audit
audit: $(DEV_VENV)/.installed  ## pip-audit of the serving dependencies as `make serve` installs them
	@echo "urllib3==1.24.1" > $(DEV_VENV)/audit-canary.txt
	@if ! $(DEV_VENV)/bin/pip-audit $(AUDIT_FLAGS) -f json -r $(DEV_VENV)/audit-canary.txt 2>/dev/null \
	    | $(DEV_VENV)/bin/python -c "import json, sys; sys.exit(not json.load(sys.stdin)['dependencies'][0].get('vulns'))" 2>/dev/null; then \
	  echo "audit SKIPPED: the '$(AUDIT_SERVICE)' vulnerability service did not answer from here" \
	       "(no advisories for the urllib3 1.24.1 canary); see docs/robustness.md"; \
	  exit 0; \
	fi; \
	$(MAKE) --no-print-directory $(SERVE_VENV)/.installed && \
	$(SERVE_VENV)/bin/pip freeze --exclude-editable > $(SERVE_VENV)/requirements-audit.txt && \
	$(DEV_VENV)/bin/pip-audit $(AUDIT_FLAGS) --strict -r $(SERVE_VENV)/requirements-audit.txt
