"""A replay with one wrong value: verification must fail (exit 1) and name the step.

    mpiexec -n T python tests/mpi/replay_corrupt.py STEP OUT [replay flags ...]

The product has no test hook. This script replaces :class:`dpgather.DpAttention` (the name the
replay looks up) by a subclass whose ``gather_logits`` returns, on rank 0 and at the STEP-th
step of each replay (counting ``sync`` calls from 0), its first element plus one; then it runs
the ordinary ``dpgather replay --verify --out OUT`` with the extra flags. Every rank reports
(harness results) the replay's exit code and the steps it corrupted.
"""

import sys

from mpi4py import MPI

import dpgather as dg
from mpi_harness import report

from dpgather.tools.cli import main

TARGET = int(sys.argv[1])
OUT = sys.argv[2]
RANK = MPI.COMM_WORLD.Get_rank()
corrupted = []


class CorruptingDpAttention(dg.DpAttention):
    """DpAttention with one wrong logits value at step TARGET on rank 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._replay_step = -1

    def sync(self, batch):
        self._replay_step += 1
        return super().sync(batch)

    def gather_logits(self, rows, plan):
        out = super().gather_logits(rows, plan)
        if RANK == 0 and self._replay_step == TARGET and out.shape[0]:
            out[0, 0] = out[0, 0] + 1
            corrupted.append(self._replay_step)
        return out


dg.DpAttention = CorruptingDpAttention
rc = main(["replay", "--verify", "--out", OUT, "--progress", "off", *sys.argv[3:]])
report(rc=rc, corrupted=corrupted)
sys.exit(rc)
