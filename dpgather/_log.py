"""Logging: one ``logging`` logger per module under ``"dpgather"``, the rank in every record.

``DPGATHER_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING`` (default), ``ERROR``) sets the level of
the ``"dpgather"`` logger when the first dpgather logger is made, unless the application already
configured it; records go to stderr prefixed with ``[dpgather rank R/T]`` (the rank is known
from the launcher's environment before MPI starts, and from MPI once a ``DpAttention`` exists).
Applications that configure ``logging`` themselves keep full control: dpgather adds its handler
only when the ``"dpgather"`` logger has none and ``DPGATHER_LOG_LEVEL`` is set or the root logger
has no handler.
"""

import logging
import os

__all__ = ["get_logger", "set_rank"]

_ROOT = "dpgather"
_RANK_VARS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
              ("PMIX_RANK", None), ("SLURM_PROCID", "SLURM_NTASKS"))
_state = {"rank": None, "size": None, "configured": False}


def _env_rank():
    for rvar, svar in _RANK_VARS:
        r = os.environ.get(rvar)
        if r is not None and r.isdigit():
            s = os.environ.get(svar) if svar else None
            return int(r), (int(s) if s and s.isdigit() else None)
    return None, None


class _RankFilter(logging.Filter):
    def filter(self, record):
        r, s = _state["rank"], _state["size"]
        if r is None:
            r, s = _env_rank()
        record.dpg_rank = "?" if r is None else (f"{r}/{s}" if s else str(r))
        return True


def _configure():
    if _state["configured"]:
        return
    _state["configured"] = True
    root = logging.getLogger(_ROOT)
    level = os.environ.get("DPGATHER_LOG_LEVEL", "").strip().upper()
    if level:
        root.setLevel(getattr(logging, level, logging.WARNING))
    if not root.handlers and (level or not logging.getLogger().handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[dpgather rank %(dpg_rank)s] %(levelname)s %(name)s: %(message)s"))
        h.addFilter(_RankFilter())
        root.addHandler(h)
        if not level:
            root.setLevel(logging.WARNING)


def get_logger(name):
    """The logger ``dpgather.<name>`` (configured from ``DPGATHER_LOG_LEVEL`` on first use)."""
    _configure()
    return logging.getLogger(f"{_ROOT}.{name}")


def set_rank(rank, size):
    """Record this process's rank for every later record (called by ``DpAttention``)."""
    _state["rank"], _state["size"] = int(rank), int(size)
