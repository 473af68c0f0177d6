"""Arrays in and out (docs/interop.md) on the host backend: ``wrap`` takes any DLPack producer
without copying (legacy and versioned capsules, bfloat16, byte offsets; device, contiguity and
flags checked; the producer's deleter called once, when the array is gone) and ``export`` hands
results back in the caller's framework and dtype, zero-copy. PyTorch and JAX parts run where they
are installed (JAX is in the test extra; PyTorch is not). The CUDA twin is tests/gpu/interop_smoke.py.
"""

import gc
import os
from pathlib import Path

import numpy as np
import pytest

import dlpack_producer as dl
from clean_python import run_clean
from frameworks import require
from dpgather import InputError
from mpi_harness import MPI_SCRIPTS, needs_mpiexec, ranks_exited_zero, run_mpi
from dpgather._backends import HostBackend, canonical_device, make_backend
from dpgather._devices import placement_error
from dpgather.core import BackendUnavailable, ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def be():
    return HostBackend()


def _ptr(a):
    return a.__array_interface__["data"][0]


# -- any DLPack producer, read with ctypes -------------------------------------------------------

@pytest.mark.parametrize("versioned", [False, True])
@pytest.mark.parametrize("legacy", [False, True])
def test_a_producer_is_wrapped_without_copying_and_its_deleter_runs_once_after(be, versioned, legacy):
    base = np.arange(24, dtype=np.float32)
    p = dl.Producer(base, shape=(4, 5), byte_offset=16, versioned=versioned, legacy=legacy)
    arr, origin = be.wrap(p, "x")
    assert arr.shape == (4, 5) and arr.dtype == np.float32 and origin.kind == "dlpack" and not origin.bfloat16
    assert _ptr(arr) == _ptr(base) + 16  # byte offset honoured, no copy
    np.testing.assert_array_equal(arr, base[4:24].reshape(4, 5))
    assert p.calls[-1]["stream"] is None and (legacy or p.calls[-1]["copy"] is False)
    assert p.deleted == 0  # the producer's array is kept while ours lives
    view = arr[1:]
    del arr
    gc.collect()
    assert p.deleted == 0  # a view of it still holds the capsule
    del view
    gc.collect()
    assert p.deleted == 1


def test_bfloat16_arrives_as_2_byte_storage_and_goes_back_as_the_callers_bfloat16(be):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = dl.bf16_bits(np.arange(12).reshape(3, 4))
    p = dl.Producer(bits, code=dl.BFLOAT, bits=16)
    arr, origin = be.wrap(p, "x")
    assert arr.dtype == np.uint16 and origin.bfloat16
    np.testing.assert_array_equal(arr, bits)
    out = be.export(arr, origin)  # any other producer: the backend array, as NumPy's bfloat16
    assert out.dtype == ml_dtypes.bfloat16 and _ptr(out) == _ptr(bits)
    np.testing.assert_array_equal(out.astype(np.float32), np.arange(12).reshape(3, 4))


@pytest.mark.parametrize("shape,strides,ok", [
    ((4, 5), (5, 1), True), ((4, 1), (1, 99), True), ((1, 5), (77, 1), True), ((0, 5), (1, 7), True),
    ((4, 5), (1, 4), False), ((2, 5), (10, 1), False), ((4, 3), (5, 1), False),
])
def test_strides_must_be_c_contiguous(be, shape, strides, ok):
    p = dl.Producer(np.zeros(64, np.float32), shape=shape, strides=strides)
    if ok:
        arr, _ = be.wrap(p, "x")
        assert arr.shape == shape and arr.flags.c_contiguous
        del arr
    else:
        with pytest.raises(InputError, match=r"x must be C-contiguous, got shape .* with strides .*bytes.*contiguous"):
            be.wrap(p, "x")
    gc.collect()
    assert p.deleted == len(p.calls)  # every capsule released, also the refused ones


def test_a_device_array_is_refused_on_the_host_backend(be):
    p = dl.Producer(np.zeros((2, 2), np.float32), device=(dl.CUDA, 1))
    with pytest.raises(InputError, match=r"x is on cuda:1; the host backend takes host \(CPU\) arrays"):
        be.wrap(p, "x")


@pytest.mark.parametrize("code,bits", [(dl.FLOAT, 8), (5, 64), (dl.BFLOAT, 32)])
def test_a_dtype_without_storage_is_refused(be, code, bits):
    with pytest.raises(InputError, match=rf"x has a DLPack dtype dpgather does not move \(code {code}, {bits} bits"):
        be.wrap(dl.Producer(np.zeros(8, np.uint8), code=code, bits=bits, shape=(1, 1)), "x")


