"""Logging: one ``logging`` logger per module under ``"dpgather"``, the rank in every record.

Every record of a dpgather logger carries the attribute ``dpg_rank`` (``"R/T"``: known from
the launcher's environment before MPI starts, from MPI once a ``DpAttention`` exists; ``"?"``
outside a job).

- ``DPGATHER_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``, ``CRITICAL``, any case, or a
  number; read when dpgather is imported) sets the level of the ``"dpgather"`` logger. Unset,
  that logger inherits the root logger's level (``WARNING`` unless the application set one).
- Where the application has configured no logging (the root logger has no handler when a record
  is emitted), dpgather's own handler writes the record to stderr as
  ``[dpgather rank R/T] LEVEL dpgather.MODULE: message`` (``WARNING`` and up, or from the
  variable's level).
- Where the application has configured logging, dpgather's handler stays silent and records
  propagate to the application's handlers, in the application's format and levels; its formats
  may use ``%(dpg_rank)s`` for dpgather's records.
"""

import logging
import os

__all__ = ["get_logger", "set_rank"]

_ROOT = "dpgather"
_RANK_VARS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
              ("PMIX_RANK", None), ("SLURM_PROCID", "SLURM_NTASKS"))
_state = {"rank": None, "size": None, "configured": False}
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "WARN": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


def _env_rank():
    for rvar, svar in _RANK_VARS:
        r = os.environ.get(rvar)
        if r is not None and r.isdigit():
            s = os.environ.get(svar) if svar else None
            return int(r), (int(s) if s and s.isdigit() else None)
    return None, None


class _RankFilter(logging.Filter):
    """Adds ``record.dpg_rank`` (on each dpgather logger, so every handler sees it)."""

    def filter(self, record):
        r, s = _state["rank"], _state["size"]
        if r is None:
            r, s = _env_rank()
        record.dpg_rank = "?" if r is None else (f"{r}/{s}" if s else str(r))
        return True


_RANK_FILTER = _RankFilter()


class _FallbackHandler(logging.StreamHandler):
    """stderr, with the rank, for applications that configured no logging of their own."""

    def emit(self, record):
        if logging.getLogger().handlers:  # the application's handlers get the record (propagation)
            return
        super().emit(record)


def _configure():
    if _state["configured"]:
        return
    _state["configured"] = True
    root = logging.getLogger(_ROOT)
    root.addFilter(_RANK_FILTER)
    level = os.environ.get("DPGATHER_LOG_LEVEL", "").strip().upper()
    bad = None
    value = None
    if level:
        value = int(level) if level.isdigit() else _LEVELS.get(level)
        if value is None:
            bad, value = level, logging.WARNING
        root.setLevel(value)
    if not any(isinstance(h, _FallbackHandler) for h in root.handlers):
        h = _FallbackHandler()
        h.setFormatter(logging.Formatter("[dpgather rank %(dpg_rank)s] %(levelname)s %(name)s: %(message)s"))
        h.setLevel(logging.WARNING if value is None else logging.NOTSET)
        root.addHandler(h)
    if bad is not None:
        root.warning("DPGATHER_LOG_LEVEL=%s is not a level (DEBUG, INFO, WARNING, ERROR, CRITICAL or a "
                     "number); using WARNING", bad)


def get_logger(name):
    """The logger ``dpgather.<name>`` (see the module docstring)."""
    _configure()
    log = logging.getLogger(f"{_ROOT}.{name}")
    if _RANK_FILTER not in log.filters:
        log.addFilter(_RANK_FILTER)
    return log


def set_rank(rank, size):
    """Record this process's rank for every later record (called by ``DpAttention``)."""
    _state["rank"], _state["size"] = int(rank), int(size)
