#!/usr/bin/env python3
"""The CUDA backend's ``wrap`` / ``export`` and its GPU placement, on a GPU node (docs/interop.md).

    python tests/gpu/interop_smoke.py arrays            # one process: every framework installed here
    mpirun -n 2 python tests/gpu/interop_smoke.py placement

``arrays``: PyTorch (bf16, fp16, fp32; legacy and versioned capsules), JAX (bf16, fp32), CuPy
(uint16 storage, and CuPy's own bfloat16 where CuPy >= 14 has it) and a plain DLPack forwarder
come in without copying (same device pointer) and go back out as the caller's framework, dtype
and device, zero-copy; a cached PyTorch result handed out again on another torch stream is ordered
after the CuPy stream that wrote it; a CPU tensor and (with 2 GPUs) a tensor on the other GPU are
refused by name; the JAX path never imports PyTorch (a subprocess). ``placement``: every rank
asking for cuda:0 is refused on every rank naming the ranks; with 2 GPUs, ranks swapped onto
cuda:1 / cuda:0 form a working NCCL communicator. Each rank reports with ``mpi_harness.report``.
"""

import argparse
import os
import subprocess
import sys

import numpy as np

from dlpack_producer import Forward
from mpi_harness import report

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mpi"))  # scenario_kit
from scenario_kit import Checker  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("what", choices=("arrays", "placement", "nojax-torch"))
args = ap.parse_args()
tally = Checker(tol=0)
check = tally.check


def ptr_of(a):
    return a.data.ptr


def arrays():
    import cupy
    from mpi4py import MPI

    from dpgather import InputError
    from dpgather._backends import make_backend

    be = make_backend("cuda", 0)
    comm = be.communicator(MPI.COMM_SELF, 60)
    dev = be.device.id
    check("the backend took the device asked for", dev == 0 and cupy.cuda.Device().id == 0)
    H = 40
    ref = np.arange(3 * H, dtype=np.float32).reshape(3, H) % 97
    view = be.alloc(1 << 16)[256:256 + 3 * H * 4]  # an arena-like view (2 or 4 bytes per element below)

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        for name, tdt in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
            x = torch.from_numpy(ref).to(device=f"cuda:{dev}", dtype=tdt)
            arr, origin = be.wrap(x, "x")
            check(f"torch {name} in: zero-copy", ptr_of(arr) == x.data_ptr())
            check(f"torch {name} in: storage dtype", arr.dtype == (np.uint16 if name == "bfloat16" else np.dtype(name)))
            v = view[:arr.nbytes].view(arr.dtype).reshape(arr.shape)
            v[...] = arr
            y = be.export(v, origin)
            check(f"torch {name} out: a torch {name} tensor on cuda:{dev}",
                  isinstance(y, torch.Tensor) and y.dtype == tdt and y.device == torch.device("cuda", dev))
            check(f"torch {name} out: zero-copy", y.data_ptr() == v.data.ptr)
            check(f"torch {name} out: values", torch.equal(y.float().cpu(), torch.from_numpy(ref)))
        # a versioned capsule straight from torch (DLPack 1.0) is what wrap asked for
        caps = torch.zeros(2, 2, device=f"cuda:{dev}").__dlpack__(max_version=(1, 0))
        check("torch gives a DLPack capsule", type(caps).__name__ == "PyCapsule")
        # a cached result handed out on another torch stream: ordered after our stream's writes
        big = cupy.zeros((4096, 4096), np.float32)
        _, origin = be.wrap(torch.zeros(1, 1, device=f"cuda:{dev}"), "x")
        check("an array that owns its memory is exported, not cached",
              be.export(big, origin).data_ptr() == big.data.ptr and be._exports.get(big, False) is None)
        bview = big[:4096]  # a view (as arena views are): cached
        be.export(bview, origin)
        side = torch.cuda.Stream(device=dev)
        writer = cupy.cuda.Stream(non_blocking=True)
        for rep in range(3):
            with writer:
                bview.fill(rep + 1)  # CuPy's current stream writes...
                with torch.cuda.stream(side):
                    t = be.export(bview, origin)  # ...torch's current stream reads the cached view
                    s = float(t[-1, -1].item())
            check(f"cached torch export {rep}: ordered after the CuPy stream's write", s == rep + 1)
        cpu = torch.zeros(2, H)
        try:
            be.wrap(cpu, "x")
            check("a CPU tensor is refused", False)
        except InputError as e:
            check(f"a CPU tensor is refused by name: {e}", "x is on cpu:0" in str(e))
        if cupy.cuda.runtime.getDeviceCount() > 1:
            other = torch.zeros(2, H, device="cuda:1")
            try:
                be.wrap(other, "Y")
                check("a tensor on another GPU is refused", False)
            except InputError as e:
                check(f"a tensor on another GPU is refused: {e}", "Y is on cuda:1, but this DpAttention uses cuda:0" in str(e))

    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        jax = None
    if jax is not None:
        jdev = [d for d in jax.devices("gpu") if d.local_hardware_id == dev][0]
        for name in ("bfloat16", "float32"):
            x = jax.device_put(jnp.asarray(ref, dtype=name), jdev)
            arr, origin = be.wrap(x, "x")
            check(f"jax {name} in: zero-copy", ptr_of(arr) == x.unsafe_buffer_pointer())
            v = view[:arr.nbytes].view(arr.dtype).reshape(arr.shape)
            v[...] = arr
            y = be.export(v, origin)
            check(f"jax {name} out: a JAX {name} array on the GPU",
                  isinstance(y, jax.Array) and str(y.dtype) == name and next(iter(y.devices())) == jdev)
            check(f"jax {name} out: zero-copy", y.unsafe_buffer_pointer() == v.data.ptr)
            check(f"jax {name} out: values", np.array_equal(np.asarray(y.astype(jnp.float32)), ref))
        try:
            be.wrap(x, "out", writable=True)
            check("a JAX out= is refused", False)
        except InputError as e:
            check(f"a JAX out= is refused: {e}", "immutable" in str(e))

    u = cupy.asarray(ref.astype(np.float16)).view(np.uint16)
    arr, origin = be.wrap(u, "x")
    check("CuPy in, CuPy out, untouched", arr is u and origin is None and be.export(arr, origin) is arr)
    try:
        import ml_dtypes

        b = cupy.asarray(ref.astype(ml_dtypes.bfloat16).view(np.uint16)).view(ml_dtypes.bfloat16)
    except Exception:  # noqa: BLE001 - CuPy < 14: no bfloat16 dtype
        b = None
    if b is not None:
        arr, origin = be.wrap(b, "x")
        out = be.export(arr, origin)
        check("CuPy bfloat16 in: uint16 storage, CuPy bfloat16 out",
              arr.dtype == np.uint16 and out.dtype.name == "bfloat16" and out.data.ptr == b.data.ptr)

    f = cupy.asarray(ref)
    arr, origin = be.wrap(Forward(f), "x")
    check("any DLPack producer in: zero-copy, a CuPy array back",
          arr.data.ptr == f.data.ptr and isinstance(be.export(arr, origin), cupy.ndarray))
    comm.close()
    be.close()

    if jax is not None:  # the JAX path, in a process without PyTorch
        res = subprocess.run([sys.executable, __file__, "nojax-torch"], capture_output=True, text=True, timeout=300)
        check(f"the JAX path never imports torch: {res.stdout.strip()} {res.stderr[-500:]}",
              res.returncode == 0 and res.stdout.strip().endswith("torch imported: False"))


