# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv when absent and install the package into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
# oneDNN kernels where TensorFlow leaves them off (AVX2-only CPUs); an explicit 0 is kept
export TF_ENABLE_ONEDNN_OPTS ?= 1
ITERS ?= 10

.PHONY: demo test test-full mutation-check bench gpu-check clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(PY) examples/cifar_wide_resnet_tl.py --iters $(ITERS)

# Two pytest processes (pytest-xdist), a test file each at a time, each with ONE intra-op
# thread for TensorFlow's kernels (tests/conftest.py reads WRN3D_TEST_INTRA_OP_THREADS): on 2
# cores the fast tier took 482 s this way against 626 s with three processes of TensorFlow's
# default thread pools (AMD EPYC, AVX512_BF16, 2026-12-06), whose pools oversubscribed the cores,
# and 356 s against 449 s with three processes of one thread each (same machine, 2026-12-07).
# `make test` is the fast tier (not the `slow` marker); `make test-full` (CI) runs everything.
# Both print the 30 slowest tests and the reasons of skips.
PYTEST := WRN3D_TEST_INTRA_OP_THREADS=1 $(PY) -m pytest -q -rs -n 2 --dist loadfile --durations=30

test: $(STAMP)
	$(PYTEST) -m "not slow" tests

test-full: $(STAMP)
	$(PYTEST) tests

# Eight ways to break the library, one at a time in a copy; each must fail a fast test
# (~2.5 minutes on 2 cores: run by hand, not in CI).
mutation-check: $(STAMP)
	$(PY) tests/mutation_check.py

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py

# The GPU path in one command (< 8 min on one GPU, no network): devices, the `gpu` tests, the
# main job in fp32/bf16/fp16, the benchmark at GPU batches -> benchmarks/results/gpu-check_<gpu>.*
# Without a GPU: one line and exit status 1. Install the CUDA build first: pip install -e ".[gpu]".
gpu-check: $(STAMP)
	@$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
