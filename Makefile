# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch, pinned so pip never pulls a multi-GB CUDA build on dev/CI machines.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test test-fast lint format demo demo-minigpt4 demo-minigpt5 demo-onevision demo-dpo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" -e ".[dev,deepspeed,gen]"
	touch $(STAMP)

venv: $(STAMP)

# The single-process tests on two workers (pytest-xdist), then the multi-process ones alone, so
# no DeepSpeed job shares the cores with another test.
test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 -m "not distributed" tests
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m distributed tests

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not distributed and not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m lvlm_tune.demo.run --out runs/demo

demo-minigpt4: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m lvlm_tune.demo.run --family minigpt4 --out runs/demo_minigpt4

demo-minigpt5: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m lvlm_tune.demo.minigpt5 --out runs/demo_minigpt5

demo-onevision: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m lvlm_tune.demo.onevision --out runs/demo_onevision

demo-dpo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m lvlm_tune.demo.dpo --out runs/demo_dpo

clean:
	rm -rf $(VENV) runs build *.egg-info
