"""Compile-check the CUDA sources of kernels/ with NVRTC on any machine (no GPU, no driver needed).

NVRTC is driven through ``cuda.bindings.nvrtc`` exactly as CuPy's RawModule drives it: one
program, one ``nvrtcAddNameExpression`` per specialisation listed by the loader
(``dpgather.kernels._cuda.NAME_EXPRESSIONS``, imported so the two cannot drift), then
``nvrtcCompileProgram``. Skipped, with the reason, when ``cuda.bindings`` or the NVRTC
library is missing (pip: ``cuda-bindings`` + ``nvidia-cuda-nvrtc-cu12``). The GPU results
themselves are checked by tests/gpu/gpu_selftest.py.
"""

import re
import subprocess

import pytest

from dpgather.core.errors import BackendUnavailable, InputError
from dpgather.kernels import _cuda

ARCHS = ("compute_80", "compute_90")


@pytest.fixture(scope="module")
def nvrtc():
    try:
        from cuda.bindings import nvrtc as lib
    except Exception as exc:
        pytest.skip(
            f"cuda.bindings.nvrtc is not importable ({exc!r}); for the NVRTC compile check "
            "install cuda-bindings and nvidia-cuda-nvrtc-cu12"
        )
    try:
        err, *_ = lib.nvrtcVersion()
    except Exception as exc:
        pytest.skip(f"the NVRTC library cannot be loaded ({exc!r}); install nvidia-cuda-nvrtc-cu12")
    if err != lib.nvrtcResult.NVRTC_SUCCESS:
        pytest.skip(f"nvrtcVersion failed: {err}")
    return lib


def compile_source(lib, source, names, arch, options=_cuda.COMPILE_OPTIONS):
    """(ok, log, {name expression: lowered name}) of one NVRTC compilation."""
    err, prog = lib.nvrtcCreateProgram(source.encode(), b"copy.cu", 0, [], [])
    assert err == lib.nvrtcResult.NVRTC_SUCCESS, err
    try:
        for name in names:
            (err,) = lib.nvrtcAddNameExpression(prog, name.encode())
            assert err == lib.nvrtcResult.NVRTC_SUCCESS, (name, err)
        opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in options]
        (status,) = lib.nvrtcCompileProgram(prog, len(opts), opts)
        err, size = lib.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        lib.nvrtcGetProgramLog(prog, log)
        log = log.rstrip(b"\x00 ").decode(errors="replace")
        ok = status == lib.nvrtcResult.NVRTC_SUCCESS
        lowered = {}
        if ok:
            for name in names:
                err, mangled = lib.nvrtcGetLoweredName(prog, name.encode())
                assert err == lib.nvrtcResult.NVRTC_SUCCESS, (name, err)
                lowered[name] = mangled.decode() if isinstance(mangled, bytes) else str(mangled)
        return ok, log, lowered
    finally:
        lib.nvrtcDestroyProgram(prog)


def test_specialisation_list_covers_every_variant():
    assert set(_cuda.COPY_CTYPES) == {16, 8, 4, 2, 1}
    assert set(_cuda.MASK_CTYPES) == {"int32", "int64"}
    for ctype in _cuda.COPY_CTYPES.values():
        assert f"copy_rows<{ctype}>" in _cuda.NAME_EXPRESSIONS
    for ctype in _cuda.MASK_CTYPES.values():
        assert f"mask_rows<{ctype}>" in _cuda.NAME_EXPRESSIONS
    assert set(_cuda._UNROLL) == set(_cuda.COPY_CTYPES)
    assert "-std=c++17" in _cuda.COMPILE_OPTIONS


def test_block_size_matches_the_source():
    # The kernels tile by a compile-time block size and trap on any other launch shape.
    m = re.search(r"constexpr int kThreads = (\d+);", _cuda.kernel_source())
    assert m and int(m.group(1)) == _cuda._THREADS


def _copy_options():
    """copy.cu's NVRTC options with the CUDA headers (its fp8 pack includes cuda_fp16.h)."""
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) found: set CUDA_PATH or install the toolkit")
    return _cuda.COMPILE_OPTIONS + (f"-I{inc}",)


@pytest.mark.parametrize("arch", ARCHS)
def test_copy_cu_compiles_every_specialisation(nvrtc, arch):
    ok, log, lowered = compile_source(nvrtc, _cuda.kernel_source(), _cuda.NAME_EXPRESSIONS, arch,
                                      options=_copy_options())
    assert ok, f"NVRTC rejected kernels/copy.cu for {arch}:\n{log}"
    assert set(lowered) == set(_cuda.NAME_EXPRESSIONS)
    assert len(set(lowered.values())) == len(lowered), lowered


def test_broken_source_is_rejected(nvrtc):
    broken = _cuda.kernel_source() + "\n__global__ void dpg_broken() { undefined_thing = 1; }\n"
    ok, log, _ = compile_source(nvrtc, broken, _cuda.NAME_EXPRESSIONS, "compute_90", options=_copy_options())
    assert not ok
    assert "undefined_thing" in log


