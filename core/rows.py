"""The one row-buffer check: every buffer that crosses a layer boundary is a C-contiguous 2-D
array ``[rows, width]`` (docs/internals.md, "Row buffers").

Works on any array with ``ndim``, ``shape``, ``strides`` and ``flags.c_contiguous`` (NumPy,
CuPy); imports nothing of the backends.
"""

from .errors import InputError

__all__ = ["check_rows"]


def check_rows(arr, name, *, width=None, op=None, error=InputError):
    """Return ``arr`` if it is a C-contiguous 2-D row buffer (of ``width`` columns), else raise.

    Args:
        arr: the array to check.
        name: the argument's name in messages (``"x"``, ``"recv"``...).
        width: the required number of columns, or None for any.
        op: the operation named in messages (``"all_gather"``), or None.
        error: the exception class raised (:class:`~dpgather.core.errors.InputError`).
    """
    where = f"{op}: " if op else ""
    shape = tuple(arr.shape)
    if arr.ndim != 2:
        raise error(f"{where}{name} must be 2-D [rows, {width or 'width'}], got shape {shape}")
    if width is not None and shape[1] != width:
        raise error(f"{where}{name} must have {width} columns, got shape {shape}")
    if not arr.flags.c_contiguous:
        raise error(f"{where}{name} must be C-contiguous, got shape {shape} with strides "
                    f"{tuple(arr.strides)}; pass a contiguous copy")
    return arr
