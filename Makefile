# The two entry points (README): `make bench` (build + benchmark report) and `make test` (build + lint + tests).
# Both create or refresh .venv themselves; the build is redone only when csrc/ or the build files change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
CXX_FILES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
export MAX_JOBS ?= 2

.PHONY: venv build test lint format bench bench-suite clean

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
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

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
	$(VENV)/bin/clang-format -i $(CXX_FILES)

test: build lint
	$(PY) -m dnops.info
	$(PY) -m pytest -q tests
	DNOPS_BENCH_QUICK=1 $(PY) -m pytest -q benchmarks --benchmark-disable

bench: build
	$(PY) -m dnops.info
	$(PY) -m benchmarks.report

bench-suite: build
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build $(VENV) dnops/_C*.so dnops/_build_info.py *.egg-info
