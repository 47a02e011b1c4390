# rae-pipeline: every command a user or CI runs. Environment variables for tests and jobs are set
# here (never in library code).
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RAE := $(BIN)/rae-pipeline

# encode
ENCODER ?= dinov2
DATA ?=
OUT ?= out/stores
WEIGHTS ?= hub
SPLIT ?= train
RESOLUTION ?= 256
ENCODE_ARGS ?=
# train-dit / fit-decoder
STORE ?=
RUN_DIR ?=
PRESET ?= debug
NPROC ?= 1
TRAIN_ARGS ?=
TORCHRUN_ARGS ?=
# sample
DIT ?=
DECODER ?=
SAMPLE_OUT ?= runs/samples
NUM ?= 64
SAMPLE_ARGS ?=

# Local-only defaults for tests: Ray stays on loopback, no auth token files, DDP on loopback,
# model hubs never contacted.
TEST_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
	MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=lo HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
	PYTHONHASHSEED=0
JOB_ENV := RAY_USAGE_STATS_ENABLED=0

.PHONY: install test encode train-dit fit-decoder sample demo bench drills sample-data clean

install: $(BIN)/rae-pipeline

$(BIN)/rae-pipeline: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

test: install
	$(TEST_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

encode: install
	$(JOB_ENV) $(RAE) encode --encoder $(ENCODER) $(if $(DATA),--data $(DATA)) --out $(OUT) \
		--weights $(WEIGHTS) --split $(SPLIT) --resolution $(RESOLUTION) $(ENCODE_ARGS)

train-dit: install
	$(BIN)/torchrun --nproc-per-node $(NPROC) $(TORCHRUN_ARGS) -m pipeline.cli train-dit \
		--store $(STORE) --run-dir $(or $(RUN_DIR),runs/train-dit) --preset $(PRESET) $(TRAIN_ARGS)

# Without STORE: the built-in sample data encoded by DINOv2-B with random weights (reused once made).
fit-decoder: install
	store="$(STORE)"; \
	if [ -z "$$store" ]; then \
		store=$$($(JOB_ENV) RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(RAE) encode --encoder dinov2 --weights random \
			--out $(OUT)/sample --no-progress) || exit 1; \
	fi; \
	$(BIN)/torchrun --nproc-per-node $(NPROC) $(TORCHRUN_ARGS) -m pipeline.cli fit-decoder \
		--store "$$store" --run-dir $(or $(RUN_DIR),runs/fit-decoder) --preset $(PRESET) $(TRAIN_ARGS)

# --num-samples, not --num: torchrun's own parser would take --num as an abbreviation of --nnodes.
sample: install
	$(BIN)/torchrun --nproc-per-node $(NPROC) $(TORCHRUN_ARGS) -m pipeline.cli sample \
		--dit-ckpt $(DIT) --decoder-ckpt $(DECODER) --out $(SAMPLE_OUT) --num-samples $(NUM) $(SAMPLE_ARGS)

demo: install
	$(JOB_ENV) RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/python -m pipeline.cli.demo $(DEMO_ARGS)

bench: install
	$(JOB_ENV) $(TEST_ENV) $(BIN)/python -m bench.bench $(BENCH_ARGS)

drills: install
	$(JOB_ENV) $(TEST_ENV) $(BIN)/python -m bench.drills $(DRILLS_ARGS)

clean:
	rm -rf out runs .pytest_cache
