"""The one row-buffer check: every buffer that crosses a layer boundary is a C-contiguous 2-D
array ``[rows, width]`` (docs/internals.md, "Row buffers"); beside it the one check of the int64
descriptor arrays the kernels read their counts from.

Works on any array with ``ndim``, ``shape``, ``strides``, ``dtype`` and ``flags.c_contiguous``
(NumPy, CuPy); imports nothing of the backends.
"""

from .errors import InputError

__all__ = ["check_rows", "check_desc"]


def _type_name(of):
    return f"{of.__module__.split('.')[0]}.{of.__name__}"


def check_rows(arr, name, *, width=None, op=None, of=None, writable=False, row_bytes=None,
               error=InputError):
    """Return ``arr`` if it is a C-contiguous 2-D row buffer, else raise naming ``name``.

    Args:
        arr: the array to check.
        name: the argument's name in messages (``"x"``, ``"recv"``...).
        width: the required number of columns, or None for any.
        op: the operation named in messages (``"all_gather"``), or None.
        of: the array type required (``numpy.ndarray``, ``cupy.ndarray``), or None for any.
        writable: also require a writable array (arrays without a ``writeable`` flag, CuPy's,
            always are).
        row_bytes: the required bytes per row (``shape[1] * itemsize``), or None for any.
        error: the exception class raised (:class:`~dpgather.core.errors.InputError`).
    """
    where = f"{op}: " if op else ""
    if of is not None and not isinstance(arr, of):
        raise error(f"{where}{name} must be a {_type_name(of)}, got {type(arr).__name__}")
    shape = tuple(arr.shape)
    if arr.ndim != 2:
        raise error(f"{where}{name} must be 2-D [rows, {width or 'width'}], got shape {shape}")
    if width is not None and shape[1] != width:
        raise error(f"{where}{name} must have {width} columns, got shape {shape}")
    if not arr.flags.c_contiguous:
        raise error(f"{where}{name} must be C-contiguous, got shape {shape} with strides "
                    f"{tuple(arr.strides)}; pass a contiguous copy")
    if writable and not getattr(arr.flags, "writeable", True):
        raise error(f"{where}{name} must be writable, got a read-only array of shape {shape}")
    if row_bytes is not None and shape[1] * arr.dtype.itemsize != row_bytes:
        raise error(f"{where}{name} rows are {shape[1]} x {arr.dtype} = {shape[1] * arr.dtype.itemsize} "
                    f"bytes, expected {row_bytes} bytes")
    return arr


def check_desc(desc, need, *, name="desc", op=None, of=None, error=InputError):
    """Return ``desc`` if it is a 1-D C-contiguous int64 array of at least ``need`` entries.

    Args: as :func:`check_rows`; ``need`` is the number of entries the call reads.
    """
    where = f"{op}: " if op else ""
    if (of is not None and not isinstance(desc, of)) or getattr(desc, "dtype", None) != "int64" \
            or desc.ndim != 1 or not desc.flags.c_contiguous:
        kind = _type_name(of) if of is not None else "array"
        raise error(f"{where}{name} must be a 1-D C-contiguous int64 {kind}, got {type(desc).__name__} "
                    f"dtype={getattr(desc, 'dtype', None)} shape={getattr(desc, 'shape', None)}")
    if desc.shape[0] < need:
        raise error(f"{where}{name} must have at least {need} entries for this call, got {desc.shape[0]}")
    return desc
