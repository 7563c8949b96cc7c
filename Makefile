# Sheepdog: `make demo` runs the main job, `make test` runs the tests. Both create .venv.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
UV := $(VENV)/bin/uv
PY := $(VENV)/bin/python
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: venv test unit lint fmt typecheck demo bench compose-check compose-up compose-smoke compose-down compose-clean clean

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

# Install exactly what uv.lock pins (fails if pyproject.toml and the lock disagree), then
# compile the bytecode: where PYTHONDONTWRITEBYTECODE is set (this box sets it) Python never
# writes it, so every process (workers, engines, API servers, each CLI call of the tests) would
# compile every module it imports from source, ~2.5 s of CPU for `sheepdog --help`. Files
# already compiled are skipped.
PACKAGES := sheepdog workers tasks scheduler batch streaming intake lifecycle costs webhooks \
	documents rules models core simulator
venv: $(UV)
	$(UV) sync --frozen --quiet
	$(PY) -m compileall -q -j 0 $(VENV)/lib $(PACKAGES) clients/python/src > /dev/null

# ruff, and the floors: import-linter checks the contract in pyproject.toml (layers, the
# simulator apart, no module cycles).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: venv
	$(VENV)/bin/mypy $(PACKAGES)
	$(VENV)/bin/mypy clients/python/src/sheepdog_client

# Test modules run in parallel, one module per process (pytest-xdist; tests/conftest.py orders
# them longest first). Three processes on the 2-core CI box: most of a test is waiting on worker
# start-up and on real services. Then the few tests marked `serial` run alone.
# PYTEST_WORKERS=0 runs the first pass one test after another too.
PYTEST_WORKERS ?= 3
test: lint typecheck
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not serial"
	$(VENV)/bin/pytest -q -m serial || [ $$? -eq 5 ]  # 5: no test is marked serial

# Only the tests marked `unit` (pure logic: parsing, money, validation, routing): seconds, and no
# Redis, PostgreSQL or simulator needed. One test: .venv/bin/pytest tests/test_prices.py::test_override_file
unit: venv
	$(VENV)/bin/pytest -q -m unit

demo: venv
	$(VENV)/bin/sheepdog demo

bench: venv
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

compose-check:
	docker-compose -f docker-compose.yml config --quiet
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts.test.yml

# The compose stack for real (deploy/compose.sh; the README's "Everything at once"): an engine
# (started, and stopped again by compose-down, when none runs), the images, every service healthy.
compose-up:
	deploy/compose.sh up

compose-smoke:
	deploy/compose.sh smoke

compose-down:
	deploy/compose.sh down

# compose-down, then the images too: the next compose-up starts cold.
compose-clean:
	deploy/compose.sh clean

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
