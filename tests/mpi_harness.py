"""Run scripts under ``mpiexec`` from pytest, time-limited and hang-proof; results as JSON per rank.

Two halves:

- pytest side: :func:`run_mpi` / :func:`check_mpi` launch ``mpiexec -n N python SCRIPT ARGS...``
  in its own process group with the one-box settings of :mod:`dpgather.tools.launch` (MPICH or
  Open MPI, detected from the launcher), ``MPIEXEC_TIMEOUT`` and a hard ``subprocess`` deadline
  (the whole group is killed if the launcher does not stop in time). They return
  :class:`MpiRun` with the exit code, the output and ``results``: the JSON object every rank
  wrote with :func:`report`. Tests assert on ``results`` — exit codes alone are not enough (Open
  MPI 4 returns 0 when ranks exit non-zero without aborting the job).
- script side (under MPI): :func:`report` writes this rank's result; :func:`coll_assert` makes an
  assertion fail on every rank together (a failure on some ranks only would leave the others
  waiting in the next collective).

``run_mpi`` prepends this folder to ``PYTHONPATH`` so scripts can ``from mpi_harness import
report``; pytest is not imported when the module is loaded outside pytest.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "HERE", "MPI_SCRIPTS", "MpiRun", "find_mpiexec", "launcher", "run_mpi", "run_local", "check_mpi",
    "assert_ok", "report", "coll_assert",
]

HERE = Path(__file__).resolve().parent
MPI_SCRIPTS = HERE / "mpi"
RESULTS_VAR = "DPGATHER_TEST_RESULTS"


class MpiRun(NamedTuple):
    """Result of one ``mpiexec`` run.

    Attributes:
        returncode: the launcher's exit code (``-9`` when killed at the hard deadline).
        stdout, stderr: the job's output. cmd: the command.
        timed_out: the hard deadline killed the job.
        results: ``{rank: dict}`` — what each rank passed to :func:`report` (ranks that wrote
            nothing are missing).
        wall_s: seconds from launch to the end of the job.
    """

    returncode: int
    stdout: str
    stderr: str
    cmd: tuple = ()
    timed_out: bool = False
    results: dict = {}
    wall_s: float = 0.0

    def tail(self, lines=40):
        """The last ``lines`` lines of stdout and stderr and the results, for an assertion message."""
        out = "\n".join(self.stdout.splitlines()[-lines:])
        err = "\n".join(self.stderr.splitlines()[-lines:])
        head = f"$ {' '.join(self.cmd)}\nreturncode={self.returncode} wall={self.wall_s:.1f}s"
        if self.timed_out:
            head += " (killed at the hard deadline)"
        res = json.dumps(self.results, indent=None, default=str)[-4000:]
        return f"{head}\n--- results ---\n{res}\n--- stdout (tail) ---\n{out}\n--- stderr (tail) ---\n{err}"

    def failures(self):
        """Every failure message the ranks reported, prefixed with the rank."""
        return [f"rank {r}: {m}" for r, res in sorted(self.results.items()) for m in res.get("failures", [])]


def find_mpiexec():
    """``mpiexec`` next to ``sys.executable`` (a venv's MPI wheel), else on PATH, else None."""
    from dpgather.tools.launch import find_mpiexec as _find

    return _find()


def launcher(mpiexec=None):
    """The detected :class:`dpgather.tools.launch.Launcher` (or None)."""
    from dpgather.tools.launch import detect

    return detect(mpiexec)


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


def run_mpi(args, nprocs, timeout=60, env=None, cwd=None, mpiexec=None, mpiexec_args=(), recovery=False):
    """Run ``mpiexec -n NPROCS python ARGS...`` and return :class:`MpiRun` (never hangs).

    Args:
        args: a script path, or a sequence ``[script, *argv]`` or ``["-m", module, *argv]``.
        nprocs: number of ranks.
        timeout: seconds. The launcher gets ``MPIEXEC_TIMEOUT=timeout`` where it reads it; the
            subprocess gets a hard deadline ``timeout + 15`` after which the whole process group
            (launcher, daemons, ranks) is killed.
        env: extra environment variables (override everything else).
        cwd: working directory (default: the repository root).
        mpiexec: the launcher (default :func:`find_mpiexec`).
        mpiexec_args: extra launcher flags placed before ``-n``.
        recovery: keep the job running when a rank dies (fault tests; see dpgather.tools.launch).
    """
    import time

    from dpgather.tools.launch import detect, launch_env

    found = detect(mpiexec)
    if found is None:
        raise FileNotFoundError("no mpiexec next to sys.executable or on PATH")
    full, flags = launch_env(found, timeout=timeout, recovery=recovery)
    pp = full.get("PYTHONPATH", "")
    full["PYTHONPATH"] = str(HERE) + (os.pathsep + pp if pp else "")
    results_dir = tempfile.mkdtemp(prefix="dpg-results-")
    full[RESULTS_VAR] = results_dir
    if env:
        full.update({k: str(v) for k, v in env.items()})
    cmd = [found.path, *flags, *map(str, mpiexec_args), "-n", str(int(nprocs)), sys.executable,
           *_python_args(args)]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env=full, cwd=str(cwd or HERE.parent), start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout + 15)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
    wall = time.monotonic() - t0
    rc = proc.returncode if proc.returncode is not None else -9
    return MpiRun(rc, out, err, tuple(cmd), timed_out, _collect(results_dir), wall)