@pytest.mark.parametrize("flags,why", [(dl.READ_ONLY, "read-only"), (dl.IS_COPIED, "a copy")])
def test_read_only_and_copied_exports_are_refused_only_where_the_call_writes(be, flags, why):
    base = np.arange(6, dtype=np.int32)
    arr, _ = be.wrap(dl.Producer(base, shape=(2, 3), flags=flags), "x")
    assert arr.flags.writeable is not bool(flags & dl.READ_ONLY)  # read-only stays read-only
    with pytest.raises(InputError, match=f"out is written by this call, but its DLPack export is {why}"):
        be.wrap(dl.Producer(base, shape=(2, 3), flags=flags), "out", writable=True)
    ro = np.zeros((2, 2), np.float32)
    ro.flags.writeable = False
    with pytest.raises(InputError, match="topk_ids is a read-only NumPy array"):
        be.wrap(ro, "topk_ids", writable=True)


def test_a_producer_that_refuses_is_an_input_error_naming_it(be):
    class Refuses:
        def __dlpack__(self, **kw):
            raise BufferError("cannot export a conjugated tensor")

        def __dlpack_device__(self):
            return (1, 0)

    with pytest.raises(InputError, match=r"Y \(Refuses on cpu:0\) could not be exported through DLPack without a copy: "
                                         r"BufferError: cannot export a conjugated tensor"):
        be.wrap(Refuses(), "Y")


def test_numpy_in_numpy_out_untouched(be):
    x = np.ones((3, 4), np.float32)
    arr, origin = be.wrap(x, "x")
    assert arr is x and origin is None and be.export(arr, origin) is arr


def test_host_arena_buffers_start_at_256_byte_boundaries(be):
    for n in (1, 100, 1 << 20):
        buf = be.alloc(n)
        assert buf.nbytes == n and buf.dtype == np.uint8 and _ptr(buf) % 256 == 0


# -- PyTorch (where installed) and JAX (the test extra) ---------------------------------------------

def _torch():
    return require("torch", "PyTorch is not installed (not in CI: a CPU wheel is optional)")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int64"])
def test_torch_in_torch_out_same_dtype_zero_copy(be, dtype):
    torch = _torch()
    tdt = getattr(torch, dtype)
    x = torch.arange(20, dtype=torch.float32).reshape(4, 5).to(tdt)
    arr, origin = be.wrap(x, "x")
    assert origin.kind == "torch" and origin.bfloat16 is (dtype == "bfloat16") and _ptr(arr) == x.data_ptr()
    if dtype == "bfloat16":
        assert arr.dtype == np.uint16
    buf = be.alloc(4096)
    view = buf[256:256 + arr.nbytes].view(arr.dtype).reshape(arr.shape)  # an arena view
    view[...] = arr
    y = be.export(view, origin)
    assert isinstance(y, torch.Tensor) and y.dtype == tdt and y.device.type == "cpu"
    assert y.data_ptr() == _ptr(view) and torch.equal(y, x)
    y2 = be.export(view, origin)
    assert y2 is not y and y2.data_ptr() == y.data_ptr()  # a fresh tensor each call, over the same memory
    y2.unsqueeze_(0)
    assert be.export(view, origin).shape == x.shape  # a caller's in-place metadata change stays its own


def test_torch_export_cache_lets_the_view_go(be):
    torch = _torch()
    import weakref

    _, origin = be.wrap(torch.zeros(2, 2), "x")
    buf = be.alloc(1024)
    view = buf[:16].view(np.float32).reshape(2, 2)
    y = be.export(view, origin)
    ref = weakref.ref(view)
    del view
    gc.collect()
    assert ref() is None and len(be._exports._entries) == 0  # the cache held neither the view nor the tensor
    assert y.shape == (2, 2)  # the tensor keeps the memory (the arena buffer) itself


def test_torch_tensor_that_requires_grad_is_named(be):
    torch = _torch()
    with pytest.raises(InputError, match=r"x \(Tensor on cpu:0\) could not be exported through DLPack"):
        be.wrap(torch.zeros(2, 2, requires_grad=True), "x")


def _jax():
    return require("jax", "JAX is not installed (it is in the test extra)")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int32"])