def jax_without_torch():
    import jax
    import jax.numpy as jnp
    from mpi4py import MPI

    from dpgather._backends import make_backend

    be = make_backend("cuda", None)
    comm = be.communicator(MPI.COMM_SELF, 60)
    x = jax.device_put(jnp.ones((4, 8), jnp.bfloat16), [d for d in jax.devices("gpu")
                                                          if d.local_hardware_id == be.device.id][0])
    arr, origin = be.wrap(x, "x")
    y = be.export(arr.copy(), origin)
    assert str(y.dtype) == "bfloat16", y.dtype
    comm.close()
    print(f"torch imported: {'torch' in sys.modules}")


def placement():
    import cupy
    from mpi4py import MPI

    from dpgather import ConfigError
    from dpgather._backends import make_backend

    world = MPI.COMM_WORLD
    count = cupy.cuda.runtime.getDeviceCount()
    try:
        make_backend("cuda", 0).communicator(world, 60)
        check("two ranks on cuda:0 are refused", False)
    except ConfigError as e:
        check(f"two ranks on cuda:0 are refused on every rank: {e}",
              "rank 0 (cuda:0) and rank 1 (cuda:0) use the same GPU" in str(e))
    if count < world.size:  # the default rule (node-local rank modulo the GPUs) puts two ranks on one GPU
        try:
            make_backend("cuda", None).communicator(world, 60)
            check("more ranks than GPUs on a node are refused", False)
        except ConfigError as e:
            check(f"more ranks than GPUs on a node are refused: {e}", "use the same GPU" in str(e))
    try:
        make_backend("cuda", 7 + count).communicator(world, 60)
        check("a device that does not exist is refused", False)
    except ConfigError as e:
        check(f"a device that does not exist is refused: {e}", "asked for cuda:" in str(e))
    if world.size == 2 and count >= 2:
        be = make_backend("cuda", 1 - world.rank)  # swapped: rank 0 on cuda:1, rank 1 on cuda:0
        comm = be.communicator(world, 60)
        x = cupy.full((2, 4), world.rank + 1, np.float32)
        y = cupy.empty_like(x)
        comm.all_reduce(x, y)
        comm.wait()
        check("swapped devices: the NCCL communicator works on them",
              be.device.id == 1 - world.rank and x.device.id == 1 - world.rank and bool((y == 3).all()))
        comm.close()


if args.what == "nojax-torch":
    jax_without_torch()
    sys.exit(0)
try:
    arrays() if args.what == "arrays" else placement()
except Exception as e:  # noqa: BLE001 - reported as a failure with its traceback
    import traceback

    traceback.print_exc()
    check(f"{args.what}: {type(e).__name__}: {e}", False)
print(f"{tally.passed} passed, {tally.nfailures} failed")
for f in tally.fails:
    print("FAIL", f)
report(failures=tally.fails, passed=tally.passed)
