"""Run a dpgather command under mpiexec and report every rank's exit code (harness results).

    mpiexec -n T python tests/mpi/run_cli.py -m MODULE [ARGS...]     (e.g. -m dpgather.tools.cli replay ...)

Launchers disagree on the job's exit code when ranks exit non-zero (Open MPI 4 under dpgather's
settings returns 0), so tests assert on the code each rank reports here (``rc``).
"""

import runpy
import sys

from mpi_harness import report

if len(sys.argv) < 3 or sys.argv[1] != "-m":
    raise SystemExit("usage: run_cli.py -m MODULE [ARGS...]")
module, args = sys.argv[2], sys.argv[3:]
sys.argv = [module, *args]
rc = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
report(rc=rc, failures=[])
sys.exit(rc)