def test_jax_in_jax_out_same_dtype_zero_copy(be, dtype):
    jax = _jax()
    jnp = jax.numpy
    x = jnp.arange(20, dtype=jnp.float32).reshape(4, 5).astype(dtype)
    arr, origin = be.wrap(x, "x")
    assert origin.kind == "jax" and origin.bfloat16 is (dtype == "bfloat16")
    assert _ptr(arr) == x.unsafe_buffer_pointer()
    view = be.alloc(4096)[256:256 + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    view[...] = arr
    y = be.export(view, origin)
    assert isinstance(y, jax.Array) and y.dtype == x.dtype and y.unsafe_buffer_pointer() == _ptr(view)
    assert bool((y == x).all())


def test_jax_arrays_are_never_written(be):
    jnp = _jax().numpy
    with pytest.raises(InputError, match="out is a JAX array, which is immutable, and this call writes into it"):
        be.wrap(jnp.zeros((2, 2)), "out", writable=True)


_NO_FRAMEWORK = """
import sys
import numpy as np
import dlpack_producer as dl
from dpgather._backends import HostBackend
be = HostBackend()
arr, o = be.wrap(dl.Producer(dl.bf16_bits([[1, 2], [3, 4]]), code=dl.BFLOAT, bits=16), "x")
be.export(arr, o)
if sys.argv[1] == "jax":
    import jax.numpy as jnp
    arr, o = be.wrap(jnp.ones((2, 2), jnp.bfloat16), "x")
    y = be.export(be.alloc(64)[:8].view(arr.dtype).reshape(2, 2), o)
    assert str(y.dtype) == "bfloat16", y.dtype
"""


def test_no_framework_is_imported_by_dpgather_and_the_jax_path_never_imports_torch(tmp_path):
    # a fresh interpreter with a minimal environment (tests/clean_python.py, as tests/test_imports.py),
    # and JAX's placement (tests/parallel.py)
    env = {k: v for k, v in os.environ.items() if k in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE")}

    def frameworks(case):
        res, seen = run_clean(_NO_FRAMEWORK, case, tmp=tmp_path / case, hide=(), pythonpath=[ROOT / "tests"], env=env)
        assert res.returncode == 0 and seen is not None, res.stdout + res.stderr
        return sorted({m.split(".")[0] for m in seen["modules"]} & {"torch", "jax"})

    assert frameworks("none") == []
    _jax()
    assert frameworks("jax") == ["jax"]


# -- devices ----------------------------------------------------------------------------------------

class _Like:
    """An object whose type claims to come from ``module`` (a framework's device, without it)."""

    def __init__(self, module, **attrs):
        type(self).__module__ = module
        self.__dict__.update(attrs)


@pytest.mark.parametrize("value,want", [
    (None, None), (0, 0), (3, 3), (np.int64(2), 2), ("cuda:1", 1), ("CUDA:0", 0), ("2", 2),
])
def test_canonical_device_values(value, want):
    assert canonical_device(value) == want


def test_canonical_device_recognises_frameworks_without_importing_them():
    cupy_dev = type("Device", (), {"__module__": "cupy.cuda.device"})()
    cupy_dev.id = 1
    assert canonical_device(cupy_dev) == 1
    torch_dev = type("device", (), {"__module__": "torch", "type": "cuda", "index": 3})()
    assert canonical_device(torch_dev) == 3
    jax_dev = type("CudaDevice", (), {"__module__": "jaxlib._jax", "platform": "gpu", "local_hardware_id": 1,
                                      "id": 5})()
    assert canonical_device(jax_dev) == 1  # the process's CUDA ordinal, not JAX's global id
    for bad, why in [(type("device", (), {"__module__": "torch", "type": "cuda", "index": None})(), "name the GPU"),
                     (type("device", (), {"__module__": "torch", "type": "cpu", "index": None})(), "got"),
                     (type("CpuDevice", (), {"__module__": "jaxlib._jax", "platform": "cpu",
                                             "local_hardware_id": 0})(), "the JAX cpu device"),
                     (-1, "got -1"), (True, "got True"), (1.0, "got 1.0"), ("cuda", "got 'cuda'"),
                     ("gpu:0", "got 'gpu:0'"), (object(), "got <object")]:
        with pytest.raises(ValueError, match=why):
            canonical_device(bad)


def test_canonical_device_with_the_real_frameworks():
    torch = _torch()
    assert canonical_device(torch.device("cuda", 1)) == 1 and canonical_device(torch.device("cuda:0")) == 0
    with pytest.raises(ValueError):
        canonical_device(torch.device("cpu"))


def test_canonical_device_refuses_a_jax_cpu_device():
    jax = _jax()
    with pytest.raises(ValueError, match="the JAX cpu device"):
        canonical_device(jax.devices("cpu")[0])


def _table(*rows):
    return np.array(rows, dtype=np.int64)  # node, asked, chosen, GPU identity, GPUs seen


def test_placement_verdicts():
    assert placement_error(_table([7, -1, 0, 100, 2], [7, -1, 1, 101, 2], [8, -1, 0, 200, 2])) is None
    e = placement_error(_table([7, 0, 0, 100, 2], [7, 0, 0, 100, 2], [7, -1, 1, 101, 2]))
    assert isinstance(e, ConfigError) and "rank 0 (cuda:0) and rank 1 (cuda:0) use the same GPU" in str(e)
    # CUDA_VISIBLE_DEVICES per rank: both see "cuda:0", different GPUs
    assert placement_error(_table([7, -1, 0, 100, 1], [7, -1, 0, 101, 1])) is None
    # the same ordinal on two nodes is two GPUs
    assert placement_error(_table([7, 0, 0, 100, 1], [8, 0, 0, 100, 1])) is None
    e = placement_error(_table([7, 3, -1, 0, 2], [7, -1, 0, 100, 2]))
    assert isinstance(e, ConfigError) and "rank 0 asked for cuda:3 but sees 2 GPU(s)" in str(e)
    e = placement_error(_table([7, -1, -1, 0, 0], [7, -1, 0, 100, 2]))
    assert "rank 0 sees no GPU" in str(e)
    e = placement_error(_table([7, -1, 0, 100, 2], [7, -1, -1, 0, -1]))
    assert isinstance(e, BackendUnavailable) and "rank(s) [1] could not query their GPUs" in str(e)


def test_the_host_backend_takes_no_device():
    with pytest.raises(ConfigError, match="device=1 names a GPU, but the backend is the host backend"):
        make_backend("host", 1)
    assert make_backend("host", None).name == "host"


# -- DpAttention end to end under mpiexec (host backend) ----------------------------------------------

_FRAMEWORKS = ["numpy", "dlpack", "torch", "jax"]
_RUNS = {}


def _interop_run(framework, dtype="bfloat16"):
    if framework in ("torch", "jax"):
        require(framework, f"{framework} is not installed")
    key = (framework, dtype)
    if key not in _RUNS:
        _RUNS[key] = run_mpi([str(MPI_SCRIPTS / "interop_scenarios.py"), "--backend", "host", "--framework",
                              framework, "--dtype", dtype], 2, timeout=240)
    return _RUNS[key]


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("framework", _FRAMEWORKS)
def test_dpattention_with_the_callers_arrays_every_row(framework):
    """The caller's bf16 arrays in (PyTorch CPU tensors, JAX CPU arrays, any DLPack producer, NumPy):
    every row of every call right, against a NumPy reference."""
    res = _interop_run(framework)
    assert not res.timed_out and res.returncode == 0 and set(res.results) == {0, 1}, res.tail()
    for r in res.results.values():
        assert r["failures"] == [] and r["passed"] >= 30, res.tail()


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("framework", _FRAMEWORKS)
def test_dpattention_results_come_back_in_the_callers_framework_and_dtype(framework):
    """PyTorch in -> PyTorch out, JAX in -> JAX out (bfloat16 as the framework's own), ``out=`` and
    ``topk_ids`` returned as the caller's own objects, a JAX ``out=`` refused."""
    res = _interop_run(framework)
    assert set(res.results) == {0, 1}, res.tail()
    for r in res.results.values():
        assert r["type_failures"] == [] and r["types_passed"] >= 30, r["type_failures"][:5]


_EXAMPLE = ROOT / "examples" / "jax_layer.py"
_EXAMPLE_RUNS = {}


def _example(*argv):
    _jax()
    if argv not in _EXAMPLE_RUNS:
        _EXAMPLE_RUNS[argv] = run_mpi(["run_cli.py", str(_EXAMPLE), *argv], 2, timeout=300)
    res = _EXAMPLE_RUNS[argv]
    assert ranks_exited_zero(res, 2)[0], ranks_exited_zero(res, 2)[1]
    return res


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("argv", [("--backend", "host"), ("--backend", "host", "--attn-tp", "2", "--steps", "3",
                                                           "--dtype", "float32")])
def test_example_jax_layer_matches_the_single_process_layer(argv):
    res = _example(*argv)
    assert res.returncode == 0 and "matches the single-process layer" in res.stdout, res.tail()


@pytest.mark.mpi
@needs_mpiexec
def test_example_jax_layer_gets_jax_arrays_back():
    res = _example("--backend", "host")
    assert "results: jax.Array bfloat16\n" in res.stdout, res.tail()


def test_a_producer_that_refuses_because_of_its_device_is_named_by_its_device(be):
    class OnTheGpu:  # as PyTorch refuses a tensor on another GPU than its current device
        def __dlpack__(self, **kw):
            raise BufferError("Can't export tensors on a different CUDA device index")

        def __dlpack_device__(self):
            return (2, 1)

    with pytest.raises(InputError, match=r"x is on cuda:1; the host backend takes host \(CPU\) arrays"):
        be.wrap(OnTheGpu(), "x")
