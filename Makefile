# Two commands do everything on a fresh machine:
#   make demo   build, install, run the two-process demo and the headline benchmark
#   make test   build, install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SRC    := pyproject.toml setup.py src/copyless/_core.c src/copyless/_codec.c src/copyless/_capi.h

.PHONY: demo test bench lint debug asan clean deps
demo: $(VENV)/.bench
	$(VENV)/bin/copyless demo
	$(PY) benchmarks/bench_pubsub.py --quick
	$(PY) benchmarks/bench_rate.py --quick

test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.bench
	mkdir -p bench-results
	$(PY) benchmarks/bench_pubsub.py --json bench-results/pubsub.json
	$(PY) benchmarks/bench_rate.py --json bench-results/rate.json

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

deps:
	scripts/install-deps.sh

$(VENV)/bin/python:
	scripts/install-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# the stamps depend on the C source, so an edit rebuilds the core
$(VENV)/.test: $(VENV)/bin/python $(SRC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@
$(VENV)/.bench: $(VENV)/.test
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@
$(VENV)/.dev: $(VENV)/.bench
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# debug / sanitizer builds of the core, one flag away
debug: $(VENV)/bin/python
	$(PY) -m pip install -q 'setuptools>=77' wheel  # --no-build-isolation builds with these
	COPYLESS_DEBUG=1 $(PY) -m pip install -q -e '.[test]' --no-build-isolation --force-reinstall --no-deps
	rm -f $(VENV)/.test
asan: $(VENV)/bin/python
	$(PY) -m pip install -q 'setuptools>=77' wheel
	COPYLESS_ASAN=1 $(PY) -m pip install -q -e '.[test]' --no-build-isolation --force-reinstall --no-deps
	rm -f $(VENV)/.test
	@echo "run: LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 $(PY) -m pytest"

clean:
	rm -rf build src/*.egg-info src/copyless/*.so $(VENV)
