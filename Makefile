# Train -> checkpoint -> ONNX -> model repository -> Triton. Every target calls a
# `python -m <stage>` command; run `python -m train --help` (export, serve) for all options.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

# A recipe (train/recipes/<name>.yaml) holds a run's settings; the variables below
# override it only when set (make train RECIPE=cifar10_resnet20 EPOCHS=5).
RECIPE ?= antsbees_probe
# A recipe setting, resolved by train/config.py alone (YAML, no torch: ~0.1 s); expanded
# when a target runs, after `setup` (empty before the venv exists).
recipe_get = $(shell test -x $(PY) && $(PY) -m train.config $(RECIPE) $(1) 2>/dev/null)
# Resolved once, on first use (the eval caches it: OUT and every target reuse it).
MODEL ?= $(eval MODEL := $(or $(call recipe_get,model_name),$(basename $(notdir $(RECIPE)))))$(MODEL)
DATA ?=
ARCH ?=
MODE ?=
PRETRAINED ?=
EPOCHS ?=
OUT ?= runs/$(MODEL)
REPO ?= model_repository
TARGET ?= cpu
PRECISION ?= fp32
GPU_BACKEND ?=
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
WATCHDOG ?= 10
DEPLOY ?=
TRAIN_ARGS ?=
EXPORT_ARGS ?=
PYTEST_ARGS ?=
# Tritons serving $(REPO): `make serve` runs REPLICAS on this machine (default 1: these are
# 2 cores), `make deploy-manifests` asks Kubernetes for REPLICAS pods (default 2); `make
# bench REPLICAS=2` measures two local ones beside one. One name, each target's own default.
REPLICAS ?=
IMAGE ?= nvcr.io/nvidia/tritonserver:26.07-py3
MODEL_STORE ?=
K8S_OUT ?= deploy/k8s
NAMESPACE ?= default

.PHONY: help setup lock data train export serve test test-long test-all test-fast lint format clean bench-train bench profile tune soak chaos deploy-manifests

help:
	@echo "make setup | train | export | serve | test | test-long | test-all | test-fast | bench | profile | tune | bench-train | soak | chaos | deploy-manifests | data | lint | clean"
	@echo "  RECIPE=$(RECIPE) MODEL=$(MODEL) OUT=$(OUT) REPO=$(REPO)"
	@echo "  overrides when set: DATA ARCH MODE PRETRAINED EPOCHS TRAIN_ARGS EXPORT_ARGS"
	@echo "  export: TARGET=$(TARGET) (cpu|gpu) GPU_BACKEND=(tensorrt|onnxruntime) PRECISION=$(PRECISION) (fp32|fp16|int8) DEPLOY=HOST:GRPC_PORT"
	@echo "  recipes: $(notdir $(basename $(wildcard train/recipes/*.yaml)))"

setup: $(STAMP)

# Idempotent: re-runs only when the lock or the project metadata change.
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 13) else "Python 3.10-3.13 needed (Triton python-backend stubs), found %d.%d" % v)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import torch, torchvision, onnxruntime, tritonclient.grpc, timm, tensorrt_rtx; print('setup ok: torch', torch.__version__, '/ tensorrt_rtx', tensorrt_rtx.__version__)"
	@# perf_analyzer (make bench/tune) needs libb64-0d; tritonserver runs with jemalloc (libjemalloc2);
	@# the public front of `serve run` is HAProxy (haproxy); Triton's namespace needs unshare/ip
	@if ! ldconfig -p | grep -q 'libb64.so.0d ' || ! ldconfig -p | grep -q 'libjemalloc.so.2 ' \
		|| ! test -x /usr/sbin/haproxy; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				libb64-0d libjemalloc2 haproxy util-linux iproute2; \
		else echo "setup: as root, run: apt-get install -y libb64-0d libjemalloc2 haproxy (perf_analyzer, jemalloc, the public front)" >&2; fi; \
	fi
	@# the perf_analyzer binary of the tritonclient 2.51.0 wheel (our tritonclient library stays)
	$(PY) -m serve perf-analyzer install || [ "$$(id -u)" != 0 ]
	touch $@

