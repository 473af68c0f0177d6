"""Type stubs of the Cython planner :mod:`dpgather.core._planner` (hand-written; keep in sync with
``_planner.pyx``: ``tests/test_stubs.py`` checks the names)."""

from collections.abc import Iterable
from typing import Any, Final, Literal, NoReturn

import numpy as np
import numpy.typing as npt

from .cost import CostModel
from .types import LocalBatch, PaddingMode, SpecConfig, Topology

__all__ = [
    "TRANSPORTS",
    "RECORD_WIDTH",
    "RECORD_MAGIC",
    "RECORD_FIELDS",
    "Plan",
    "Planner",
    "count_tokens",
    "plan",
]

_Policy = Literal["auto", "sglang", "max_len", "sum_len", "varlen"]
_Transport = Literal["auto", "nccl", "p2p", "push"]

#: Transport preferences accepted by the planner.
TRANSPORTS: Final[tuple[str, str, str, str]]
_I64 = npt.NDArray[np.int64]
_I32 = npt.NDArray[np.int32]

#: Number of int32 fields in one per-step record.
RECORD_WIDTH: Final[int]
#: Field 0 of every record: "DPG1" (record format version 1), 0x44504731.
RECORD_MAGIC: Final[int]
#: Names of the record fields, in order.
RECORD_FIELDS: Final[tuple[str, str, str, str, str, str, str, str]]

class Plan:
    """The layout of one step's gathered buffer, identical on every rank (read-only)."""

    @property
    def mode(self) -> PaddingMode: ...
    @property
    def logits_mode(self) -> PaddingMode: ...
    @property
    def graph(self) -> bool: ...
    @property
    def skip(self) -> bool: ...
    @property
    def is_extend_in_batch(self) -> bool: ...
    @property
    def bucket(self) -> int: ...
    @property
    def gathered_rows(self) -> int: ...
    @property
    def logits_rows(self) -> int: ...
    @property
    def dp_size(self) -> int: ...
    @property
    def attn_tp_size(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def fingerprint(self) -> int: ...
    @property
    def predicted_us(self) -> tuple[float, float, float]: ...
    @property
    def policy(self) -> str: ...
    @property
    def transport(self) -> str: ...
    @property
    def predicted_p2p_us(self) -> float: ...
    @property
    def predicted_push_us(self) -> float: ...
    @property
    def wire_bytes(self) -> int: ...
    @property
    def num_tokens(self) -> _I64: ...
    @property
    def logits_tokens(self) -> _I64: ...
    @property
    def slot_rows(self) -> _I64: ...
    @property
    def slot_offsets(self) -> _I64: ...
    @property
    def logits_slot_rows(self) -> _I64: ...
    @property
    def logits_offsets(self) -> _I64: ...
    def __init__(self) -> NoReturn: ...
    def as_dict(self) -> dict[str, Any]: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

class Planner:
    """Plans steps for one fixed configuration; the entry point of the per-step sync."""

    @property
    def topology(self) -> Topology: ...
    @property
    def spec(self) -> SpecConfig | None: ...
    @property
    def policy(self) -> str: ...
    @property
    def graph_buckets(self) -> tuple[int, ...]: ...
    @property
    def cost(self) -> CostModel: ...
    @property
    def transport(self) -> str: ...
    @property
    def p2p_rows(self) -> int: ...
    @property
    def p2p_node_size(self) -> int: ...
    @property
    def push_rows(self) -> int: ...
    @property
    def wire_bytes(self) -> int: ...
    def __init__(
        self,
        topology: Topology,
        spec: SpecConfig | None = None,
        policy: _Policy = "auto",
        graph_buckets: Iterable[int] | None = (),
        cost: CostModel | None = None,
        transport: _Transport = "auto",
        p2p_rows: int = 0,
        p2p_node_size: int = 0,
        push_rows: int = 0,
        wire_bytes: int = 0,
    ) -> None: ...
    def record(self, batch: LocalBatch, out: _I32 | None = None) -> _I32: ...
    def plan_batches(self, batches: Iterable[LocalBatch]) -> Plan: ...
    def plan_table(self, table: _I32) -> Plan: ...

def count_tokens(batch: LocalBatch, spec: SpecConfig | None = None) -> tuple[int, int]: ...
def plan(
    batches: Iterable[LocalBatch],
    topology: Topology,
    *,
    spec: SpecConfig | None = None,
    policy: _Policy = "auto",
    graph_buckets: Iterable[int] | None = (),
    cost: CostModel | None = None,
    transport: _Transport = "auto",
    p2p_rows: int = 0,
    p2p_node_size: int = 0,
    push_rows: int = 0,
    wire_bytes: int = 0,
) -> Plan: ...
