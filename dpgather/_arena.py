"""Per-role grow-only buffers that hand out exact-size views (docs/design.md section 6).

Each *role* (``gathered``, ``staging``, ``combine``, ``output``, ``logits``, ``logits_output``)
owns one flat byte buffer. A request for ``rows x width`` elements of a dtype returns a view of
exactly that size at the start of the buffer; the buffer is reallocated only when a request is
larger than what it holds (its high-water mark), so a warm arena allocates nothing per step.

A view stays valid until the next request of the same role: the caller must not keep a gathered
buffer across the next ``gather`` (copy it if needed). :meth:`Arena.generation` counts a role's
requests, so an asynchronous handle can tell whether its view was handed out again since.

Each micro-batch of a ``DpAttention`` has its own arena, so the views of one micro-batch are
never overwritten by the calls of another.
"""

from dpgather.core.errors import InputError

__all__ = ["Arena", "ROLES"]

#: Roles, in the order memory_stats() reports them.
ROLES = ("gathered", "staging", "combine", "output", "logits", "logits_output")

_ALIGN = 256  # bytes: sub-views start at 256-byte boundaries (16-byte vector kernels, NCCL)
#: View shapes a role keeps cached per buffer: a serving loop asks for a few shapes per role
#: (decode batch sizes, graph buckets); beyond this the cache starts over instead of growing.
VIEW_CACHE = 64


def _round_up(n, a):
    return (n + a - 1) // a * a


class _Role:
    __slots__ = ("buf", "reserved", "peak", "allocations", "requests", "ptr", "cache")

    def __init__(self):
        self.buf = None
        self.reserved = 0
        self.peak = 0
        self.allocations = 0
        self.requests = 0
        self.ptr = 0  # address of buf (cached: reading it from the array costs a microsecond)
        self.cache = {}  # specs -> views of the current buf (steady state repeats few shapes)


class Arena:
    """Grow-only byte buffers per role.

    Args:
        alloc: ``alloc(nbytes) -> 1-D uint8 array`` of the backend (NumPy or CuPy).
        growth: when a role must grow, it grows to ``max(request, growth * reserved)`` so that a
            slowly rising high-water mark does not reallocate every step.
        retire: ``retire(old_buffer)`` is called with a role's previous buffer when it grows
            (instead of dropping it): with work on several streams the owner keeps it until the
            device finished every operation that may still read it (a stream-ordered memory
            pool would otherwise hand it to an allocation on another stream). None: drop it.
    """

    def __init__(self, alloc, growth=1.25, retire=None):
        self._alloc = alloc
        self._growth = growth
        self._retire = retire
        self._roles = {r: _Role() for r in ROLES}

    def reserve(self, role, nbytes):
        """Make ``role`` hold at least ``nbytes`` (start-up preallocation, or growth).

        Raises:
            InputError: the allocation failed (out of memory, or a size no allocator takes); the
                role keeps its previous buffer, so the arena stays usable.
        """
        st = self._roles[role]
        if nbytes > st.reserved:
            want = _round_up(nbytes, _ALIGN)
            old, st.buf = st.buf, None  # let the old buffer go first: peak memory = the new one
            try:
                buf = self._alloc(want)
            except Exception as e:  # MemoryError, CuPy's OutOfMemoryError, ValueError for absurd sizes
                st.buf = old
                raise InputError(
                    f"this step needs {want / 2**20:.1f} MiB for dpgather's '{role}' buffer "
                    f"(it holds {st.reserved / 2**20:.1f} MiB), which could not be allocated: "
                    f"{type(e).__name__}: {e}. Split the step (fewer tokens per replica) or free "
                    "memory; the previous buffers stay usable") from None
            if old is not None and self._retire is not None:
                self._retire(old)
            del old
            st.buf = buf
            st.cache = {}
            st.reserved = int(buf.nbytes)
            st.ptr = _data_ptr(buf)
            st.allocations += 1

    def views(self, role, specs):
        """Exact-size views of one role for one call.

        Args:
            role: one of :data:`ROLES`.
            specs: sequence of ``(rows, width, dtype)``; each view starts at a 256-byte boundary
                after the previous one.

        Returns:
            A list of C-contiguous 2-D arrays ``[rows, width]`` of ``dtype``, in order.
        """
        st = self._roles[role]
        st.requests += 1
        hit = st.cache.get(specs)
        if hit is not None:
            return hit
        offsets = []
        total = 0
        multi = len(specs) > 1
        for rows, width, dtype in specs:
            offsets.append(total)
            # An empty view of a multi-view request still gets its own address: MPI rejects a
            # send buffer equal to the receive buffer even at zero count.
            total = _round_up(total + (rows * width * dtype.itemsize or multi * dtype.itemsize), _ALIGN)
        if total > st.reserved:
            self.reserve(role, max(total, int(st.reserved * self._growth)))
        used = sum(rows * width * dtype.itemsize for rows, width, dtype in specs)
        if used > st.peak:
            st.peak = used
        buf = st.buf
        if buf is None:  # a zero-byte request before the role ever held memory: allocate nothing
            buf = self._alloc(0)
        out = []
        for (rows, width, dtype), off in zip(specs, offsets):
            n = rows * width * dtype.itemsize
            if n or not multi:
                out.append(buf[off:off + n].view(dtype).reshape(rows, width))
            else:  # numpy moves an empty slice to the buffer start; slice a non-empty one instead
                out.append(buf[off:off + dtype.itemsize].view(dtype)[:0].reshape(rows, width))
        if st.buf is not None:
            if len(st.cache) >= VIEW_CACHE:
                st.cache.clear()
            st.cache[specs] = out
        return out

    def view(self, role, rows, width, dtype):
        """One exact-size view (see :meth:`views`)."""
        return self.views(role, ((rows, width, dtype),))[0]

    def generation(self, role):
        """How many requests ``role`` served so far (a view handed out at generation ``g`` is
        still the role's latest one while ``generation(role) == g``)."""
        return self._roles[role].requests

    def contains(self, ptr, nbytes):
        """The role whose buffer overlaps ``[ptr, ptr + nbytes)``, or None."""
        if nbytes <= 0:
            return None
        for name, st in self._roles.items():
            if st.buf is not None:
                lo = st.ptr
                if ptr < lo + st.reserved and lo < ptr + nbytes:
                    return name
        return None

    def stats(self):
        """``{role: {reserved_bytes, peak_view_bytes, allocations, requests}}`` plus ``total``."""
        out = {}
        for name, st in self._roles.items():
            out[name] = {
                "reserved_bytes": st.reserved,
                "peak_view_bytes": st.peak,
                "allocations": st.allocations,
                "requests": st.requests,
            }
        out["total"] = {k: sum(v[k] for v in out.values()) for k in next(iter(out.values()))}
        return out

    @staticmethod
    def total(arenas):
        """:meth:`stats` summed over ``arenas`` (the micro-batches of one owner)."""
        out = None
        for arena in arenas:
            st = arena.stats()
            if out is None:
                out = st
                continue
            for role, v in st.items():
                for k, n in v.items():
                    out[role][k] += n
        return out

    def release(self):
        """Drop every buffer (the views handed out earlier must no longer be used)."""
        for st in self._roles.values():
            st.buf = None
            st.cache = {}
            st.reserved = 0
            st.ptr = 0


def _data_ptr(arr):
    """Address of an array's first byte (NumPy or anything with a CUDA array interface)."""
    iface = getattr(arr, "__array_interface__", None) or arr.__cuda_array_interface__
    return iface["data"][0]
