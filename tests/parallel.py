#!/usr/bin/env python3
"""``make test``'s driver: the whole suite, in parallel shards on many-core nodes.

    python tests/parallel.py [PYTEST_ARGS...]

With fewer than 16 usable cores (a CI box, a laptop) it is exactly ``python -m pytest -q
PYTEST_ARGS tests``. On a GPU node with many cores it runs ``DPGATHER_TEST_JOBS`` (default:
cores // 8, at most 4) pytest processes over round-robin slices of the CPU tests, plus one
process for the GPU tests (they need the GPUs to themselves), at the same time; each writes its
log under ``build/test-logs/`` (pytest's temporary folders outside the checkout); the summary line of each is printed as it ends, the failures of
a failed shard in full at the end. The exit status is the worst of the shards'.
``DPGATHER_TEST_JOBS=1`` forces the single process.
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


def main(argv):
    jobs = int(os.environ.get("DPGATHER_TEST_JOBS", "0") or 0) or (1 if _cores() < 16 else min(4, _cores() // 8))
    base = [sys.executable, "-m", "pytest", "-q", *argv]
    if jobs <= 1:
        return subprocess.call([*base, "tests"], cwd=ROOT)
    logs = ROOT / "build" / "test-logs"
    logs.mkdir(parents=True, exist_ok=True)
    shards = [f"{k}/{jobs}" for k in range(jobs)] + ["gpu"]
    print(f"tests/parallel.py: {len(shards)} pytest processes at once ({jobs} CPU shards + the GPU tests), "
          f"logs in {logs.relative_to(ROOT)}/", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="dpgather-tests-"))  # outside the checkout: tests look for it in paths
    procs = {}
    t0 = time.monotonic()
    for s in shards:
        name = "gpu" if s == "gpu" else f"shard{s.split('/')[0]}"
        log = open(logs / f"{name}.log", "w")
        env = dict(os.environ, DPGATHER_TEST_SHARD=s)
        cmd = [*base, "-p", "no:cacheprovider", f"--basetemp={tmp / name}", "tests"]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    worst = 0
    failed = []
    while procs:
        for name, (p, log) in list(procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            log.close()
            del procs[name]
            text = (logs / f"{name}.log").read_text(errors="replace").rstrip().splitlines()
            last = text[-1] if text else "(no output)"
            rc = 0 if rc == 5 else rc  # 5: this shard selected no test (no GPU here)
            print(f"[{name}] {last}  ({time.monotonic() - t0:.0f} s)", flush=True)
            if rc:
                failed.append(name)
                worst = max(worst, rc)
        time.sleep(0.5)
    for name in failed:
        print(f"\n===== {name} (build/test-logs/{name}.log) =====")
        text = (logs / f"{name}.log").read_text(errors="replace")
        cut = text.find("= FAILURES =")
        cut = text.rfind("\n", 0, cut) if cut >= 0 else max(0, len(text) - 20000)
        print(text[cut:][-60000:])
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'every shard passed'} "
          f"in {time.monotonic() - t0:.0f} s", flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
