"""Files written whole or not at all: the one atomic writer of dpgather.

Every file dpgather writes -- ``CostModel.save`` and the calibration cache, the tools' reports,
plots, traces and benchmark results, a rank's exit status -- goes through :func:`write_atomic`,
so a reader (``DpAttention(cost=None)``, ``dpgather run``, a CI job) sees the previous file or the
whole new one, never a truncated one, also when the disk fills up mid-write.
"""

import contextlib
import json
import os
import tempfile

__all__ = ["write_atomic", "write_json_atomic"]


def write_atomic(path, data, *, binary=False):
    """Write ``data`` to ``path``: all of it or nothing.

    Args:
        path: the file to create or replace.
        data: ``str`` (written as UTF-8), ``bytes``, or a callable ``fn(file)`` that writes into
            the open file object (text mode, UTF-8; binary mode with ``binary=True``).
        binary: open the temporary file in binary mode (for a callable ``data``).

    The content goes to a temporary file in the same folder (the same filesystem, so the rename
    is atomic), is flushed to disk, gets an ordinary file's mode (``0o666`` less the umask, not
    ``mkstemp``'s ``0o600``) and replaces ``path`` with one ``os.replace``. On any error the
    temporary file is removed and the exception propagates: ``path`` keeps its previous content
    (or stays absent).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    binary = binary or isinstance(data, (bytes, bytearray))
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path, obj, indent=1, default=None):
    """Write ``obj`` as JSON (and a final newline) to ``path`` with :func:`write_atomic`
    (``default``: as for ``json.dump``)."""

    def dump(f):
        json.dump(obj, f, indent=indent, default=default)
        f.write("\n")

    write_atomic(path, dump)
