#!/usr/bin/env python3
"""``make test``'s driver: the whole suite, in a few pytest processes at once.

    python tests/parallel.py [PYTEST_ARGS...]

- Fewer than 16 usable cores (a CI box, a laptop): two processes. The tests that build or
  install the package in subprocesses (``@pytest.mark.install``: pip, the sdist, mypy; mostly
  waiting on pip and the compiler, no timing bound) run in the background, logged under
  ``build/test-logs/``; every other test runs in the foreground with its output on the terminal,
  in the order of one ``pytest`` run.
- JAX in the CPU processes runs on the CPU (``JAX_PLATFORMS=cpu``), and nowhere preallocates
  GPU memory (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), unless the environment says otherwise.
- 16 or more cores (a GPU node): ``DPGATHER_TEST_JOBS`` (default: 3 per 16 cores, at most 4; each
  process's MPI tests run up to 4 busy-polling ranks) processes
  over round-robin slices of the CPU tests, plus one process for the GPU tests (they need the
  GPUs to themselves), each logged under ``build/test-logs/``.

pytest's temporary folders lie outside the checkout. The summary line of each logged process is
printed as it ends, the failures of a failed one in full at the end; the exit status is the
worst of the processes'. ``DPGATHER_TEST_JOBS=1`` runs exactly ``python -m pytest -q
PYTEST_ARGS tests``, one process.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _signal_name(number):
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def main(argv):
    jobs = int(os.environ.get("DPGATHER_TEST_JOBS", "0") or 0)
    base = [sys.executable, "-m", "pytest", "-q", *argv]
    if jobs == 1:
        return subprocess.call([*base, "tests"], cwd=ROOT)
    if not jobs and _cores() < 16:
        shards = [("install", "install", False), ("rest", "rest", True)]  # (name, shard, on the terminal)
    else:
        jobs = jobs or min(4, _cores() * 3 // 16)
        shards = [(f"shard{k}", f"{k}/{jobs}", False) for k in range(jobs)] + [("gpu", "gpu", False)]
    logs = ROOT / "build" / "test-logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"tests/parallel.py: {len(shards)} pytest processes at once ({', '.join(n for n, _, _ in shards)}), "
          f"logs in {logs.relative_to(ROOT)}/", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="dpgather-tests-"))  # outside the checkout: tests look for it in paths
    procs = {}
    t0 = time.monotonic()
    for name, shard, terminal in shards:
        log = None if terminal else open(logs / f"{name}.log", "w")
        env = dict(os.environ, DPGATHER_TEST_SHARD=shard)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX takes what it uses, not 75% of a GPU
        if shard != "gpu":  # the CPU tests' JAX arrays are CPU arrays (the host backend's), and no
            env.setdefault("JAX_PLATFORMS", "cpu")  # CPU process holds a GPU the GPU tests need
        cmd = [*base, "-p", "no:cacheprovider", f"--basetemp={tmp / name}", "tests"]
        out = {} if terminal else {"stdout": log, "stderr": subprocess.STDOUT}
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, **out), log)
    worst = 0
    failed = []
    pending = []  # summary lines of logged processes, held while a process writes to the terminal
    while procs:
        for name, (p, log) in list(procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            del procs[name]
            rc = 0 if rc == 5 else rc  # 5: this process selected no test (no GPU here, a -k filter)
            if log is not None:
                log.close()
                text = (logs / f"{name}.log").read_text(errors="replace").rstrip().splitlines()
                pending.append(f"[{name}] {text[-1] if text else '(no output)'}  ({time.monotonic() - t0:.0f} s)")
            if rc < 0:  # killed by a signal (after its summary, too): a failure, whatever pytest printed
                pending.append(f"[{name}] exited by signal {-rc} ({_signal_name(-rc)})")
                rc = 128 - rc
            if rc:
                failed.append((name, log is not None))
                worst = max(worst, rc)
        if pending and all(log is not None for _, log in procs.values()):
            print("\n".join(pending), flush=True)
            pending.clear()
        time.sleep(0.5)
    for name, logged in failed:
        if not logged:
            continue  # its output is on the terminal already
        print(f"\n===== {name} (build/test-logs/{name}.log) =====")
        text = (logs / f"{name}.log").read_text(errors="replace")
        cut = text.find("= FAILURES =")
        cut = text.rfind("\n", 0, cut) if cut >= 0 else max(0, len(text) - 20000)
        print(text[cut:][-60000:])
    print(f"\n{'FAILED: ' + ', '.join(n for n, _ in failed) if failed else 'every process passed'} "
          f"in {time.monotonic() - t0:.0f} s", flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
