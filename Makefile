# Train -> checkpoint -> ONNX -> model repository -> Triton. Every target calls a
# `python -m <stage>` command; run `python -m train --help` (export, serve) for all options.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

MODEL ?= antsbees
DATA ?= $(if $(wildcard ../shared/data/hymenoptera_data),../shared/data/hymenoptera_data,data/hymenoptera_data)
ARCH ?= resnet18
MODE ?= finetune
PRETRAINED ?= auto
EPOCHS ?= 25
OUT ?= runs/$(MODEL)
REPO ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
TRAIN_ARGS ?=
EXPORT_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup lock data train export serve test lint format clean

help:
	@echo "make setup | train | export | serve | test | data | lint | clean"
	@echo "  MODEL=$(MODEL) DATA=$(DATA) ARCH=$(ARCH) MODE=$(MODE) PRETRAINED=$(PRETRAINED) EPOCHS=$(EPOCHS) OUT=$(OUT)"

setup: $(STAMP)

# Idempotent: re-runs only when the lock or the project metadata change.
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 13) else "Python 3.10-3.13 needed (Triton python-backend stubs), found %d.%d" % v)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import torch, torchvision, onnxruntime, tritonclient.grpc, timm; print('setup ok: torch', torch.__version__)"
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
	$(PY) -m train --model $(MODEL) --data $(DATA) --arch $(ARCH) --mode $(MODE) \
		--pretrained $(PRETRAINED) --epochs $(EPOCHS) --out $(OUT) $(TRAIN_ARGS)

export: $(STAMP)
	$(PY) -m export --checkpoint $(OUT)/checkpoint.pt --name $(MODEL) --data $(DATA) \
		--model-repository $(REPO) $(EXPORT_ARGS)

serve: $(STAMP)
	exec $(PY) -m serve run --model-repository $(REPO) --http-port $(HTTP_PORT) \
		--grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check train export serve tests
	$(PY) -m ruff format --check train export serve tests

format: $(STAMP)
	$(PY) -m ruff format train export serve tests
	$(PY) -m ruff check --fix train export serve tests

clean:
	rm -rf runs .pytest_cache
