"""The step ledger: what every rank issued since its previous ``sync()``, and the verdicts.

One host collective per step carries, after the planner's record, five **control fields**
(:data:`CONTROL`): the step's sequence number, a hash and a count of the data-plane calls this
rank issued since its previous ``sync()``, a :class:`Status` (a call failed its checks here; the
P2P transport reported a device error or a signature mismatch) and the micro-batch the
``sync()`` plans. From the gathered table every rank reaches the same :class:`Verdict`
(docs/reliability.md, "Each step"). ``strict=True`` adds one small exchange per call
(:meth:`StepLedger.agree_call`).

The ledger also knows, from synced data only, **which micro-batch a call is for** when the call
itself cannot say (a bad ``plan``): every rank issues the same calls in the same order, so the
peers' call of an operation is for the oldest synced micro-batch that has not issued that
operation since its ``sync()`` (:meth:`StepLedger.expected`). The failing rank issues the
collectives of that step, so no peer waits.

The ledger never acts on its owner: it returns verdicts (the error to raise, and whether the
``DpAttention`` must be aborted), and the owner carries them out. It uses the per-step sync
(:class:`dpgather.dist.sync.StepSync`) only to share error messages after a failure.
"""

import enum
from typing import List, NamedTuple, Optional

import numpy as np

from dpgather.core import (
    RECORD_WIDTH,
    CollectiveTimeout,
    ConfigError,
    DpGatherError,
    InconsistentStepError,
    InputError,
)

from ._layout import mix

__all__ = ["StepLedger", "Status", "Verdict", "CONTROL", "SYNC_WIDTH"]

#: The control fields after the planner's record, in order.
CONTROL = ("sequence", "call_hash", "calls", "status", "micro_batch")
_SEQ, _HASH, _CALLS, _STATUS, _MB = range(RECORD_WIDTH, RECORD_WIDTH + len(CONTROL))
#: int32 fields of one rank's step record.
SYNC_WIDTH = RECORD_WIDTH + len(CONTROL)
#: The planner record's field 1 of a batch that failed to encode: an InputError or a ConfigError.
_BAD_INPUT, _BAD_CONFIG = 1, 2
#: The pull transport's device error codes (docs/p2p.md): a wait outlived timeout_s; the ranks
#: entered one collective with different signatures.
_DEVICE_TIMEOUT, _DEVICE_SIGNATURE = 1, 2


class Status(enum.IntEnum):
    """What a rank reports about its calls since its previous ``sync()``."""

    OK = 0
    INPUT = 1  #: a call failed its checks (the rank still issued the step's collectives)
    DEVICE = 2  #: the P2P transport reported a device error (a wait outlived timeout_s)
    MISMATCH = 3  #: the P2P transport saw ranks enter one collective with different signatures


class Verdict(NamedTuple):
    """What the owner must do: raise ``error``; first abort when ``abort`` names a reason."""

    error: DpGatherError
    abort: Optional[str] = None


def _i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


