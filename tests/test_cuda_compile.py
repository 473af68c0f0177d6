"""Compile-check kernels/copy.cu with NVRTC on any machine (no GPU, no driver needed).

NVRTC is driven through ``cuda.bindings.nvrtc`` exactly as CuPy's RawModule drives it: one
program, one ``nvrtcAddNameExpression`` per specialisation listed by the loader
(``dpgather.kernels._cuda.NAME_EXPRESSIONS``, imported so the two cannot drift), then
``nvrtcCompileProgram``. Skipped, with the reason, when ``cuda.bindings`` or the NVRTC
library is missing (pip: ``cuda-bindings`` + ``nvidia-cuda-nvrtc-cu12``). The GPU results
themselves are checked by tests/gpu/gpu_selftest.py.
"""

import re
import subprocess
import sys

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


@pytest.mark.parametrize("arch", ARCHS)
def test_copy_cu_compiles_every_specialisation(nvrtc, arch):
    ok, log, lowered = compile_source(nvrtc, _cuda.kernel_source(), _cuda.NAME_EXPRESSIONS, arch)
    assert ok, f"NVRTC rejected kernels/copy.cu for {arch}:\n{log}"
    assert set(lowered) == set(_cuda.NAME_EXPRESSIONS)
    assert len(set(lowered.values())) == len(lowered), lowered


def test_broken_source_is_rejected(nvrtc):
    broken = _cuda.kernel_source() + "\n__global__ void dpg_broken() { undefined_thing = 1; }\n"
    ok, log, _ = compile_source(nvrtc, broken, _cuda.NAME_EXPRESSIONS, "compute_90")
    assert not ok
    assert "undefined_thing" in log


def test_unknown_specialisation_is_rejected(nvrtc):
    ok, log, _ = compile_source(nvrtc, _cuda.kernel_source(), ("copy_rows_typo<uint4>",),
                                "compute_90")
    assert not ok, log


def test_import_needs_no_cupy_and_no_gpu():
    code = (
        "import sys, dpgather.kernels._cuda, dpgather.dist.nccl, dpgather.dist.nccl; "
        "bad = [m for m in ('cupy', 'mpi4py', 'torch') if m in sys.modules]; "
        "assert not bad, bad; print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


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


# -- kernels/p2p.cu (the P2P transport) --------------------------------------------------------

from dpgather.kernels import _p2p  # noqa: E402


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


def test_p2p_specialisation_list_covers_every_pair():
    # every logical dtype with every vector at least as wide as its element
    assert set(_p2p.ELEM_CTYPES) == {"float32", "float16", "bfloat16", "int32", "int64", "uint8"}
    expect = {f"p2p_pull<{e}, {v}>" for n, e in _p2p.ELEM_CTYPES.items()
              for w, v in _cuda.COPY_CTYPES.items() if w >= _p2p.ITEMSIZE[n]}
    assert set(_p2p.NAME_EXPRESSIONS) == expect and len(expect) == 21


def test_p2p_constants_match_the_source():
    src = _p2p.kernel_source()

    def const(name):
        m = re.search(rf"\b{name} = (-?\d+)", src)
        assert m, name
        return int(m.group(1))

    assert const("kThreads") == _p2p._THREADS
    assert const("kErrTimeout") == _p2p.ERR_TIMEOUT and const("kErrSignature") == _p2p.ERR_SIGNATURE
    assert const("kEpoch") == 0 and const("kErr") == 3
    assert re.search(r"kIndexMax = 2147483647LL", src) and _p2p._INDEX_MAX == 2147483647
    assert "constexpr int kMaxRanks = kThreads;" in src and _p2p.MAX_RANKS == _p2p._THREADS


@pytest.mark.parametrize("arch", ARCHS)
def test_p2p_cu_compiles_every_specialisation(nvrtc, arch):
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) found: set CUDA_PATH or install the toolkit")
    ok, log, lowered = compile_source(nvrtc, _p2p.kernel_source(), _p2p.NAME_EXPRESSIONS, arch,
                                      options=_p2p.COMPILE_OPTIONS + (f"-I{inc}",))
    assert ok, f"NVRTC rejected kernels/p2p.cu for {arch}:\n{log}"
    assert set(lowered) == set(_p2p.NAME_EXPRESSIONS)
    assert len(set(lowered.values())) == len(lowered), lowered


