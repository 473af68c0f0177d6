"""What the command-line tools share: argument parsing that reports once, value types, exit
codes, optional-dependency checks and the GPU probe.

Under ``mpiexec`` every rank parses the same command line; :class:`Parser` prints help and usage
errors on rank 0 only (read from the launcher's environment, so no MPI is initialised) and puts
an error on one line. Nothing here imports MPI, CuPy or NumPy at module level.

Exit codes of every tool (``dpgather`` and the ``python -m dpgather.tools.*`` entry points):
:data:`EXIT_OK` 0, :data:`EXIT_VERIFY` 1 (a verification failed), :data:`EXIT_USAGE` 2 (invalid
options or input, or something missing from the environment: an optional dependency, GPUs,
mpiexec, the repository), :data:`EXIT_CRASH` 3 (a rank crashed).
"""

import argparse
import importlib.util
import math
import os
import sys

__all__ = [
    "EXIT_OK", "EXIT_VERIFY", "EXIT_USAGE", "EXIT_CRASH", "PIP", "Parser", "launcher_rank",
    "is_rank0", "say_error", "positive_int", "nonneg_int", "positive_float", "nonneg_float",
    "missing", "require", "require_mpi", "gpu_count",
]

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_CRASH = 0, 1, 2, 3

#: The pip command that installs each optional dependency (quoted in "missing" errors).
PIP = {
    "mpi4py": "pip install mpich mpi4py",
    "numba": "pip install numba",
    "ml_dtypes": "pip install ml_dtypes",
    "matplotlib": "pip install matplotlib",
    "tqdm": "pip install tqdm",
    "cupy": 'pip install "cupy-cuda12x>=13"',
    "jsonschema": "pip install jsonschema",
}

#: Variables in which MPI launchers announce a process's rank (MPICH Hydra, Open MPI 4, PMIx /
#: Open MPI 5, MVAPICH, Slurm).
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def launcher_rank():
    """This process's rank as its launcher announced it in the environment; 0 outside a job.

    Used before MPI is initialised (argument parsing, option checks), so that only one rank of
    an ``mpirun -n N dpgather ...`` prints the same message.
    """
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                continue
    return 0


def is_rank0():
    return launcher_rank() == 0


def say_error(prog, message, rank0=None):
    """Print ``PROG: error: MESSAGE`` on one line to stderr (rank 0 only); returns :data:`EXIT_USAGE`.

    ``rank0``: whether this process is rank 0 (default: :func:`launcher_rank` says so).
    """
    if rank0 if rank0 is not None else is_rank0():
        text = " ".join(str(message).split())  # one line, whatever the message holds
        print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that prints help and errors on rank 0 only, errors on one line
    (``PROG: error: MESSAGE (see `PROG --help`)``), and exits with :data:`EXIT_USAGE`.

    Subparsers made by ``add_subparsers`` are of this class too.
    """

    def _print_message(self, message, file=None):
        if is_rank0():
            super()._print_message(message, file)

    def error(self, message):
        text = " ".join(str(message).split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {text} (see `{self.prog} --help`)\n")


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def nonneg_int(text):
    """argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _float(text, what):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_float(text):
    """argparse type: a finite number > 0 (seconds, for example)."""
    v = _float(text, "a positive number")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def nonneg_float(text):
    """argparse type: a finite number >= 0."""
    v = _float(text, "a non-negative number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return v


def missing(*modules):
    """The modules of ``modules`` that cannot be found (not imported: a cheap spec lookup)."""
    out = []
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except (ImportError, ValueError):
            out.append(m)
    return out


def require(what, *modules):
    """Raise :class:`dpgather.BackendUnavailable` naming the pip command when one of ``modules``
    is missing; ``what`` says who needs it (``"dpgather replay"``)."""
    gone = missing(*modules)
    if gone:
        from dpgather.core import BackendUnavailable

        cmds = "; ".join(PIP.get(m, f"pip install {m}") for m in gone)
        raise BackendUnavailable(f"{what} needs {', '.join(gone)}, which is not installed: {cmds}")


def require_mpi(what):
    """``mpi4py.MPI`` (importing it initialises MPI), or :class:`dpgather.BackendUnavailable`
    naming the pip command when mpi4py is missing or cannot load an MPI library (mpi4py without
    MPICH / Open MPI raises ``RuntimeError: cannot load MPI library``)."""
    require(what, "mpi4py")
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as e:
        from dpgather.core import BackendUnavailable

        cause = " ".join(str(e).split())
        raise BackendUnavailable(f"{what} needs an MPI library that mpi4py can load ({cause}): "
                                 f"{PIP['mpi4py']}") from None
    return MPI


def gpu_count():
    """GPUs CuPy sees (0 without CuPy or a driver); never raises, never initialises MPI."""
    if missing("cupy"):
        return 0
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import cupy

            return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0
