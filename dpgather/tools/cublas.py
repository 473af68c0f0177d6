"""Capturable bf16 GEMMs for :meth:`dpgather.DpAttention.graph_runner` functions: cuBLAS through ctypes.

Why: a graph runner's ``fn`` (``gather -> fn -> combine``, captured once per bucket) usually
holds the MLP's matmuls, and CuPy refuses cuBLAS while a stream is capturing
(``NotImplementedError: calling cuBLAS API during stream capture is currently unsupported``,
raised by its ``setStream``), so ``G @ W`` with CuPy cannot go into a CUDA graph. This module
calls ``libcublas`` directly instead. It is a tool beside the data plane (no part of dpgather
imports it) and it is what ``bench/graph_bench.py``'s SwiGLU MLP uses; docs/interop.md shows a
complete ``fn``.

How it stays capturable: one handle per :class:`Cublas`, a preallocated workspace
(``cublasSetWorkspace_v2``) so cuBLAS never allocates, and ``cublasSetStream_v2`` issued only
when the current CuPy stream changes -- i.e. during the eager warm-up on the capture stream,
before ``begin_capture`` (the graph runner runs ``fn`` once eagerly per bucket first) -- and
followed by ``cublasSetWorkspace_v2`` again (``SetStream`` resets the workspace to cuBLAS' own
pool). Inside a capture :meth:`Cublas.matmul` therefore issues nothing but ``cublasGemmEx``.

bfloat16 arrays are CuPy ``uint16`` storage (dpgather's CUDA convention). ``matmul(X, W)``
computes the row-major product ``X[m, k] @ W[k, n] -> C[m, n]`` as the column-major
``C^T = W^T X^T``: ``cublasGemmEx(N, N, n, m, k, 1, W, CUDA_R_16BF, n, X, CUDA_R_16BF, k, 0, C,
CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)`` (fp32 accumulation, bf16 output).

The library is found (first hit wins): ``$DPGATHER_CUBLAS_LIB``; the ``libcublas.so*`` already
mapped into this process once CuPy's own cuBLAS binding is imported (the same copy CuPy uses);
``cuda.pathfinder``; ``ctypes.util.find_library``; ``$CUDA_PATH``/``/usr/local/cuda*``; the
``nvidia`` pip wheels' ``lib`` folders. Importing this module loads nothing; :class:`Cublas`
does.

Lifetime: create the :class:`Cublas` before the runner captures, :meth:`Cublas.close` it after
``runner.close()`` (graphs that captured its GEMMs must go first).
"""

import ctypes
import ctypes.util
import glob
import os
import sys

__all__ = ["Cublas", "find_libcublas", "CUDA_R_16BF", "CUBLAS_COMPUTE_32F", "CUBLAS_GEMM_DEFAULT"]

CUBLAS_OP_N = 0
CUDA_R_16BF = 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
WORKSPACE_BYTES = 32 << 20

_STATUS = {
    0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED", 3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE", 8: "CUBLAS_STATUS_ARCH_MISMATCH",
    11: "CUBLAS_STATUS_MAPPING_ERROR", 13: "CUBLAS_STATUS_EXECUTION_FAILED",
    14: "CUBLAS_STATUS_INTERNAL_ERROR", 15: "CUBLAS_STATUS_NOT_SUPPORTED",
    16: "CUBLAS_STATUS_LICENSE_ERROR",
}


