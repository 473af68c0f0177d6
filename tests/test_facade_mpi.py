"""DpAttention (host backend) under ``mpiexec -n T``: scenarios in ``tests/mpi/facade_scenarios.py``.

- ``matrix``: every divisor A of T x every policy x graph buckets off/on x dtype, every forward
  mode mixed per replica; every row of every output of sync / gather / scatter / gather_logits /
  scatter_logits / mask_topk_ids checked against a NumPy reference built from all ranks' inputs.
  One mpiexec run per T (two at T=4), each well under a minute on a 2-core box.
- ``soak``: 200 random steps (T=4; fewer at T=8 oversubscribed): rows checked every step, no arena
  allocation in the second half (after a max-size warm-up step, or with ``max_tokens_per_rank``).
- ``badinput``: a bad argument on one rank raises the named error on that rank at the call and
  on every rank by the next sync (strict=True: on every rank at the call, nothing moved), writes
  nothing of the caller's, and the next valid step works; ranks that disagree on the step (a
  stale plan, another contribution or operation) raise on every rank by the next sync; a
  constructor argument invalid or different on one rank raises the same ConfigError everywhere.

Every run has a hard time limit (``mpi_harness.run_mpi``): a hang fails the test. Every rank
reports its result (``mpi_harness.report``); the tests assert on those results.
"""

import os

import pytest

from mpi_harness import MPI_SCRIPTS, check_mpi, needs_mpiexec

SCRIPT = MPI_SCRIPTS / "facade_scenarios.py"

pytestmark = [pytest.mark.mpi, needs_mpiexec]


def _run(nprocs, *argv, timeout=150, env=None):
    res = check_mpi([SCRIPT, *map(str, argv)], nprocs, timeout=timeout, env=env)
    print(res.results[0])
    return res


# (T, dtypes): T=4 is split in two so each run stays short (one mpiexec run costs ~1 s of start-up).
MATRIX = [
    (1, "float32,float16,bfloat16,int32"),
    (2, "float32,float16,bfloat16,int32"),
    (3, "float32,int32,float16,bfloat16"),
    (4, "float32,float16"),
    (4, "bfloat16,int32"),
]


@pytest.mark.parametrize("nprocs,dtypes", MATRIX, ids=[f"T{t}-{d.replace(',', '+')}" for t, d in MATRIX])
def test_matrix(nprocs, dtypes):
    res = _run(nprocs, "matrix", "--dtypes", dtypes, "--seed", 1000 + nprocs)
    # every configuration of the split ran its 10 steps (divisors x 5 policies x graph off/on)
    ndiv = sum(1 for a in range(1, nprocs + 1) if nprocs % a == 0)
    configs = ndiv * 5 * 2 * len(dtypes.split(","))
    for r, got in res.results.items():
        assert (got["configs"], got["steps"]) == (configs, configs * 10), got


@pytest.mark.parametrize("nprocs,transport,dtypes", [(2, "nccl", "float32,bfloat16"), (4, "nccl", "float16"),
                                                     (3, "p2p", "bfloat16,int32"), (2, "push", "float16,int32"),
                                                     (4, "push", "bfloat16,float32")])
def test_matrix_transport(nprocs, transport, dtypes):
    # the default matrix runs transport="auto" (the push for decode-sized steps, the pull for
    # the larger ones, on one node): the collectives' path ("nccl": MPI on the host backend),
    # forced pull and forced push get their own runs
    _run(nprocs, "matrix", "--dtypes", dtypes, "--transport", transport, "--seed", 77 + nprocs)


@pytest.mark.parametrize("nprocs,nodes,A,transport", [(4, 2, "1,2", "p2p"), (2, 2, "1", "p2p"), (4, 2, "1,2", "push")],
                         ids=["T4-2nodes", "T2-2nodes", "T4-2nodes-push"])
def test_matrix_p2p_pretend_nodes(nprocs, nodes, A, transport):
    # a P2P transport (the pull, the push) inside each (pretend) node, the node blocks over the
    # inter-node communicator: every policy, graph buckets off/on, every forward mode, every row
    # against the reference
    res = _run(nprocs, "matrix", "--dtypes", "bfloat16,int32", "--A", A, "--transport", transport,
               "--seed", 4242 + nprocs, env={"DPGATHER_P2P_NODES": nodes})
    configs = len(A.split(",")) * 5 * 2 * 2
    for got in res.results.values():
        assert (got["configs"], got["steps"]) == (configs, configs * 10), got


def test_matrix_T8_oversubscribed():
    # 8 ranks on 2 cores: every divisor A (1, 2, 4, 8), three policies, bfloat16
    _run(8, "matrix", "--dtypes", "bfloat16", "--policies", "auto,sglang,varlen", "--steps", "10",
         "--seed", 8008)


SOAK = [
    # (T, argv): the max-size warm-up and the max_tokens_per_rank preallocation, with and
    # without graph buckets; A fixed per run (random divisor from the seed at T=8)
    (4, ("--A-soak", 2, "--prealloc", 0, "--graph", 0, "--dtypes", "bfloat16")),
    (4, ("--A-soak", 1, "--prealloc", 1, "--graph", 1, "--dtypes", "float16")),
    (8, ("--steps", 60, "--prealloc", 0, "--graph", 1, "--dtypes", "bfloat16", "--seed", 88)),
    (8, ("--steps", 60, "--prealloc", 1, "--graph", 0, "--dtypes", "float32", "--seed", 7)),
]


@pytest.mark.parametrize("nprocs,argv", SOAK, ids=[f"T{t}-" + "-".join(map(str, a[:4])) for t, a in SOAK])
def test_soak(nprocs, argv):
    res = _run(nprocs, "soak", "--hidden", 8, "--check-every", 4, *argv)
    assert all(r["checks"] > 0 for r in res.results.values())


FUZZ = int(os.environ.get("DPGATHER_FUZZ_EXAMPLES", "0") or 0)


@pytest.mark.skipif(not FUZZ, reason="the 500-step soak per policy runs in `make fuzz`")
@pytest.mark.parametrize("policy", ["auto", "sglang", "max_len", "sum_len", "varlen"])
def test_soak_500_steps_per_policy(policy):
    res = _run(4, "soak", "--hidden", 8, "--steps", 500, "--soak-policy", policy, "--graph", 1,
               "--dtypes", "bfloat16", "--check-every", 1, "--seed", 500, timeout=900)
    assert all(r["checks"] > 0 for r in res.results.values())


@pytest.mark.parametrize("nprocs", [2, 4])
@pytest.mark.parametrize("part", ["data,strict,config", "step"])
def test_badinput(nprocs, part):
    # --timeout: a desynchronised rank turns into CollectiveTimeout (a failure) well before the
    # harness deadline; the step part desynchronises ranks on purpose, so it runs with a short one
    _run(nprocs, "badinput", "--part", part, "--timeout", 3 if part == "step" else 10, timeout=120)