def run_local(args, timeout=300, env=None):
    """Run ``python ARGS...`` as one process (no launcher) with the same result collection as
    :func:`run_mpi` (a script's :func:`report` lands in ``results[0]``)."""
    import time

    results_dir = tempfile.mkdtemp(prefix="dpg-results-")
    full = dict(os.environ)
    pp = full.get("PYTHONPATH", "")
    full["PYTHONPATH"] = str(HERE) + (os.pathsep + pp if pp else "")
    full[RESULTS_VAR] = results_dir
    full.update({k: str(v) for k, v in (env or {}).items()})
    cmd = [sys.executable, *_python_args(args)]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full,
                           cwd=str(HERE.parent), stdin=subprocess.DEVNULL)
        rc, out, err, timed_out = p.returncode, p.stdout, p.stderr, False
    except subprocess.TimeoutExpired as e:
        rc, out, err, timed_out = -9, e.stdout or "", e.stderr or "", True
    return MpiRun(rc, out if isinstance(out, str) else out.decode(), err if isinstance(err, str) else err.decode(),
                  tuple(cmd), timed_out, _collect(results_dir), time.monotonic() - t0)


def _collect(results_dir):
    """``{rank: result}`` from the JSON files ranks wrote; removes the folder."""
    results = {}
    for name in sorted(os.listdir(results_dir)):
        if name.startswith("rank") and name.endswith(".json"):
            try:
                with open(os.path.join(results_dir, name)) as f:
                    results[int(name[4:-5])] = json.load(f)
            except (OSError, ValueError):
                pass
        try:
            os.unlink(os.path.join(results_dir, name))
        except OSError:
            pass
    try:
        os.rmdir(results_dir)
    except OSError:
        pass
    return results


def assert_ok(res, nprocs, what):
    """Assert a run ended in time, every rank reported, and no rank reported a failure."""
    assert not res.timed_out, f"{what} hung\n{res.tail()}"
    missing = [r for r in range(nprocs) if r not in res.results]
    assert not missing, f"ranks {missing} reported no result\n{res.tail()}"
    bad = res.failures() or [f"rank {r}: ok=false" for r, v in res.results.items() if not v.get("ok")]
    assert not bad, "\n".join(bad[:40]) + f"\n{res.tail()}"
    assert res.returncode == 0, f"{what} exited {res.returncode}\n{res.tail()}"


def check_mpi(args, nprocs, timeout=60, env=None, **kw):
    """:func:`run_mpi`, then assert: the job ended in time with exit code 0, every rank reported,
    and every rank's result has ``ok`` true. Returns the :class:`MpiRun`.

    The assertion message carries the command, the results and the tails of stdout and stderr.
    """
    res = run_mpi(args, nprocs, timeout=timeout, env=env, **kw)
    assert_ok(res, nprocs, f"mpiexec -n {nprocs}")
    return res


# -- script side -------------------------------------------------------------------------------

def report(rank=None, **fields):
    """Write this rank's result (a JSON object) for the harness; ``ok`` defaults to no ``failures``.

    Args:
        rank: this rank (default: ``MPI.COMM_WORLD`` rank).
        **fields: JSON-serialisable values; ``failures`` (a list of messages) and ``ok`` are
            what :func:`check_mpi` asserts on.

    Outside the harness (no ``DPGATHER_TEST_RESULTS``) the result is printed instead.
    """
    if rank is None:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    fields.setdefault("failures", [])
    fields.setdefault("ok", not fields["failures"])
    fields["rank"] = int(rank)
    text = json.dumps(fields, default=str)
    folder = os.environ.get(RESULTS_VAR)
    if not folder:
        print(text, flush=True)
        return
    path = os.path.join(folder, f"rank{int(rank)}.json")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def ranks_exited_zero(res, nprocs):
    """A job run through ``tests/mpi/run_cli.py``: every one of ``nprocs`` ranks reported, and
    reported exit code 0 (the launcher's own code is not enough: Open MPI 4 may return 0 when
    ranks fail). Returns ``(ok, message)``."""
    rcs = {r: res.results[r].get("rc") for r in sorted(res.results)}
    return sorted(rcs) == list(range(nprocs)) and set(rcs.values()) == {0}, \
        f"per-rank exit codes {rcs} (want 0 from each of {nprocs} ranks)\n{res.tail()}"


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


def transports_as_expected(seen, T, backend, transport):
    """Check the smoke scripts' DpAttention transports: ``seen`` holds ``(A, info()["transport"],
    info()["p2p_node_size"])`` of every DpAttention of the process, the first included. The transport
    depends only on A: P2P where the machine has it (some DpAttention got it) and a node holds
    whole replicas (``DPGATHER_P2P_NODES`` pretends several nodes), else the collectives.
    Returns ``(ok, message)``."""
    nodes = int(os.environ.get("DPGATHER_P2P_NODES") or 1)
    here = any(t == "p2p" for _, t, _ in seen)
    want = set()
    for A in sorted({a for a, _, _ in seen}):
        ok = here and transport != "nccl" and T > 1 and (T // nodes) % A == 0
        want.add((A, "p2p" if ok else ("nccl" if backend == "cuda" else "mpi"), T // nodes if ok else 0))
    return set(seen) == want, f"DpAttention transports per A: got {sorted(seen)}, want {sorted(want)}"

