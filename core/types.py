"""Pure-Python value types of the planner: topology, forward and padding modes, batches.

These are small immutable objects that users build every step; the Cython planner
(:mod:`dpgather.core._planner`) reads their fields.
"""

import numbers
from enum import IntEnum

from .errors import ConfigError, InputError

__all__ = ["Topology", "ForwardMode", "PaddingMode", "SpecConfig", "LocalBatch", "POLICIES", "P2P_WINDOW_ROWS",
           "PUSH_WINDOW_ROWS", "p2p_window_rows", "push_window_rows", "Fp8Format", "E4M3_MAX", "FP8_SOURCE_DTYPES"]

#: Padding policies accepted by the planner (docs/design.md section 3).
POLICIES = ("auto", "sglang", "max_len", "sum_len", "varlen")
_INT32_MAX = 2**31 - 1


def _check_int(name, value, minimum=None, *, error=InputError):
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise error(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}")
    if value > _INT32_MAX:
        raise error(f"{name} must be <= {_INT32_MAX} (2**31 - 1, the per-step record is int32), got {value}")
    return value


class Topology:
    """The TP group of ``world_size`` ranks split into DP replicas of ``attn_tp_size`` ranks.

    Rank ``r`` belongs to replica ``dp_rank(r) = r // attn_tp_size`` and is rank
    ``attn_tp_rank(r) = r % attn_tp_size`` inside it. ``dp_size = world_size // attn_tp_size``.

    Raises:
        ConfigError: ``world_size < 1``, ``attn_tp_size < 1`` or ``attn_tp_size`` does not divide
            ``world_size``.
    """

    __slots__ = ("world_size", "attn_tp_size", "dp_size")

    def __init__(self, world_size, attn_tp_size=1):
        world_size = _check_int("world_size", world_size, 1, error=ConfigError)
        attn_tp_size = _check_int("attn_tp_size", attn_tp_size, 1, error=ConfigError)
        if world_size % attn_tp_size:
            raise ConfigError(
                f"attn_tp_size={attn_tp_size} must divide world_size={world_size}; "
                f"valid attn_tp_size values: {[a for a in range(1, world_size + 1) if world_size % a == 0]}"
            )
        object.__setattr__(self, "world_size", world_size)
        object.__setattr__(self, "attn_tp_size", attn_tp_size)
        object.__setattr__(self, "dp_size", world_size // attn_tp_size)

    def __setattr__(self, name, value):
        raise AttributeError("Topology is immutable")

    def _check_rank(self, rank):
        rank = _check_int("rank", rank, 0)
        if rank >= self.world_size:
            raise InputError(f"rank must be in [0, {self.world_size}), got {rank}")
        return rank

    def dp_rank(self, rank):
        """The DP replica of global rank ``rank``."""
        return self._check_rank(rank) // self.attn_tp_size

    def attn_tp_rank(self, rank):
        """The rank of ``rank`` inside its replica's attn_tp group."""
        return self._check_rank(rank) % self.attn_tp_size

    def __eq__(self, other):
        return (
            isinstance(other, Topology)
            and self.world_size == other.world_size
            and self.attn_tp_size == other.attn_tp_size
        )

    def __hash__(self):
        return hash((self.world_size, self.attn_tp_size))

    def __repr__(self):
        return (
            f"Topology(world_size={self.world_size}, attn_tp_size={self.attn_tp_size}, "
            f"dp_size={self.dp_size})"
        )


class ForwardMode(IntEnum):
    """What one replica runs this step. The speculative modes need a :class:`SpecConfig`."""

    IDLE = 0
    DECODE = 1
    EXTEND = 2
    TARGET_VERIFY = 3
    DRAFT_DECODE = 4
    DRAFT_EXTEND = 5

    def __str__(self):
        return f"ForwardMode.{self.name}"

    @property
    def is_speculative(self):
        return self in (ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_DECODE, ForwardMode.DRAFT_EXTEND)


class PaddingMode(IntEnum):
    """Layout of the gathered buffer (docs/design.md section 3, mode table)."""

    MAX_LEN = 0
    SUM_LEN = 1
    VARLEN = 2

    def __str__(self):
        return f"PaddingMode.{self.name}"


class SpecConfig:
    """EAGLE-style speculative decoding: ``num_steps`` S draft steps, ``topk`` K draft branches,
    ``num_draft_tokens`` N tokens verified per request."""

    __slots__ = ("num_steps", "topk", "num_draft_tokens")

    def __init__(self, num_steps, topk, num_draft_tokens):
        object.__setattr__(self, "num_steps", _check_int("num_steps", num_steps, 1, error=ConfigError))
        object.__setattr__(self, "topk", _check_int("topk", topk, 1, error=ConfigError))
        object.__setattr__(
            self, "num_draft_tokens", _check_int("num_draft_tokens", num_draft_tokens, 1, error=ConfigError)
        )

    def __setattr__(self, name, value):
        raise AttributeError("SpecConfig is immutable")

    def __eq__(self, other):
        return isinstance(other, SpecConfig) and (
            self.num_steps, self.topk, self.num_draft_tokens
        ) == (other.num_steps, other.topk, other.num_draft_tokens)

    def __hash__(self):
        return hash((self.num_steps, self.topk, self.num_draft_tokens))

    def __repr__(self):
        return (
            f"SpecConfig(num_steps={self.num_steps}, topk={self.topk}, "
            f"num_draft_tokens={self.num_draft_tokens})"
        )


#: Largest finite float8 e4m3fn value: the quantized gather's scale is ``amax / E4M3_MAX``.
E4M3_MAX = 448.0
#: Logical dtypes the quantized gather reads (docs/fp8.md).
FP8_SOURCE_DTYPES = ("float32", "float16", "bfloat16")


class Fp8Format:
    """The wire format of the quantized gather (``DpAttention(fp8=...)``, docs/fp8.md).

    Each token row of ``H`` channels is cut into groups of ``group_size`` channels; each group
    gets one float32 scale ``s = amax / 448`` (``pow2_scales=True``: rounded up to a power of
    two, as DeepGEMM's UE8M0 scales want) and its channels ``x / s`` rounded to float8 e4m3fn.
    A gathered row is ``H`` fp8 bytes followed by the ``H / group_size`` scales: ``wire_bytes(H)
    = H + 4 * H / group_size`` bytes, about half a bfloat16 row at ``group_size = 128``.

    Args:
        group_size: channels per scale (default 128); must divide the hidden size.
        pow2_scales: round every scale up to a power of two (default False).
    """

    __slots__ = ("group_size", "pow2_scales")

    def __init__(self, group_size=128, pow2_scales=False):
        object.__setattr__(self, "group_size", _check_int("group_size", group_size, 1, error=ConfigError))
        if not isinstance(pow2_scales, bool):
            raise ConfigError(f"pow2_scales must be a bool, got {pow2_scales!r}")
        object.__setattr__(self, "pow2_scales", pow2_scales)

    def __setattr__(self, name, value):
        raise AttributeError("Fp8Format is immutable")

    def groups(self, hidden_size):
        """Scales per row."""
        return hidden_size // self.group_size

    def wire_bytes(self, hidden_size):
        """Bytes of one gathered row: ``hidden_size`` fp8 bytes, then 4 bytes per group."""
        return hidden_size + 4 * self.groups(hidden_size)

    def check(self, hidden_size, dtype):
        """ConfigError unless this format fits rows of ``hidden_size`` channels of ``dtype``."""
        if dtype not in FP8_SOURCE_DTYPES:
            raise ConfigError(f"fp8={self!r} quantizes {', '.join(FP8_SOURCE_DTYPES)} rows, got dtype={dtype!r}; "
                              "configure one of those dtypes or leave fp8=None")
        if hidden_size % self.group_size:
            raise ConfigError(f"fp8={self!r}: group_size={self.group_size} must divide hidden_size={hidden_size}")
        if hidden_size % 4:
            raise ConfigError(f"fp8={self!r} needs hidden_size a multiple of 4 (the float32 scales follow the "
                              f"fp8 bytes in each row), got {hidden_size}")

    def __eq__(self, other):
        return isinstance(other, Fp8Format) and (self.group_size, self.pow2_scales) == (
            other.group_size, other.pow2_scales)

    def __hash__(self):
        return hash((self.group_size, self.pow2_scales))

    def __repr__(self):
        return f"Fp8Format(group_size={self.group_size}, pow2_scales={self.pow2_scales})"


class LocalBatch:
    """What one replica's scheduler knows about its batch this step.

    Args:
        mode: a :class:`ForwardMode` (or its int value).
        batch_size: number of requests ``bs`` (>= 0; 0 for IDLE).
        extend_tokens: EXTEND only: tokens to prefill, ``>= batch_size``.
        logprob_tokens: EXTEND only: rows that reach the LM head, in
            ``[batch_size, extend_tokens]``; ``None`` means ``batch_size``.
        can_run_graph: this replica could replay a captured graph this step.

    Raises:
        InputError: negative counts, ``extend_tokens < batch_size``, ``logprob_tokens`` outside
            ``[batch_size, extend_tokens]``, an IDLE batch with requests, extend fields on a
            non-EXTEND mode.
    """

    __slots__ = ("mode", "batch_size", "extend_tokens", "logprob_tokens", "can_run_graph")

    def __init__(self, mode, batch_size=0, extend_tokens=0, logprob_tokens=None, can_run_graph=False):
        try:
            # True == 1.0 == 1 == DECODE: never what the caller meant
            if isinstance(mode, bool) or not isinstance(mode, numbers.Integral):
                raise ValueError(mode)
            mode = ForwardMode(mode)
        except ValueError:
            raise InputError(
                f"mode must be a dpgather.ForwardMode ({', '.join(m.name for m in ForwardMode)}), got {mode!r}"
            ) from None
        batch_size = _check_int("batch_size", batch_size, 0)
        extend_tokens = _check_int("extend_tokens", extend_tokens, 0)
        if logprob_tokens is not None:
            logprob_tokens = _check_int("logprob_tokens", logprob_tokens, 0)
        if mode == ForwardMode.IDLE and batch_size:
            raise InputError(f"batch_size must be 0 for ForwardMode.IDLE, got {batch_size}")
        if mode == ForwardMode.EXTEND:
            if extend_tokens < batch_size:
                raise InputError(
                    f"extend_tokens must be >= batch_size ({batch_size}) for EXTEND, got {extend_tokens}"
                )
            if logprob_tokens is not None and not batch_size <= logprob_tokens <= extend_tokens:
                raise InputError(
                    f"logprob_tokens must be in [batch_size, extend_tokens] = [{batch_size}, "
                    f"{extend_tokens}], got {logprob_tokens}"
                )
        else:
            if extend_tokens:
                raise InputError(f"extend_tokens is for EXTEND only, got {extend_tokens} with {mode.name}")
            if logprob_tokens is not None:
                raise InputError(f"logprob_tokens is for EXTEND only, got {logprob_tokens} with {mode.name}")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "batch_size", batch_size)
        object.__setattr__(self, "extend_tokens", extend_tokens)
        object.__setattr__(self, "logprob_tokens", logprob_tokens)
        if not isinstance(can_run_graph, bool):
            try:
                import numpy as np

                ok = isinstance(can_run_graph, np.bool_)
            except ImportError:  # pragma: no cover
                ok = False
            if not ok:
                raise InputError(f"can_run_graph must be True or False, got {can_run_graph!r}")
        object.__setattr__(self, "can_run_graph", bool(can_run_graph))

    def __setattr__(self, name, value):
        raise AttributeError("LocalBatch is immutable")

    def __eq__(self, other):
        return isinstance(other, LocalBatch) and all(
            getattr(self, f) == getattr(other, f) for f in self.__slots__
        )

    def __hash__(self):
        return hash(tuple(getattr(self, f) for f in self.__slots__))

    def __repr__(self):
        parts = [f"ForwardMode.{self.mode.name}", f"batch_size={self.batch_size}"]
        if self.mode == ForwardMode.EXTEND:
            parts.append(f"extend_tokens={self.extend_tokens}")
            if self.logprob_tokens is not None:
                parts.append(f"logprob_tokens={self.logprob_tokens}")
        if self.can_run_graph:
            parts.append("can_run_graph=True")
        return f"LocalBatch({', '.join(parts)})"


