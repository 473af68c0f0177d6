"""The quantized gather's result: the wire rows as fp8 values and scales, in the caller's framework.

:meth:`DpAttention.gather_fp8 <dpgather.DpAttention.gather_fp8>` gathers *wire rows*
(``docs/fp8.md``): row ``i`` of the ``gathered`` arena view ``G`` (uint8 ``[rows, W]``, ``W =
H + 4 * H / group_size``) holds token ``i``'s ``H`` float8 e4m3fn bytes, then its ``H /
group_size`` float32 scales. :class:`Fp8Rows` hands both out without a copy: ``q`` is ``G[:, :H]``
and ``scales`` the float32 view of ``G[:, H:]`` (both row-strided, ``W`` bytes per row); JAX,
which takes only compact arrays through DLPack, gets ``G`` and slices it (XLA copies on use).
"""

import sys
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Fp8Rows", "Fp8Views"]


class Fp8Rows(NamedTuple):
    """What :meth:`DpAttention.gather_fp8` returns (docs/fp8.md).

    Attributes:
        q: ``[gathered_rows, H]`` uint8 storage of float8 e4m3fn values, rows ``W`` bytes apart
            (a view: ``q.view(torch.float8_e4m3fn)`` in PyTorch, ``q.view(ml_dtypes.float8_e4m3fn)``
            in NumPy; CuPy has no fp8 dtype).
        scales: ``[gathered_rows, H // group_size]`` float32, rows ``W / 4`` elements apart:
            channel ``c`` of row ``i`` is ``q[i, c] * scales[i, c // group_size]``.
        wire: the whole ``[gathered_rows, W]`` uint8 buffer both view (compact).
    """

    q: Any
    scales: Any
    wire: Any


class Fp8Views:
    """Splits wire buffers into :class:`Fp8Rows` for one configuration (``H``, ``fmt``) and keeps
    the views of the arena buffers it has seen, so a repeated step hands out the same objects
    (the backend caches its exports per view)."""

    _LIMIT = 64

    def __init__(self, backend, hidden_size, fmt):
        self.be, self.H, self.fmt = backend, hidden_size, fmt
        self._views = {}

    def split(self, G):
        """``(q, scales)`` backend views of the wire buffer ``G``."""
        hit = self._views.get(id(G))
        if hit is not None and hit[0] is G:
            return hit[1], hit[2]
        H = self.H
        q, s = G[:, :H], G.view(np.float32)[:, H // 4:]
        if len(self._views) >= self._LIMIT:
            self._views.clear()
        self._views[id(G)] = (G, q, s)
        return q, s

    def export(self, G, origin):
        """:class:`Fp8Rows` of ``G`` in the caller's framework (``origin`` from the backend's
        ``wrap``; its bfloat16 flag does not apply to these dtypes)."""
        if origin is not None and origin[0] == "jax":
            from ._interop import Exported, plain_alias

            jax = sys.modules["jax"]
            g = jax.dlpack.from_dlpack(Exported(plain_alias(G), False))
            n, H = G.shape[0], self.H
            # the group count spelled out: reshape(n, -1, 4) of a step of no rows divides by zero
            s = jax.lax.bitcast_convert_type(g[:, H:].reshape(n, self.fmt.groups(H), 4), jax.numpy.float32)
            return Fp8Rows(g[:, :H], s, g)
        plain = None if origin is None else (origin[0], False)
        q, s = self.split(G)
        be = self.be
        return Fp8Rows(be.export(q, plain), be.export(s, plain), be.export(G, plain))
