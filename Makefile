# make test   - create .venv if missing (scripts/setup_env.sh) and run the whole test suite
# make toy    - the main job: generate the toy dataset if missing, train on CPU, evaluate
# make gpu-check [REPORT=gpu_check.md] - on a GPU machine: CUDA tests, GPU benchmark, compute-sanitizer, one report (scripts/gpu_check.sh)
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: env test toy

env:
	bash scripts/setup_env.sh

test: env
	$(PY) -m pytest -q tests

toy: env
	$(PY) tools/train_net.py --config configs/toy_vitdet.yaml

.PHONY: gpu-check
gpu-check:
	bash scripts/gpu_check.sh $(REPORT)