def _mapped_libcublas():
    """Path of a ``libcublas.so*`` (not cublasLt) mapped into this process, or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(" ")[-1]
                base = os.path.basename(path)
                if base.startswith("libcublas.so") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


def _candidates():
    env = os.environ.get("DPGATHER_CUBLAS_LIB")
    if env:
        yield env
    for mod in ("cupy_backends.cuda.libs.cublas", "cupy.cuda.cublas"):
        try:  # makes the dynamic loader map CuPy's libcublas
            __import__(mod)
        except Exception:
            pass
    mapped = _mapped_libcublas()
    if mapped:
        yield mapped
    try:
        from cuda import pathfinder

        loaded = pathfinder.load_nvidia_dynamic_lib("cublas")
        if getattr(loaded, "abs_path", None):
            yield loaded.abs_path
    except Exception:
        pass
    name = ctypes.util.find_library("cublas")
    if name:
        yield name
    roots = [os.environ.get("CUDA_PATH", ""), os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in roots:
        if root:
            for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
                yield from sorted(glob.glob(os.path.join(root, sub, "libcublas.so*")), reverse=True)
    for sp in sys.path:
        for pat in ("nvidia/cublas/lib/libcublas.so*", "nvidia/cu13/lib/libcublas.so*",
                    "nvidia/cu12/lib/libcublas.so*"):
            yield from sorted(glob.glob(os.path.join(sp, pat)), reverse=True)


def find_libcublas():
    """``(ctypes.CDLL, path)`` of the first loadable libcublas; raises ``OSError`` if none."""
    tried = []
    for path in _candidates():
        if path in tried:
            continue
        tried.append(path)
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            lib.cublasGemmEx  # noqa: B018 - the symbol must exist
            return lib, path
        except (OSError, AttributeError):
            continue
    raise OSError(f"libcublas not found (tried {tried or 'nothing'}); set DPGATHER_CUBLAS_LIB=/path/libcublas.so")


class Cublas:
    """One cuBLAS handle on the current device with a preallocated workspace.

    Args:
        cupy: the CuPy module.
        workspace_bytes: size of the workspace handed to ``cublasSetWorkspace_v2``.

    Use :meth:`matmul` eagerly once on each stream before capturing on it (the graph runner's
    warm-up does), and :meth:`close` after every graph that captured it is destroyed.
    """

    def __init__(self, cupy, workspace_bytes=WORKSPACE_BYTES):
        self.cupy = cupy
        self.lib, self.path = find_libcublas()
        lib = self.lib
        vp, i32, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasDestroy_v2.argtypes = [vp]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, sz]
        lib.cublasGetVersion_v2.argtypes = [vp, ctypes.POINTER(i32)]
        lib.cublasGemmEx.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, vp, i32, i32,
                                     vp, vp, i32, i32, i32, i32]
        for fn in (lib.cublasCreate_v2, lib.cublasDestroy_v2, lib.cublasSetStream_v2,
                   lib.cublasSetWorkspace_v2, lib.cublasGetVersion_v2, lib.cublasGemmEx):
            fn.restype = i32
        self._handle = vp()
        self._check(lib.cublasCreate_v2(ctypes.byref(self._handle)), "cublasCreate_v2")
        self.workspace = cupy.empty(int(workspace_bytes), dtype=cupy.uint8)
        self._stream = None
        self._alpha = ctypes.c_float(1.0)  # host scalars (pointer mode host): read at enqueue
        self._beta = ctypes.c_float(0.0)
        v = i32()
        self.version = (int(v.value) if lib.cublasGetVersion_v2(self._handle, ctypes.byref(v)) == 0
                        else None)
        self._set_stream(cupy.cuda.get_current_stream().ptr)

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed: {_STATUS.get(status, status)}")

    def _set_stream(self, ptr):
        lib = self.lib
        self._check(lib.cublasSetStream_v2(self._handle, ctypes.c_void_p(ptr or None)),
                    "cublasSetStream_v2")
        # SetStream resets the workspace to cuBLAS' own pool: hand ours back every time.
        self._check(lib.cublasSetWorkspace_v2(self._handle, ctypes.c_void_p(self.workspace.data.ptr),
                                              self.workspace.nbytes), "cublasSetWorkspace_v2")
        self._stream = ptr

    def matmul(self, X, W, out=None):
        """``X[m, k] @ W[k, n]`` for bf16 (uint16-stored) C-contiguous arrays on the current stream.

        ``out``: optional ``[m, n]`` uint16 C-contiguous destination (allocated otherwise, from
        the current CuPy allocator). Returns the product.
        """
        cupy = self.cupy
        if self._handle is None:
            raise RuntimeError("Cublas handle is closed")
        if X.ndim != 2 or W.ndim != 2 or X.shape[1] != W.shape[0]:
            raise ValueError(f"matmul shapes {X.shape} @ {W.shape} do not match")
        if X.dtype.itemsize != 2 or W.dtype.itemsize != 2:
            raise ValueError(f"matmul takes bf16 as 2-byte storage, got {X.dtype}, {W.dtype}")
        if not (X.flags.c_contiguous and W.flags.c_contiguous):
            raise ValueError("matmul needs C-contiguous operands")
        m, k = X.shape
        n = W.shape[1]
        if out is None:
            out = cupy.empty((m, n), dtype=cupy.uint16)
        elif out.shape != (m, n) or out.dtype.itemsize != 2 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous [{m}, {n}] 2-byte array, got {out.shape}")
        if m == 0 or n == 0:
            return out
        if k == 0:
            out.fill(0)
            return out
        ptr = cupy.cuda.get_current_stream().ptr
        if ptr != self._stream:
            self._set_stream(ptr)
        self._check(self.lib.cublasGemmEx(
            self._handle, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, ctypes.byref(self._alpha),
            ctypes.c_void_p(W.data.ptr), CUDA_R_16BF, n,
            ctypes.c_void_p(X.data.ptr), CUDA_R_16BF, k,
            ctypes.byref(self._beta), ctypes.c_void_p(out.data.ptr), CUDA_R_16BF, n,
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx")
        return out

    def close(self):
        """Destroy the handle (after the graphs that captured its GEMMs). Idempotent."""
        if self._handle is not None and self._handle.value:
            try:
                self.cupy.cuda.get_current_stream().synchronize()
            except Exception:
                pass
            self.lib.cublasDestroy_v2(self._handle)
        self._handle = None
        self.workspace = None
