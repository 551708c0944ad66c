# The two entry points (README): `make bench` (build + benchmark report) and `make test` (build + lint + tests).
# Both create or refresh .venv themselves; the build is redone only when csrc/ or the build files change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
CXX_FILES := $(shell find csrc tests/cuda_emulator -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
export MAX_JOBS ?= 2

.PHONY: venv build test test-cuda-emulated cuda-counts compat-venv test-compat lint format bench bench-suite gpu-check \
	gpu-compile-check clean

$(DEPS_STAMP): requirements-dev.txt requirements-detectors.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-detectors.txt
	touch $@

venv: $(DEPS_STAMP)

# The stamp takes the build's start time, so sources edited while it compiles trigger the next build.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	touch $@.start
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	mv $@.start $@

build: $(BUILD_STAMP)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_FILES)
	$(VENV)/bin/lint-imports --no-cache

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
	$(VENV)/bin/clang-format -i $(CXX_FILES)

test: build lint
	$(PY) -m dnops.info
	$(PY) -m pytest -q -n auto tests
	DNOPS_BENCH_QUICK=1 $(PY) -m pytest -q benchmarks --benchmark-disable
	$(MAKE) test-cuda-emulated

# The CUDA kernels executed on the CPU: the unmodified .cu files through the emulator's source step, built at -O2
# and under ASan + UBSan (cached outside the checkout, ~2 min to build from an empty cache on 2 cores), then the
# emulated tests in four runs of two lane orders each (tests/cuda_emulator/run.py; ~4 min).
test-cuda-emulated: build
	$(PY) -m tests.cuda_emulator.run

# The coalescing model of the CUDA kernels on the benchmark shapes (docs/results/cuda_counts.json, docs/kernels.md).
cuda-counts: build
	$(PY) -m tests.cuda_emulator.counts

bench: build
	$(PY) -m dnops.info
	$(PY) -m benchmarks.report

bench-suite: build
	$(PY) -m pytest benchmarks --benchmark-only

# The lent GPU's pair, torch 2.11 on Python 3.12: a copy of the tree built against it (the C++ kernels, and the
# CUDA kernels for sm_90, which compile here and cannot run) and the CPU test suite run there. CI runs it after
# `make test`; the first run downloads torch (~3 GB), later ones rebuild only what changed.
COMPAT_TORCH ?= 2.11.0
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
COMPAT := .compat
compat-venv:
	test -x $(COMPAT)/venv/bin/python || $(COMPAT_PYTHON) -m venv $(COMPAT)/venv
	grep -v '^torch' requirements-dev.txt > $(COMPAT)/requirements.txt
	$(COMPAT)/venv/bin/python -m pip install -q torch==$(COMPAT_TORCH) -r $(COMPAT)/requirements.txt

test-compat: compat-venv
	mkdir -p $(COMPAT)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -p --parents -t $(COMPAT)/src
	cd $(COMPAT)/src && DNOPS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 ../venv/bin/python setup.py -q build_ext --inplace
	cd $(COMPAT)/src && ../venv/bin/python -m dnops.info && ../venv/bin/python -m pytest -q -n auto -p no:cacheprovider tests

# On a lent GPU machine (no .venv: its own python3, torch and triton) it builds the extension in place for that
# torch and this GPU, compiles the Triton kernels into Triton's cache, then runs the GPU tests, compute-sanitizer
# and the GPU benchmark, each step time-limited so that the whole fits 5 minutes and two runs fit one lent GPU's
# 15 minutes with its start: build <= 75 s (16 cores, this GPU's arch only), warm <= 45 s (Triton compiles, one
# process per op and dtype), tests <= 90 s (6 shards), sanitizer <= 40 s, bench <= 50 s (what is left of 300 s).
# ONLY=<step>[,<step>] runs those steps, ONLY=<pytest -k expression> rebuilds and reruns the matching GPU tests.
# Without a GPU it runs the same steps in dry mode on the CPU with the installed build.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check $(if $(ONLY),--only "$(ONLY)")

# Every Triton kernel specialization the ops launch, compiled for sm_90 ahead of time by the CI's Triton and by the
# lent GPU's (Triton 3.6 in the torch 2.11 environment of test-compat), with registers, spills, shared memory and
# tensor-core / atomic instructions per kernel, and the same for the nvcc build's CUDA kernels; it fails on a
# compile error or a spill at the benchmark shapes. The table: docs/results/gpu_compile.md.
# The two Tritons compile side by side (one core each, ~8 minutes with an empty Triton cache, seconds with a warm one).
gpu-compile-check: build compat-venv
	$(PY) -m tests.gpu_compile --json $(COMPAT)/gpu_compile-ci.json --cuda-lib $(firstword $(wildcard dnops/_C*.so)) \
		> $(COMPAT)/gpu_compile-ci.log 2>&1 & ci=$$!; \
	$(COMPAT)/venv/bin/python -m tests.gpu_compile --json $(COMPAT)/gpu_compile-gpu.json \
		> $(COMPAT)/gpu_compile-gpu.log 2>&1; gpu=$$?; wait $$ci; ci=$$?; \
	grep -h -e '^{"triton"' -e '^compile error' -e '^spills' $(COMPAT)/gpu_compile-gpu.log $(COMPAT)/gpu_compile-ci.log; \
	test $$ci -eq 0 && test $$gpu -eq 0
	$(PY) -m tests.gpu_compile --table docs/results/gpu_compile.md $(COMPAT)/gpu_compile-gpu.json $(COMPAT)/gpu_compile-ci.json
	git diff --quiet -- docs/results/gpu_compile.md || { git diff --stat -- docs/results/gpu_compile.md; \
		echo "docs/results/gpu_compile.md differs from what the kernels compile to: commit the regenerated table"; exit 1; }

clean:
	rm -rf build $(VENV) dnops/_C*.so dnops/_build_info.py *.egg-info
