"""Transitional name for the graph runner of this branch (issue 22): delete at merge, once the
runner calls ``backend.warm()``. The pull kernel's module is :mod:`dpgather.kernels._pull`."""

from ._pull import warm

__all__ = ["warm"]