class StepLedger:
    """The calls of one rank between two ``sync()`` calls, and the verdicts (module docstring).

    Args:
        sync: the per-step exchange (``exchange(record)``, ``allgather_obj(obj, what)``).
        rank: this rank (in messages).
        micro_batches: how many micro-batches the owner plans.
    """

    def __init__(self, sync, rank: int, micro_batches: int):
        self._sync = sync
        self.rank = rank
        self._seq = 0
        self._hash = 0
        self._calls = 0
        self._status = Status.OK
        self._message: Optional[str] = None
        self._sent: Optional[str] = None  # the message of the step last sealed
        self._expect = np.zeros(len(CONTROL), dtype=np.int32)
        self._order: List[int] = []  # micro-batches, oldest sync first
        self._issued = [set() for _ in range(micro_batches)]  # op codes issued since each sync

    # -- calls ------------------------------------------------------------------------------
    def call(self, op: int, mb: Optional[int], sig: int) -> None:
        """Record a call of operation ``op`` issuing the collectives of micro-batch ``mb``
        (None: no step) with signature ``sig``."""
        self._hash = mix(self._hash, sig)
        self._calls += 1
        if mb is not None:
            self._issued[mb].add(op)

    def failed(self, error: Exception) -> None:
        """A call failed its checks on this rank: every rank raises at the next ``sync()``."""
        self._status = Status.INPUT
        self._message = f"{type(error).__name__}: {error}"

    def expected(self, op: int) -> Optional[int]:
        """The micro-batch the peers' call of ``op`` is for: the oldest synced micro-batch that
        has not issued ``op`` since its ``sync()``, else the latest synced one (None before the
        first ``sync()``)."""
        for mb in self._order:
            if op not in self._issued[mb]:
                return mb
        return self._order[-1] if self._order else None

    def recent(self, n: int) -> Optional[List[int]]:
        """The ``n`` micro-batches synced last, in the order they were synced (None when fewer
        than ``n`` were): the steps an overlapped graph step of ``n`` micro-batches covers."""
        return list(self._order[-n:]) if len(self._order) >= n else None

    def synced(self, mb: int) -> None:
        """``sync()`` planned micro-batch ``mb``: it starts issuing its calls afresh."""
        if mb in self._order:
            self._order.remove(mb)
        self._order.append(mb)
        self._issued[mb].clear()

    # -- the step record ----------------------------------------------------------------------
    def seal(self, rec: np.ndarray, mb: int, device_error: int = 0) -> None:
        """Write the control fields of this step into ``rec`` (``[SYNC_WIDTH]`` int32; the
        planner's fields are written already) and start a new step. ``device_error``: the P2P
        transport's error code (0 when healthy)."""
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        status, message = self._status, self._message
        if device_error:
            status = Status.MISMATCH if device_error == _DEVICE_SIGNATURE else Status.DEVICE
            message = (f"the P2P transport reported error {device_error} on rank {self.rank} (1: a peer did not "
                       f"arrive within timeout_s, 2: the ranks issued different operations)")
        rec[_SEQ], rec[_HASH], rec[_CALLS], rec[_STATUS], rec[_MB] = self._seq, _i32(self._hash), self._calls, \
            status, mb
        self._sent = message
        self._hash = self._calls = 0
        self._status, self._message = Status.OK, None

    def verdict(self, table: np.ndarray, rec: np.ndarray, batch_error: Optional[Exception]) -> Optional[Verdict]:
        """The verdict on the gathered ``table`` (``[T, SYNC_WIDTH]``) of the step this rank
        sent as ``rec``; None when the step may be planned. ``batch_error``: why this rank's
        batch could not be encoded (its record carries a zero magic then)."""
        ctl = table[:, RECORD_WIDTH:]
        expect = self._expect
        expect[:] = rec[RECORD_WIDTH:]
        expect[_STATUS - RECORD_WIDTH] = Status.OK
        if (ctl != expect).any():  # a rank differs from this one, or reports a failure
            if (ctl[:, :4] != expect[:4]).any():
                return self._step_failed(ctl)
            mbs = ctl[:, 4]
            if (mbs >= 0).all():  # (an invalid micro_batch is an invalid batch: below)
                return Verdict(InconsistentStepError(
                    f"ranks called sync() for different micro-batches (micro_batch per rank: {mbs.tolist()}); "
                    "every rank must sync the same micro-batch at the same point. The DpAttention is aborted"),
                    "ranks called sync() for different micro-batches")
        if not table[:, 0].all():  # a zero magic: every rank sees it, so all raise the same class
            failed = np.flatnonzero(table[:, 0] == 0)
            msgs = self._sync.allgather_obj(None if batch_error is None else f"{type(batch_error).__name__}: "
                                            f"{batch_error}", "sync (sharing an invalid batch's error)")
            if batch_error is not None:
                return Verdict(batch_error)
            cls = ConfigError if (table[failed, 1] == _BAD_CONFIG).any() else InputError
            return Verdict(cls(f"rank(s) {failed.tolist()} passed an invalid batch to sync(); nothing was planned. "
                               f"rank {failed[0]}: {msgs[failed[0]]}"))
        return None

    @staticmethod
    def bad_batch(rec: np.ndarray, error: Exception) -> None:
        """Mark this rank's record as "the batch failed to encode" (magic 0; field 1 says how)."""
        rec[:RECORD_WIDTH] = 0
        rec[1] = _BAD_CONFIG if isinstance(error, ConfigError) else _BAD_INPUT

    def _step_failed(self, ctl: np.ndarray) -> Verdict:
        """The verdict for a previous step that went wrong somewhere (the same on every rank)."""
        msgs = self._sync.allgather_obj(self._sent, "sync (sharing the previous step's errors)")
        seq = ctl[:, 0].tolist()
        if len(set(seq)) > 1:
            return Verdict(InconsistentStepError(
                f"ranks called sync() a different number of times (sync count per rank: {seq}); "
                "every rank must call sync() once per step. The DpAttention is aborted"),
                "ranks called sync() a different number of times")
        status = ctl[:, 3].tolist()
        bad = [r for r, s in enumerate(status) if s]
        detail = "; ".join(f"rank {r}: {msgs[r]}" for r in bad if msgs[r])
        if Status.MISMATCH in status:
            return Verdict(InconsistentStepError(
                f"the ranks issued different operations in the previous step (the P2P transport's signatures "
                f"differ): {detail}. The DpAttention is aborted"), f"the ranks issued different operations ({detail})")
        if Status.DEVICE in status:
            return Verdict(CollectiveTimeout(
                f"a device transfer of the previous step failed on rank(s) "
                f"{[r for r in bad if status[r] == Status.DEVICE]}: {detail}. The DpAttention is aborted"),
                f"a device transfer failed ({detail})")
        if (ctl[:, 1] != ctl[0, 1]).any() or (ctl[:, 2] != ctl[0, 2]).any():
            return Verdict(InconsistentStepError(
                "in the previous step the ranks issued different data-plane calls (operation, plan, "
                f"contribution/reduce, dtype or width): calls per rank {ctl[:, 2].tolist()}, call hashes "
                f"{[int(h) & 0xFFFFFFFF for h in ctl[:, 1].tolist()]}"
                + (f"; {detail}" if detail else "")
                + ". Every rank must issue the same calls with the plan of its latest sync(). "
                  "The DpAttention is aborted (mismatched collectives may be pending)"),
                "ranks issued different data-plane calls")
        return Verdict(InputError(
            f"a data-plane call of the previous step failed its checks on rank(s) {bad}: {detail}. That step's "
            "outputs are invalid on every rank; this sync() planned nothing: call sync() again"))

    # -- strict=True ----------------------------------------------------------------------------
    def agree_call(self, name: str, sig: int, error: Optional[Exception]) -> Optional[Verdict]:
        """``strict=True``: one small exchange per call. Returns None when every rank passed its
        checks with the same call signature, else the verdict (nothing was moved anywhere)."""
        rec = np.zeros(SYNC_WIDTH, dtype=np.int32)
        rec[0] = 0 if error is None else 1
        rec[1] = _i32(sig)
        table = self._sync.exchange(rec)
        bad = np.flatnonzero(table[:, 0]).tolist()
        if not bad and not (table[:, 1] != table[0, 1]).any():
            return None
        msgs = self._sync.allgather_obj(None if error is None else f"{type(error).__name__}: {error}",
                                        f"{name} (strict agreement)")
        if bad:
            if error is not None:
                return Verdict(error)
            return Verdict(InputError(f"{name}() failed its checks on rank(s) {bad}: "
                                      + "; ".join(f"rank {r}: {msgs[r]}" for r in bad) + ". Nothing was moved"))
        return Verdict(InconsistentStepError(
            f"{name}(): the ranks called different operations or passed different plans, contributions, dtypes or "
            f"widths (call signatures {[int(v) & 0xFFFFFFFF for v in table[:, 1]]}). Nothing was moved"))
