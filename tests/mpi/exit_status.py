"""Rank 1 ends as ``sys.argv[1]`` says; the others exit 0. No MPI: only the launcher matters.

    ok      every rank exits 0          exit3   rank 1: sys.exit(3)
    raise   rank 1: uncaught exception  kill    rank 1: SIGKILL to itself
    osexit  rank 1: os._exit(0) (no exit status recorded)
"""

import os
import signal
import sys

from dpgather.tools._rankexit import _rank

mode = sys.argv[1]
if _rank() == 1:
    if mode == "exit3":
        sys.exit(3)
    if mode == "raise":
        raise RuntimeError("rank 1 fails on purpose")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "osexit":
        os._exit(0)
