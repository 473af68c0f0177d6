"""Run scripts under ``mpiexec`` from pytest, time-limited and hang-proof; assert collectively.

Two halves:

- pytest side: :func:`run_mpi` / :func:`check_mpi` launch ``mpiexec -n N python SCRIPT ARGS...``
  in its own process group with one-box MPICH settings, ``MPIEXEC_TIMEOUT`` and a hard
  ``subprocess`` deadline (the whole group is killed if Hydra does not stop in time), and return
  ``MpiRun(returncode, stdout, stderr)``. ``mpiexec_path`` / ``needs_mpiexec`` skip when no
  ``mpiexec`` is found. Scripts live in ``tests/mpi/`` and take their parameters from ``argv``.
- script side (under MPI): :func:`coll_assert` makes an assertion fail on every rank together
  (a failure on some ranks only would leave the others waiting in the next collective).

``run_mpi`` prepends this folder to ``PYTHONPATH`` so scripts can ``from mpi_harness import
coll_assert``; pytest is not imported when the module is loaded outside pytest.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "HERE", "MPI_SCRIPTS", "MpiRun", "find_mpiexec", "mpi_env", "run_mpi", "check_mpi",
    "coll_assert", "rank_markers",
]

HERE = Path(__file__).resolve().parent
MPI_SCRIPTS = HERE / "mpi"

#: One-box settings (mpi4py's .ci/env.mpich and env.openmpi): no ssh, loopback only, and
#: yielding progress so oversubscribed ranks (4 ranks on 2 cores) do not spin each other out.
ONE_BOX_ENV = {
    "HYDRA_LAUNCHER": "fork",
    "MPIR_CVAR_CH3_INTERFACE_HOSTNAME": "127.0.0.1",
    "FI_PROVIDER": "tcp",
    "UCX_TLS": "tcp,sm,self",
    "MPIR_CVAR_POLLS_BEFORE_YIELD": "1",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "true",
    # Open MPI equivalents (ignored by MPICH)
    "OMPI_MCA_rmaps_base_oversubscribe": "true",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_mpi_yield_when_idle": "true",
    "OPENBLAS_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


class MpiRun(NamedTuple):
    """Result of one ``mpiexec`` run; ``timed_out`` is True when the hard deadline killed it."""

    returncode: int
    stdout: str
    stderr: str
    cmd: tuple = ()
    timed_out: bool = False

    def tail(self, lines=40):
        """The last ``lines`` lines of stdout and stderr, formatted for an assertion message."""
        out = "\n".join(self.stdout.splitlines()[-lines:])
        err = "\n".join(self.stderr.splitlines()[-lines:])
        head = f"$ {' '.join(self.cmd)}\nreturncode={self.returncode}"
        if self.timed_out:
            head += " (killed at the hard deadline)"
        return f"{head}\n--- stdout (tail) ---\n{out}\n--- stderr (tail) ---\n{err}"


def find_mpiexec():
    """``mpiexec`` next to ``sys.executable`` (the venv's MPICH wheel), else on PATH, else None."""
    from dpgather.cli import find_mpiexec as _find

    return _find()


def mpi_env(env=None, timeout=None):
    """``os.environ`` + one-box settings + ``MPIEXEC_TIMEOUT`` + this folder on ``PYTHONPATH``,
    then ``env`` (wins)."""
    full = dict(os.environ)
    full.update(ONE_BOX_ENV)
    if timeout is not None:
        full["MPIEXEC_TIMEOUT"] = str(max(1, int(timeout)))
    pp = full.get("PYTHONPATH", "")
    full["PYTHONPATH"] = str(HERE) + (os.pathsep + pp if pp else "")
    if env:
        full.update({k: str(v) for k, v in env.items()})
    return full


def _python_args(args):
    """``SCRIPT`` / ``[SCRIPT, *argv]`` / ``["-m", MODULE, *argv]`` -> arguments after python.

    A relative script path that does not exist from the cwd is looked up in ``tests/mpi/``.
    """
    if isinstance(args, (str, os.PathLike)):
        args = [args]
    args = [str(a) for a in args]
    if args and args[0] != "-m" and not args[0].startswith("-"):
        p = Path(args[0])
        if not p.is_absolute() and not p.exists() and (MPI_SCRIPTS / p).exists():
            args[0] = str(MPI_SCRIPTS / p)
    return args


def run_mpi(args, nprocs, timeout=60, env=None, cwd=None, mpiexec=None, mpiexec_args=()):
    """Run ``mpiexec -n NPROCS python ARGS...`` and return :class:`MpiRun` (never hangs).

    Args:
        args: a script path, or a sequence ``[script, *argv]`` or ``["-m", module, *argv]``.
        nprocs: number of ranks.
        timeout: seconds. Hydra gets ``MPIEXEC_TIMEOUT=timeout`` (it kills the job and exits
            non-zero); the subprocess gets a hard deadline ``timeout + 15`` after which the whole
            process group (mpiexec, proxies, ranks) is killed.
        env: extra environment variables (override the defaults).
        cwd: working directory (default: the repository root).
        mpiexec: the launcher (default :func:`find_mpiexec`).
        mpiexec_args: extra launcher flags placed before ``-n``.
    """
    launcher = mpiexec or find_mpiexec()
    if launcher is None:
        raise FileNotFoundError("no mpiexec next to sys.executable or on PATH")
    cmd = [launcher, *map(str, mpiexec_args), "-n", str(int(nprocs)), sys.executable, *_python_args(args)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=mpi_env(env, timeout), cwd=str(cwd or HERE.parent), start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout + 15)
        return MpiRun(proc.returncode, out, err, tuple(cmd))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return MpiRun(proc.returncode if proc.returncode is not None else -9, out, err, tuple(cmd), True)


def check_mpi(args, nprocs, timeout=60, env=None, markers=None, **kw):
    """:func:`run_mpi`, then assert exit code 0 (and ``markers``, see :func:`rank_markers`).

    The assertion message carries the command and the tails of stdout and stderr.
    """
    res = run_mpi(args, nprocs, timeout=timeout, env=env, **kw)
    assert res.returncode == 0 and not res.timed_out, f"mpiexec -n {nprocs} failed\n{res.tail()}"
    if markers is not None:
        missing = [m for m in rank_markers(markers, nprocs) if m not in res.stdout]
        assert not missing, f"missing markers {missing}\n{res.tail()}"
    return res


def rank_markers(marker, nprocs):
    """The per-rank pass lines scripts print: ``f"{marker} rank={r}/{nprocs}"``."""
    return [f"{marker} rank={r}/{nprocs}" for r in range(nprocs)]


# -- script side -------------------------------------------------------------------------------

def coll_assert(comm, ok, msg=""):
    """Collective assertion: raise ``AssertionError`` on *every* rank if ``ok`` is false on any.

    ``comm`` is an ``mpi4py.MPI.Comm``. One ``allreduce(LAND)`` on the good path; on failure the
    messages of the failing ranks are gathered so every rank reports all of them.
    """
    from mpi4py import MPI

    if comm.allreduce(bool(ok), op=MPI.LAND):
        return
    msgs = comm.allgather(None if ok else str(msg))
    bad = [f"rank {r}: {m}" for r, m in enumerate(msgs) if m is not None]
    raise AssertionError(f"collective assertion failed on {len(bad)}/{comm.size} ranks:\n" + "\n".join(bad))


# -- pytest fixtures (only when loaded by pytest, so MPI scripts don't pay for importing it) ------
if "pytest" in sys.modules or "_pytest" in sys.modules:
    import pytest

    import importlib.util

    def _skip_reason():
        if find_mpiexec() is None:
            return "no mpiexec found next to sys.executable or on PATH (pip install mpich mpi4py)"
        if importlib.util.find_spec("mpi4py") is None:
            return "mpi4py is not installed (pip install mpich mpi4py)"
        return None

    #: Mark/skip decorator for tests that launch mpiexec.
    needs_mpiexec = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

    @pytest.fixture(scope="session")
    def mpiexec_path():
        """Path of the launcher; skips the test when there is none (or no mpi4py)."""
        reason = _skip_reason()
        if reason is not None:
            pytest.skip(reason)
        return find_mpiexec()