def test_p2p_tuning_switches_compile(nvrtc, monkeypatch):
    """DPGATHER_P2P_DEFINES reaches NVRTC as -D options; the non-default switches compile; a
    malformed value is an InputError naming the variable."""
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) found: set CUDA_PATH or install the toolkit")
    monkeypatch.setenv("DPGATHER_P2P_DEFINES", "DPG_P2P_FLAG_FENCE=0,DPG_P2P_RELAXED_POLL=1,DPG_P2P_SLEEP_AFTER=100000")
    opts = _p2p.compile_options()
    assert "-DDPG_P2P_RELAXED_POLL=1" in opts and "-DDPG_P2P_FLAG_FENCE=0" in opts
    # the switches change the barrier, which every specialisation shares: two of them suffice
    # (every specialisation compiles with the defaults above)
    some = tuple(_p2p.NAME_EXPRESSIONS)[:2]
    ok, log, lowered = compile_source(nvrtc, _p2p.kernel_source(), some, ARCHS[-1], options=opts + (f"-I{inc}",))
    assert ok, log
    monkeypatch.setenv("DPGATHER_P2P_DEFINES", "FOO=1")
    with pytest.raises(InputError, match="DPGATHER_P2P_DEFINES"):
        _p2p.compile_options()


def test_p2p_cu_compiles_with_nvcc(tmp_path):
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    lines = [_p2p.kernel_source(), "void dpg_instantiate_all() {"]
    lines += [f"    (void)&{name};" for name in _p2p.NAME_EXPRESSIONS]
    lines.append("}")
    src = tmp_path / "p2p_all.cu"
    src.write_text("\n".join(lines))
    out = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-Xptxas", "-warn-spills", "-c",
                          str(src), "-o", str(tmp_path / "p2p_all.o")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "spill" not in out.stderr.lower(), out.stderr


def test_p2p_import_needs_no_cupy():
    code = (
        "import sys, dpgather.kernels._p2p, dpgather.dist.p2p; "
        "bad = [m for m in ('cupy', 'mpi4py', 'numba', 'ml_dtypes', 'torch') if m in sys.modules]; "
        "assert not bad, bad; print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_p2p_kernel_params_match_the_signature():
    # kernel_args packs values in KERNEL_PARAMS order and sizes: it must be the kernel's own
    src = _p2p.kernel_source()
    m = re.search(r"__global__ void __launch_bounds__\([^)]*\)\s*p2p_pull\(([^)]*)\)", src)
    assert m, "p2p_pull signature not found"
    params = []
    for p in m.group(1).split(","):
        p = " ".join(p.replace("__restrict__", "").split())
        ctype, name = p.rsplit(" ", 1)
        params.append((name, ctype.replace(" *", "*")))
    assert tuple(params) == _p2p.KERNEL_PARAMS
    args = _p2p.kernel_args(**{n: 1 for n, _ in _p2p.KERNEL_PARAMS})
    sizes = [a.dtype.itemsize for a in args]
    assert sizes == [4 if c == "int" else 8 for _, c in _p2p.KERNEL_PARAMS]
    with pytest.raises(Exception, match="missing"):
        _p2p.kernel_args(inp=1)


# -- kernels/push.cu (the push transport) --------------------------------------------------------

from dpgather.kernels import _push  # noqa: E402


def test_push_specialisation_list_covers_every_pair():
    # every logical dtype with every access at least as wide as its element, at most 8 bytes
    assert set(_push.ACCESS_CTYPES) == {8, 4, 2, 1}
    expect = {f"p2p_push<{e}, {v}>" for n, e in _p2p.ELEM_CTYPES.items()
              for w, v in _push.ACCESS_CTYPES.items() if w >= _p2p.ITEMSIZE[n]}
    assert set(_push.NAME_EXPRESSIONS) == expect and len(expect) == 15


def test_push_source_is_self_contained_and_constants_match():
    src = _push.kernel_source()
    assert "#include \"dpg_device.cuh\"" not in src and "namespace dpg_dev" in src
    assert src.count("namespace dpg_dev {") == 1  # inlined once

    def const(name):
        m = re.search(rf"\b{name} = (-?\w+)", src)
        assert m, name
        return int(m.group(1).rstrip("uLl"), 0)

    assert const("kThreads") == _push._THREADS
    assert const("kErrTimeout") == _p2p.ERR_TIMEOUT and const("kErrSignature") == _p2p.ERR_SIGNATURE
    assert (const("kEpoch"), const("kDepart"), const("kErr")) == (0, 1, 2)
    assert const("kHdrOff") == _push.HDR_OFF
    assert const("kFirstEpoch") == _push.FIRST_EPOCH and const("kClearFrom") == 2**32 - 2
    assert (const("kHeaderWords"), const("kSendWords"), const("kJobWords")) == (
        _push.HEADER_WORDS, _push.SEND_WORDS, _push.JOB_WORDS)
    assert "constexpr int kMaxRanks = kThreads;" in src and _push.MAX_RANKS == _push._THREADS


def test_cuda_source_inlines_package_headers_once(tmp_path, monkeypatch):
    monkeypatch.setattr(_cuda, "_package_text", lambda name: {
        "a.cu": '#include "h.cuh"\n  #include "h.cuh"\n#include <cuda_fp16.h>\nA\n',
        "h.cuh": '#include "g.cuh"\nH\n', "g.cuh": "G\n"}[name])
    text = _cuda.CudaSource("a.cu", (), ()).text()
    assert text == 'G\n\nH\n\n\n#include <cuda_fp16.h>\nA\n'  # the second include: empty


@pytest.mark.parametrize("arch", ARCHS)
def test_push_cu_compiles_every_specialisation(nvrtc, arch):
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) found: set CUDA_PATH or install the toolkit")
    ok, log, lowered = compile_source(nvrtc, _push.kernel_source(), _push.NAME_EXPRESSIONS, arch,
                                      options=_p2p.COMPILE_OPTIONS + (f"-I{inc}",))
    assert ok, f"NVRTC rejected kernels/push.cu for {arch}:\n{log}"
    assert set(lowered) == set(_push.NAME_EXPRESSIONS)
    assert len(set(lowered.values())) == len(lowered), lowered


