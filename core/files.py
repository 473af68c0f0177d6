"""The files dpgather writes and the JSON it reads: written whole or not at all, read strictly.

- Every file dpgather writes -- ``CostModel.save`` and the calibration cache, the tools' reports,
  plots, traces and benchmark results, a rank's exit status -- goes through :func:`write_atomic`,
  so a reader (``DpAttention(cost=None)``, ``dpgather run``, a CI job) sees the previous file or
  the whole new one, never a truncated one, also when the disk fills up mid-write.
- Every JSON text dpgather reads (``CostModel.load``, trace lines) goes through
  :func:`decode_json`, which refuses what Python's ``json`` would silently accept or turn into a
  raw exception: duplicate keys, ``NaN`` / ``Infinity``, integer literals of more than
  :data:`MAX_DIGITS` digits, nesting deeper than the interpreter's recursion limit. Each refusal
  is a :class:`JsonRefused` with a one-line message; the caller adds where.
"""

import contextlib
import json
import os
import tempfile

__all__ = ["write_atomic", "write_json_atomic", "decode_json", "JsonRefused", "MAX_DIGITS"]

#: Longest integer literal :func:`decode_json` accepts (int64 has 19 digits).
MAX_DIGITS = 20
_SHOW = 60  # characters of a key quoted in a message


class JsonRefused(ValueError):
    """A JSON text :func:`decode_json` refuses; the message is one line without the source."""


def _int_literal(text):
    digits = len(text) - (text[:1] == "-")
    if digits > MAX_DIGITS:
        raise JsonRefused(f"an integer literal with {digits} digits (at most {MAX_DIGITS})")
    return int(text)


def _no_constant(name):
    raise JsonRefused(f"{name} is not a JSON number")


def _object(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            shown = repr(key) if len(repr(key)) <= _SHOW else repr(key)[:_SHOW - 3] + "..."
            raise JsonRefused(f"duplicate key {shown} in one object")
        obj[key] = value
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_int_literal, parse_constant=_no_constant)


def decode_json(text):
    """The JSON value of ``text``, strictly (see the module docstring); raises :class:`JsonRefused`."""
    try:
        return _DECODER.decode(text)
    except JsonRefused:
        raise
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise JsonRefused(f"invalid JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise JsonRefused("nested too deeply") from None
    except ValueError as e:  # anything else the decoder refuses
        raise JsonRefused(f"invalid JSON ({e})") from None


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