#: Per-replica rows the P2P windows hold at least (every decode batch and EAGLE step fits).
P2P_WINDOW_ROWS = 256


def p2p_window_rows(topology, graph_buckets=(), max_tokens_per_rank=None):
    """Rows one P2P collective can move (``Planner(p2p_rows=...)``), as ``DpAttention`` sizes
    its windows: ``D`` replicas of ``max(max_tokens_per_rank, largest graph bucket,``
    :data:`P2P_WINDOW_ROWS` ``)`` rows, rounded up to ``attn_tp_size``. Steps larger than this go
    over NCCL (the planner decides)."""
    A = topology.attn_tp_size
    per_replica = max(max_tokens_per_rank or 0, max(graph_buckets, default=0), P2P_WINDOW_ROWS)
    return topology.dp_size * (-(-per_replica // A) * A)


#: Per-replica rows the push transport's windows hold (docs/push.md, "Window"): the decode
#: steps where its one-way trip beats the pull's barrier and NCCL (the default model's crossover
#: with the pull is ~115 rows per rank of 14 KB at T = 2), with room for a calibration to move it.
PUSH_WINDOW_ROWS = 256


def push_window_rows(topology):
    """Rows of one replica the push windows hold (``Planner(push_rows=...)``), as ``DpAttention``
    sizes them: :data:`PUSH_WINDOW_ROWS` rounded up to ``attn_tp_size``, whatever the graph
    buckets and ``max_tokens_per_rank`` (larger steps go over the pull or NCCL; the planner
    decides). A window costs ``4 (T-1)`` times this many rows per rank (docs/push.md)."""
    A = topology.attn_tp_size
    return -(-PUSH_WINDOW_ROWS // A) * A