def test_push_tuning_switches_compile(nvrtc, monkeypatch):
    """The push switches ride on DPGATHER_P2P_DEFINES (names DPG_P2P_PUSH_*) and compile."""
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) found: set CUDA_PATH or install the toolkit")
    monkeypatch.setenv("DPGATHER_P2P_DEFINES",
                       "DPG_P2P_PUSH_UNROLL=4,DPG_P2P_PUSH_ACTIVE_BYTES=16384,DPG_P2P_PUSH_SLEEP_AFTER=100000")
    opts = _p2p.compile_options()
    assert "-DDPG_P2P_PUSH_UNROLL=4" in opts
    some = tuple(_push.NAME_EXPRESSIONS)[:2]
    ok, log, _ = compile_source(nvrtc, _push.kernel_source(), some, ARCHS[-1], options=opts + (f"-I{inc}",))
    assert ok, log


def test_push_cu_compiles_with_nvcc(tmp_path):
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    lines = [_push.kernel_source(), "void dpg_instantiate_all() {"]
    lines += [f"    (void)&{name};" for name in _push.NAME_EXPRESSIONS]
    lines.append("}")
    src = tmp_path / "push_all.cu"
    src.write_text("\n".join(lines))
    out = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-Xptxas", "-warn-spills", "-c",
                          str(src), "-o", str(tmp_path / "push_all.o")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "spill" not in out.stderr.lower(), out.stderr


def test_push_import_needs_no_cupy():
    code = (
        "import sys, dpgather.kernels._push; "
        "bad = [m for m in ('cupy', 'mpi4py', 'numba', 'ml_dtypes', 'torch') if m in sys.modules]; "
        "assert not bad, bad; print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_push_kernel_params_match_the_signature():
    # the push kernel takes exactly the pull's parameters: one packer (kernels._p2p.kernel_args)
    src = _push.kernel_source()
    m = re.search(r"__global__ void __launch_bounds__\([^)]*\)\s*p2p_push\(([^)]*)\)", src)
    assert m, "p2p_push signature not found"
    params = []
    for p in m.group(1).split(","):
        p = " ".join(p.replace("__restrict__", "").split())
        ctype, name = p.rsplit(" ", 1)
        params.append((name, ctype.replace(" *", "*")))
    assert tuple(params) == _push.KERNEL_PARAMS == _p2p.KERNEL_PARAMS
