# moecc: `make demo` (set up + compile the bundled sample) and `make test` (set up + run the suite).
# torch is pinned to the CPU build on this machine's disk; override for other hardware:
#   make test TORCH_SPEC="torch==2.9.1"
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.moecc-installed

.PHONY: setup demo test test-slow bench bench-overlap clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[hf,minilm,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/moecc inspect samples/tiny_gpt.py:build
	$(BIN)/moecc compile samples/tiny_gpt.py:build --upcycle 8 --top-k 2 --to onnx --out out/tiny_gpt_moe --force
	$(BIN)/moecc compile samples/tiny_bert.py:build --upcycle 4 --top-k 2 --to torch --out out/tiny_bert_moe --force
	$(BIN)/python samples/run_onnx_standalone.py out/tiny_gpt_moe

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --timeout 900 -m "not slow" tests

test-slow: setup       # the long campaigns: property tests at scale, EP fault campaign (README)
	MOECC_SLOW=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest --timeout 3600 -m slow tests

bench: setup
	$(BIN)/moecc bench --quick --out out/bench

# overlap of expert-parallel all-to-alls on gloo ranks with a delayed (α–β) transport, ranks pinned: ~7 min
# on a quiet 2-core machine; results in samples/results/overlap.md (--quick: the 3 headline configs, ~2 min)
bench-overlap: setup
	OMP_NUM_THREADS=1 $(BIN)/python samples/overlap_bench.py --out samples/results

clean:
	rm -rf out .pytest_cache

# every transformers MoE family through moecc (torch, onnx, tvm) and transformers' own ONNX exporter:
# samples/results/coverage.md + coverage.json (long: about 2-4 min per family on 2 cores)
.PHONY: coverage
coverage: setup
	OMP_NUM_THREADS=1 $(BIN)/python samples/coverage.py --jobs 2