def test_unknown_specialisation_is_rejected(nvrtc):
    ok, log, _ = compile_source(nvrtc, _cuda.kernel_source(), ("copy_rows_typo<uint4>",),
                                "compute_90", options=_copy_options())
    assert not ok, log


def _gpu_visible():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_gpu_visible(), reason="a GPU is visible: the CPU-only error path is not taken")
def test_use_without_gpu_raises_backend_unavailable():
    from dpgather.dist import nccl

    with pytest.raises(BackendUnavailable):
        _cuda.warm()
    assert nccl.nccl_available() is False
    with pytest.raises(BackendUnavailable):
        nccl.NcclCommunicator()


# -- kernels/pull.cu (the P2P transport's pull kernel) ------------------------------------------

from dpgather.core.dtypes import DTYPES  # noqa: E402
from dpgather.kernels import _p2p, _pull, _push  # noqa: E402


def cuda_include_dir():
    """A directory holding cuda_fp16.h / cuda_bf16.h (CuPy passes its own at run time)."""
    import os

    candidates = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        candidates.append(find_nvidia_header_directory("cudart"))
    except Exception:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "cuda_bf16.h")):
            return c
    return None


#: The two P2P kernels: their loaders, kernel names, element widths per access, specialisations.
KERNELS = {"pull": (_pull, "p2p_pull", (16, 8, 4, 2, 1), 21), "push": (_push, "p2p_push", (8, 4, 2, 1), 15)}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_p2p_specialisation_list_covers_every_pair(kernel):
    # every logical dtype with every access at least as wide as its element
    mod, name, widths, count = KERNELS[kernel]
    ctypes = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "int32": "int",
              "int64": "long long", "uint8": "unsigned char"}
    assert {n: d.ctype for n, d in DTYPES.items()} == ctypes
    expect = {f"{name}<{e}, {_cuda.COPY_CTYPES[w]}>" for n, e in ctypes.items() for w in widths
              if w >= DTYPES[n].itemsize}
    assert set(mod.NAME_EXPRESSIONS) == expect and len(expect) == count
    assert _cuda.MASK_CTYPES == {"int32": "int", "int64": "long long"}


def _const(src, name):
    m = re.search(rf"\b{name} = (-?\w+)", src)
    assert m, name
    return int(m.group(1).rstrip("uLl"), 0)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_p2p_shared_constants_match_the_sources(kernel):
    src = KERNELS[kernel][0].kernel_source()
    assert src.count("namespace dpg_dev {") == 1 and '#include "dpg_device.cuh"' not in src  # inlined once
    assert _const(src, "kThreads") == _p2p.THREADS
    assert _const(src, "kErrTimeout") == _p2p.ERR_TIMEOUT and _const(src, "kErrSignature") == _p2p.ERR_SIGNATURE
    assert re.search(r"kIndexMax = 2147483647LL", src) and _p2p._INDEX_MAX == 2147483647
    assert "constexpr int kMaxRanks = kThreads;" in src and _p2p.MAX_RANKS == _p2p.THREADS
    # timeout_ns: 0 is the kernels' "no limit" (they compare only when timeout_ns > 0)
    assert "timeout_ns > 0" in src
    assert _p2p.timeout_ns(float("inf")) == 0 and _p2p.timeout_ns(1e-12) == 1
    assert _p2p.timeout_ns(2.5) == 2_500_000_000 and _p2p.timeout_ns(1e300) == 2**63 - 1


def test_pull_constants_match_the_source():
    src = _pull.kernel_source()
    assert (_const(src, "kEpoch"), _const(src, "kErr")) == (0, 3)


def test_push_constants_match_the_source():
    src = _push.kernel_source()
    assert (_const(src, "kEpoch"), _const(src, "kDepart"), _const(src, "kErr")) == (0, 1, 2)
    assert _const(src, "kHdrOff") == _push.HDR_OFF
    assert _const(src, "kFirstEpoch") == _push.FIRST_EPOCH and _const(src, "kClearFrom") == 2**32 - 2
    assert (_const(src, "kHeaderWords"), _const(src, "kSendWords"), _const(src, "kJobWords")) == (
        _p2p.HEADER_WORDS, _push.SEND_WORDS, _p2p.JOB_WORDS)


def test_cuda_source_inlines_package_headers_once(monkeypatch):
    monkeypatch.setattr(_cuda, "_package_text", lambda name: {
        "a.cu": '#include "h.cuh"\n  #include "h.cuh"\n#include <cuda_fp16.h>\nA\n',
        "h.cuh": '#include "g.cuh"\nH\n', "g.cuh": "G\n"}[name])
    text = _cuda.CudaSource("a.cu", (), ()).text()
    assert text == 'G\n\nH\n\n\n#include <cuda_fp16.h>\nA\n'  # the second include: empty


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_p2p_cu_compiles_every_specialisation(nvrtc, kernel, arch):
    mod = KERNELS[kernel][0]
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) found: set CUDA_PATH or install the toolkit")
    ok, log, lowered = compile_source(nvrtc, mod.kernel_source(), mod.NAME_EXPRESSIONS, arch,
                                      options=_p2p.COMPILE_OPTIONS + (f"-I{inc}",))
    assert ok, f"NVRTC rejected kernels/{kernel}.cu for {arch}:\n{log}"
    assert set(lowered) == set(mod.NAME_EXPRESSIONS)
    assert len(set(lowered.values())) == len(lowered), lowered


