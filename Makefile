# One target per job. `make demo` and `make test` do all the setup they need.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup lock demo test test-slow test-all lint format bench bench-gpu clean

setup:
	bash .ci/setup.sh

# after a change of dependencies: pin the versions now in .venv for every fresh setup
lock: setup
	$(PY) .ci/lock.py

demo: setup
	rm -rf out/demo
	$(PY) -m moracl run configs/wordnet_domains.yaml output_dir=out/demo train.epochs=2 \
		scenario.options.per_class=60 scenario.options.test_per_class=30

# `make test`: the quick suite (under 5 minutes on 2 cores); `make test-slow`: the tests
# marked slow (end-to-end runs, several processes); `make test-all`: both. CI runs both.
PYTEST := $(PY) -m pytest -p no:cacheprovider --durations=10

test: setup
	$(PYTEST) -m "not gpu and not slow"

test-slow: setup
	$(PYTEST) -m "slow and not gpu"

test-all: setup
	$(PYTEST) -m "not gpu"

lint: setup
	$(PY) -m ruff check moracl scenarios tests examples
	$(PY) -m ruff format --check moracl scenarios tests examples
	$(PY) -m mypy moracl

format: setup
	$(PY) -m ruff format moracl scenarios tests examples
	$(PY) -m ruff check --fix moracl scenarios tests examples

bench: setup
	$(PY) -m moracl bench adapters
	$(PY) -m moracl bench optim

# `make bench-gpu PY=python3` on a machine with one CUDA GPU and moracl's packages installed
# (no setup step: it uses that machine's Python): the GPU tests, then every one-GPU record of
# moracl/bench/results/ measured again (about 25 minutes on an H200) and RESULTS.md rendered.
RECORDS := moracl/bench/results
bench-gpu:
	$(PY) -m pytest -p no:cacheprovider -m gpu
	$(PY) -m moracl bench experts --size h100 --graphs --json $(RECORDS)/experts-h100.json
	$(PY) -m moracl bench experts --size h100 --json $(RECORDS)/experts-h100-eager.json
	$(PY) -m moracl bench host --device cuda --json $(RECORDS)/host-cuda.json
	$(PY) -m moracl bench experts --size h100-1024 --graphs --json $(RECORDS)/experts-h100-1024.json
	$(PY) -m moracl bench adapters --size h100 --json $(RECORDS)/adapters-h100.json
	$(PY) -m moracl bench adapters --size h100-1024 --json $(RECORDS)/adapters-h100-1024.json
	$(PY) -m moracl bench optim --device cuda --json $(RECORDS)/optim-cuda.json
	$(PY) -m moracl bench meta --device cuda --json $(RECORDS)/meta-cuda.json
	$(PY) -m moracl bench report

clean:
	rm -rf .venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
