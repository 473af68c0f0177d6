"""The dpgather exception hierarchy.

Every error dpgather raises on purpose is a :class:`DpGatherError`. Messages name the argument, the
value received and what was expected, so the fix is readable from the message alone. Errors are
plain ``Exception`` subclasses whose constructor takes one message, so they survive pickling across
processes (mpi4py's object collectives, multiprocessing).
"""

__all__ = [
    "DpGatherError",
    "ConfigError",
    "InputError",
    "InconsistentBatchError",
    "InconsistentStepError",
    "CollectiveTimeout",
    "BackendUnavailable",
]


class DpGatherError(Exception):
    """Base class of every error dpgather raises on purpose."""


class ConfigError(DpGatherError, ValueError):
    """A configuration value is invalid or ranks were configured differently.

    Examples: ``attn_tp_size`` does not divide the world size, an unknown policy, graph buckets that
    are not positive multiples of ``attn_tp_size``, a speculative forward mode without ``SpecConfig``.
    """


class InputError(DpGatherError, ValueError):
    """An argument of one call is invalid: dtype, shape, hidden size, contiguity, aliasing,
    negative or inconsistent counts, a buffer too small, a malformed record table."""


class InconsistentBatchError(DpGatherError):
    """The attn_tp ranks of one DP replica reported different batches for the same step.

    Raised on every rank, before any data collective of the step, so nothing is written and no
    rank is left waiting in a collective the others skipped.
    """


class InconsistentStepError(InconsistentBatchError):
    """The ranks issued different data-plane operations in one step (operation, plan,
    contribution/reduce, dtype or width).

    Raised on every rank: at the call where the transport compares the ranks' operations (the
    P2P transport's signature check), else at the next ``sync()`` from the step's call hash. The
    ``DpAttention`` is aborted (its communicators may hold mismatched collectives).
    """


class CollectiveTimeout(DpGatherError, TimeoutError):
    """A collective (or the per-step sync) did not complete within ``timeout_s``.

    The communicator is aborted (NCCL) or marked broken (MPI host backend); the object refuses
    further use afterwards.
    """


class BackendUnavailable(DpGatherError, RuntimeError):
    """A backend was requested that this machine cannot provide (no CuPy, no GPU, no NCCL, no MPI)."""