#: Non-default tuning switches of each kernel (DPGATHER_P2P_DEFINES), and the -D options to expect.
SWITCHES = {
    "pull": ("DPG_P2P_FLAG_FENCE=0,DPG_P2P_RELAXED_POLL=1,DPG_P2P_SLEEP_AFTER=100000",
             ("-DDPG_P2P_RELAXED_POLL=1", "-DDPG_P2P_FLAG_FENCE=0")),
    "push": ("DPG_P2P_PUSH_UNROLL=4,DPG_P2P_PUSH_ACTIVE_BYTES=16384,DPG_P2P_PUSH_SLEEP_AFTER=100000,"
             "DPG_P2P_PUSH_PHASE_TIMES=1", ("-DDPG_P2P_PUSH_UNROLL=4", "-DDPG_P2P_PUSH_PHASE_TIMES=1")),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_p2p_tuning_switches_compile(nvrtc, monkeypatch, kernel):
    """DPGATHER_P2P_DEFINES reaches NVRTC as -D options; the non-default switches compile; a
    malformed value is an InputError naming the variable."""
    mod = KERNELS[kernel][0]
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) found: set CUDA_PATH or install the toolkit")
    value, expect = SWITCHES[kernel]
    monkeypatch.setenv("DPGATHER_P2P_DEFINES", value)
    opts = _p2p.compile_options()
    assert all(o in opts for o in expect), opts
    # the switches change code every specialisation shares: two of them suffice (every
    # specialisation compiles with the defaults above)
    some = tuple(mod.NAME_EXPRESSIONS)[:2]
    ok, log, lowered = compile_source(nvrtc, mod.kernel_source(), some, ARCHS[-1], options=opts + (f"-I{inc}",))
    assert ok, log
    monkeypatch.setenv("DPGATHER_P2P_DEFINES", "FOO=1")
    with pytest.raises(InputError, match="DPGATHER_P2P_DEFINES"):
        _p2p.compile_options()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_p2p_cu_compiles_with_nvcc(tmp_path, kernel):
    import shutil

    mod = KERNELS[kernel][0]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    lines = [mod.kernel_source(), "void dpg_instantiate_all() {"]
    lines += [f"    (void)&{name};" for name in mod.NAME_EXPRESSIONS]
    lines.append("}")
    src = tmp_path / f"{kernel}_all.cu"
    src.write_text("\n".join(lines))
    out = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-Xptxas", "-warn-spills", "-c",
                          str(src), "-o", str(tmp_path / f"{kernel}_all.o")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "spill" not in out.stderr.lower(), out.stderr


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_p2p_kernel_params_match_the_signature(kernel):
    # both kernels take KERNEL_PARAMS; call_args + window_args (CuPy's RawKernel) and PackedParams
    # (cuLaunchKernelEx) pack values in that order and those sizes: it must be the kernel's own
    mod, name = KERNELS[kernel][:2]
    src = mod.kernel_source()
    m = re.search(rf"__global__ void __launch_bounds__\([^)]*\)\s*{name}\(([^)]*)\)", src)
    assert m, f"{name} signature not found"
    params = []
    for p in m.group(1).split(","):
        p = " ".join(p.replace("__restrict__", "").split())
        ctype, pname = p.rsplit(" ", 1)
        params.append((pname, ctype.replace(" *", "*")))
    assert tuple(params) == _p2p.KERNEL_PARAMS
    args = _p2p.call_args(*range(1, 9)) + _p2p.window_args(*range(9, 16))
    assert [int(a) for a in args] == list(range(1, 16))  # in parameter order
    sizes = [a.dtype.itemsize for a in args]
    assert sizes == [4 if c == "int" else 8 for _, c in _p2p.KERNEL_PARAMS]
    assert [a.dtype.kind == "u" for a in args] == [c.endswith("*") for _, c in _p2p.KERNEL_PARAMS]


def test_packed_params_point_at_each_value_in_order():
    """The cuLaunchKernelEx packing: a void*[15] array whose i-th pointer holds parameter i at
    its C size; rewriting reuses the buffers (the driver copies at the launch call)."""
    import ctypes

    packed = _p2p.PackedParams()
    for base in (0, 1000, -7):
        args = _p2p.call_args(*range(1 + base if base >= 0 else 1, 9 + max(base, 0))) + _p2p.window_args(
            *range(9, 16))
        addr = packed.set(args)
        assert addr == packed.address
        ptrs = (ctypes.c_void_p * len(_p2p.KERNEL_PARAMS)).from_address(addr)
        got = [(ctypes.c_int32 if c == "int" else ctypes.c_uint64 if c.endswith("*") else ctypes.c_int64)
               .from_address(ptrs[i]).value for i, (_, c) in enumerate(_p2p.KERNEL_PARAMS)]
        assert got == [int(a) for a in args]
    assert len({int(p) for p in packed.slots}) == len(_p2p.KERNEL_PARAMS)
