"""Run a dpgather command or a script under mpiexec and report every rank's exit code (harness results).

    mpiexec -n T python tests/mpi/run_cli.py -m MODULE [ARGS...]     (e.g. -m dpgather.tools.cli replay ...)
    mpiexec -n T python tests/mpi/run_cli.py SCRIPT [ARGS...]        (e.g. examples/tp_mlp_layer.py ...)

Launchers disagree on the job's exit code when ranks exit non-zero (Open MPI 4 under dpgather's
settings returns 0), so tests assert on the code each rank reports here (``rc``; a rank that
reports nothing died without an exit status). ``mpi_harness.ranks_exited_zero`` checks them.
"""

import os
import runpy
import sys

from mpi_harness import report

if len(sys.argv) < 2 or (sys.argv[1] == "-m" and len(sys.argv) < 3):
    raise SystemExit("usage: run_cli.py -m MODULE [ARGS...] | run_cli.py SCRIPT [ARGS...]")
rc = 0
try:
    if sys.argv[1] == "-m":
        module, args = sys.argv[2], sys.argv[3:]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, args = sys.argv[1], sys.argv[2:]
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` has it
        runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
report(rc=rc, failures=[])
sys.exit(rc)