# Re-resolve the full package set from pyproject.toml's pins into requirements.lock.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet ".[dev]"
	{ head -n 2 requirements.lock; .venv-lock/bin/pip freeze --exclude trainserve; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .venv-lock

data: $(STAMP)
	$(PY) -m train data --root data

train: $(STAMP)
	TRAINSERVE_MAKE=train TRAINSERVE_RECIPE=$(RECIPE) $(PY) -m train --recipe $(RECIPE) --model $(MODEL) --out $(OUT) \
		$(if $(DATA),--data $(DATA)) $(if $(ARCH),--arch $(ARCH)) $(if $(MODE),--mode $(MODE)) \
		$(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)

# TARGET=cpu (default): python backend + ONNX Runtime. TARGET=gpu: strongly typed TensorRT
# engine from the FP16 (or INT8 Q/DQ) ONNX (tensorrt_plan; GPU_BACKEND=onnxruntime for
# ORT + TensorRT accelerator instead).
# DEPLOY=127.0.0.1:8001 also loads the new version on that server (never implied).
# PRECISION=int8|fp16 (TARGET=cpu) serves the INT8/FP16 model, published only when its
# stage passes the accuracy gate (after the precision fallback, if needed).
# Every ONNX for TensorRT is also built with TensorRT-RTX (no GPU needed) for 8.6 8.9 12.0:
# EXPORT_ARGS="--trt-rtx-targets 8.6" changes the list; parity.json tensorrt_builds.
export: $(STAMP)
	TRAINSERVE_MAKE=export TRAINSERVE_RECIPE=$(RECIPE) $(PY) -m export --checkpoint $(OUT)/checkpoint.pt --name $(MODEL) \
		$(if $(DATA),--data $(DATA)) --model-repository $(REPO) --target $(TARGET) \
		$(if $(GPU_BACKEND),--gpu-backend $(GPU_BACKEND)) $(if $(DEPLOY),--deploy $(DEPLOY)) \
		--precision $(PRECISION) $(EXPORT_ARGS)

# Time-to-accuracy on ants/bees (tutorial, feature-extract, default LP-FT; 3 seeds each;
# ~45 min, the tutorial's 25 epochs are most of it) and CIFAR images/s. Add runs to the
# last report: BENCH_ARGS="--recipes antsbees_tutorial --seeds 1 2 --skip-cifar --merge".
bench-train: $(STAMP)
	TRAINSERVE_MAKE=train TRAINSERVE_RECIPE=$(RECIPE) $(PY) -m train bench --out bench/local $(BENCH_ARGS)

# perf_analyzer against Triton (gRPC, gRPC+shm, HTTP; tensor/raw; concurrency sweep and
# Poisson request rates) vs in-process ORT and PyTorch, one run.
bench: $(STAMP)
	$(PY) -m export bench --model $(MODEL) --checkpoint $(OUT)/checkpoint.pt \
		--model-repository $(REPO) --out bench/local $(if $(DATA),--data $(DATA)/val) \
		$(if $(REPLICAS),--replicas $(REPLICAS)) $(BENCH_ARGS)

# Every in-process runtime (PyTorch, ONNX Runtime FP32/FP16/INT8) at batch 1..64 on the
# export's parity bundle: images/s, latency, saturation. PROFILE_ARGS="--batches 1,8,32".
profile: $(STAMP)
	$(PY) -m export profile $(OUT) --out bench/local $(PROFILE_ARGS)

# Search instances x max batch x queue delay with perf_analyzer; publish the best config
# under the p99 budget (a config change, no new version). TUNE_ARGS="--p99-ms 100 ...".
tune: $(STAMP)
	$(PY) -m export tune --model $(MODEL) --model-repository $(REPO) --out bench/local \
		--data $(or $(DATA),$(call recipe_get,data))/val --publish $(TUNE_ARGS)

# Concurrency 16, mixed protocols and inputs, once with jemalloc and once with glibc malloc
# (5 minutes each): 0 failures, bounded RSS growth, both growths in bench/local/soak-latest.{json,png}.
soak: $(STAMP)
	$(PY) -m serve soak --model $(MODEL) --model-repository $(REPO) --out bench/local \
		--data $(or $(DATA),$(call recipe_get,data))/val $(SOAK_ARGS)

# Kill a random tritonserver every 15 s and roll a version out and back, under load at
# concurrency 4, on REPLICAS (default 2) of its own: sent/answered/failed, p50/p99 in and out
# of faults, time to full capacity (bench/local/chaos-*-latest.{json,png}). CHAOS_ARGS=...
chaos: $(STAMP)
	$(PY) -m serve chaos --model $(MODEL) --model-repository $(REPO) --replicas $(or $(REPLICAS),2) \
		--data $(or $(DATA),$(call recipe_get,data))/val --out bench/local $(CHAOS_ARGS)

# Deployment + Service + HPA (queue time via prometheus-adapter) + ServiceMonitor + admin-key
# Secret, rendered from $(REPO). MODEL_STORE=s3://bucket/path or pvc:CLAIM (default pvc:triton-models).
deploy-manifests: $(STAMP)
	$(PY) -m serve manifests --model-repository $(REPO) --out $(K8S_OUT) --replicas $(or $(REPLICAS),2) \
		--image $(IMAGE) --namespace $(NAMESPACE) $(if $(MODEL_STORE),--model-store $(MODEL_STORE))

serve: $(STAMP)
	exec $(PY) -m serve run --model-repository $(REPO) --http-port $(HTTP_PORT) \
		--grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --watchdog $(WATCHDOG) \
		--replicas $(or $(REPLICAS),1)

# Every behaviour, with per-architecture repetitions on representative architectures
# (the marker `exhaustive` holds the rest: `make test-all`), less the few long end-to-end
# tests (marker `long`: `make test-long`). CI (.ci/run) runs `make test`, then `make test-long`.
test: $(STAMP)
	$(PY) -m pytest -m "not exhaustive and not long" $(PYTEST_ARGS)

test-long: $(STAMP)
	$(PY) -m pytest -m "long and not exhaustive" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The subset that needs no server and no training (well under 2 minutes).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not server and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check train export serve tests
	$(PY) -m ruff format --check train export serve tests
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format train export serve tests
	$(PY) -m ruff check --fix train export serve tests

clean:
	rm -rf runs .pytest_cache
