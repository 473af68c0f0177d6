"""The optional array frameworks (PyTorch, JAX) for the tests: imported, or the test skipped.

:func:`require` is ``pytest.importorskip`` that also skips, naming the error, when the framework
is installed but fails to import in this environment (a GPU image whose PyTorch raises a
``RuntimeError`` while it registers its own operators, for one): dpgather never imports a
framework itself, so such an environment says nothing about dpgather, and the skip reason shows
in the ``-rs`` summary instead of a failure of every test that touches the framework.
"""

from __future__ import annotations

import importlib

import pytest


def require(name: str, reason: str | None = None):
    """The module ``name``, or a skip: ``reason`` when it is not installed, the import error's
    type and message when it is installed but does not import."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(reason or f"{name} is not installed")
    except Exception as e:  # noqa: BLE001 - a broken installation of an optional framework
        pytest.skip(f"{name} is installed but fails to import here: {type(e).__name__}: {str(e).splitlines()[0]}")
