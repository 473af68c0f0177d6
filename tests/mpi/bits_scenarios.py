"""Every gather moves bits exactly: ``mpiexec -n T python bits_scenarios.py [--seed S]``.

For every A in {1, 2} dividing T, every transport of the host backend (``nccl``: the MPI
collectives; ``p2p``: the shared-memory P2P twin), every padding mode (the policy forced:
``max_len``, ``sum_len``, ``varlen``) and every dtype (float32, float16, bfloat16, int32, int64,
uint8), a few steps of decode batches (an idle replica, a replica that provides fewer rows than
its ``n``, one that provides more) run ``gather(replicate)``, ``gather(partial)`` and
``gather_logits``, each into a poisoned arena, with rows full of values arithmetic would change:
``-0.0``, signalling NaNs with payloads (both signs), quiet NaNs with payloads, infinities,
subnormals, integers at their extremes; the partial summands put ``-0.0`` in every summand of
some elements (a ``-0.0`` sum). Every element is compared **as bits** (viewed as unsigned
integers) with the NumPy reference of ``tests/bit_patterns.py``:

- replicate and ``A = 1``: the bytes of the row's one contributor; ``+0.0`` bits elsewhere.
- partial with ``A = 2``: the sum of the two summands in the dtype's arithmetic (float16 and
  bfloat16 in float32, rounded once; integers wrap); where both summands are NaN the result
  must be a NaN (its payload is the hardware's choice of operand order), everywhere else the
  bits must match, ``-0.0`` sums included; the rows past a replica's provided rows ``+0.0``.

Besides, the replicate and ``A = 1`` gathers must not warn (no arithmetic touches the bits).
Each rank reports its failures through ``scenario_kit.finish``.
"""

import argparse
import traceback
import warnings

from mpi4py import MPI

import dpgather as dg
from bit_patterns import DTYPES, BitStep, bits_differ
from facade_scenarios import poison_arena
from scenario_kit import CHK, finish, poisoned_alloc

WORLD = MPI.COMM_WORLD
RANK, T = WORLD.Get_rank(), WORLD.Get_size()
H = 6  # row width in elements
POLICY_MODE = {"max_len": dg.PaddingMode.MAX_LEN, "sum_len": dg.PaddingMode.SUM_LEN,
               "varlen": dg.PaddingMode.VARLEN}
SEED = 26


def run_config(A, transport, policy, name, steps):
    dp = dg.DpAttention(comm=WORLD, attn_tp_size=A, hidden_size=H, dtype=name, backend="host", policy=policy,
                        transport=transport, timeout_s=30.0)
    dp._arenas[0]._alloc = poisoned_alloc  # fresh arena memory is poisoned too (test only)
    d_own = RANK // A
    try:
        for s in range(steps):
            st = BitStep(dg, SEED, T, A, name, H, s)
            CHK.ctx = f"A={A} transport={transport} policy={policy} dtype={name} step={s} n={st.n} rows={st.rows}"
            plan = dp.sync(st.batches[d_own])
            if plan.skip:
                continue
            CHK.ok(plan.mode == POLICY_MODE[policy], lambda: f"plan mode {plan.mode.name}, forced {policy}")
            CHK.ok(plan.transport == transport, lambda: f"plan transport {plan.transport}, forced {transport}")
            cases = (("gather(replicate)", False, st.x_rep[d_own], lambda x: dp.gather(x, plan, contribution="replicate")),
                     ("gather(partial)", True, st.x_part[RANK], lambda x: dp.gather(x, plan, contribution="partial")),
                     ("gather_logits", False, st.x_rep[d_own], lambda x: dp.gather_logits(x[:plan.logits_tokens[d_own]], plan)))
            for what, partial, x, call in cases:
                poison_arena(dp)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    got = call(x)
                ref, nan_only = st.reference(plan, partial, logits=what == "gather_logits")
                CHK.shape(what, got, ref.shape, ref.dtype)
                err = bits_differ(got, ref, nan_only, name)
                CHK.ok(err is None, lambda: f"{what}: {err}")
                if not partial or A == 1:  # one contributor per row: no arithmetic, no warning
                    CHK.ok(not caught, lambda: f"{what} warned: {[str(w.message) for w in caught]}")
    finally:
        dp.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=26)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--transports", default="nccl,p2p")
    ap.add_argument("--A", default="1,2", help="attn_tp sizes (those dividing T run)")
    args = ap.parse_args()
    global SEED
    SEED = args.seed
    configs = 0
    try:
        for A in (a for a in map(int, args.A.split(",")) if T % a == 0):
            for transport in args.transports.split(","):
                for policy in POLICY_MODE:
                    for name in args.dtypes.split(","):
                        run_config(A, transport, policy, name, args.steps)
                        configs += 1
    except BaseException:  # noqa: BLE001 - reported; the harness asserts on it
        CHK.fails.append(f"ERROR at {CHK.ctx}:\n{traceback.format_exc()}")
    finish("bits", {"configs": configs})


if __name__ == "__main__":
    main()
