"""Serving traces: what every DP replica runs, step by step (the input of ``dpgather replay``).

A trace is a list of steps; each step holds one :class:`ReplicaStep` per DP replica (the
replica's forward mode and counts, plus the per-request draft acceptance of a DRAFT_EXTEND
step). Traces come from JSON Lines files (:func:`load_trace`, format in ``docs/traces.md``) or
from the seeded synthetic generators (:func:`synthetic`)::

    {"format": "dpgather-trace/1", "dp_size": 4, "spec": {"num_steps": 3, "topk": 1, "num_draft_tokens": 4}}
    {"step": 0, "replicas": [{"mode": "DECODE", "batch_size": 7, "can_run_graph": true}, {"mode": "IDLE"}, ...]}
    {"step": 1, "replicas": [{"mode": "DRAFT_EXTEND", "batch_size": 2, "accept": [3, 1]}, ...]}

Generators (all reproducible from ``seed``; ``mixed`` is the default of ``make run``):

========================  ===============================================================
``balanced-decode``       every replica decodes a similar batch; the load ramps from ~28 to
                          ~280 requests per replica, past the graph buckets, so the second
                          half runs eager
``prefill-burst``         one replica at a time prefills a long prompt in 512-token chunks
                          (EXTEND) while the others decode; a replica occasionally idles
``eagle``                 EAGLE cycles: DRAFT_DECODE x S, TARGET_VERIFY, DRAFT_EXTEND with
                          per-request acceptance drawn from a truncated geometric law
                          (p = 0.91: mean 2.49 accepted of S = 3); idle replicas; now and
                          then a large batch that no graph bucket holds
``mixed``                 all of the above concatenated, plus two all-idle steps
========================  ===============================================================

The format is published as a JSON Schema of one line (:func:`schema`, the file
``trace.schema.json`` next to this module; docs/traces.md). :func:`load_trace` checks the same
rules by hand -- plus those a schema cannot state (they span lines or compare fields) -- and
reports the first violation as ``FILE:LINE: what was expected``. It never raises anything but
:class:`dpgather.InputError` for a bad file: oversized integer literals, deep nesting,
duplicate keys, NaN and counts past int32 are refused with a message like any other mistake.
"""

import json
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np

from dpgather.core import (
    ConfigError,
    DpGatherError,
    ForwardMode,
    InputError,
    LocalBatch,
    SpecConfig,
    count_tokens,
)
from dpgather.core.files import JsonRefused, decode_json, write_atomic

__all__ = [
    "FORMAT", "GENERATORS", "DEFAULT_SPEC", "ACCEPT_P", "ReplicaStep", "Trace",
    "load_trace", "parse_trace", "save_trace", "synthetic", "accept_pmf", "schema",
]

#: The value of the header's ``format`` key.
FORMAT = "dpgather-trace/1"
#: EAGLE configuration of the synthetic traces: S = 3 draft steps, top-1, N = 4 verified tokens.
DEFAULT_SPEC = SpecConfig(num_steps=3, topk=1, num_draft_tokens=4)
#: Per-draft-token acceptance probability of the synthetic ``eagle`` generator.
ACCEPT_P = 0.91

_HEADER_KEYS = {"format", "dp_size", "spec", "name", "description", "seed"}
_STEP_KEYS = {"step", "replicas"}
_REPLICA_KEYS = {"mode", "batch_size", "extend_tokens", "logprob_tokens", "can_run_graph", "accept"}
_SPEC_KEYS = ("num_steps", "topk", "num_draft_tokens")
_INT32_MAX = 2**31 - 1      # counts: the per-step record is int32
_INT64_MAX = 2**63 - 1      # step ids and seeds
_SHOW = 60                  # characters of a bad value quoted in a message


def schema():
    """The JSON Schema (draft 2020-12) of one trace line, as a dict (``trace.schema.json``).

    It states the per-line rules; :func:`load_trace` checks those and the rules that span lines
    or compare fields (docs/traces.md lists both, docs/decisions.md says why the loader does not
    use a schema library).
    """
    text = resources.files("dpgather.tools").joinpath("trace.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _show(value):
    """``repr(value)`` cut to a readable length (a message stays one short line)."""
    text = repr(value)
    return text if len(text) <= _SHOW else text[:_SHOW - 3] + "..."


def _decode(text, where):
    """One line's JSON value (:func:`dpgather.core.files.decode_json`: duplicate keys, NaN, long
    integer literals and deep nesting refused); every failure is an :class:`InputError` naming
    ``where``."""
    try:
        return decode_json(text)
    except JsonRefused as e:
        raise InputError(f"{where}: {e}") from None


@dataclass(frozen=True)
class ReplicaStep:
    """One replica's work in one step: a :class:`~dpgather.LocalBatch` plus the draft acceptance.

    ``accept`` (DRAFT_EXTEND only) holds, per request, how many of the ``S`` draft tokens the
    target accepted; the replica then has ``sum(accept_i + 1)`` real rows, fewer than the
    ``bs * (S + 1)`` it advertises. ``None`` means every draft token was accepted.
    """

    mode: ForwardMode
    batch_size: int = 0
    extend_tokens: int = 0
    logprob_tokens: int = None
    can_run_graph: bool = False
    accept: tuple = None

    def batch(self):
        """The :class:`~dpgather.LocalBatch` this replica passes to ``DpAttention.sync``."""
        return LocalBatch(self.mode, self.batch_size, self.extend_tokens, self.logprob_tokens,
                          self.can_run_graph)

    def counts(self, spec):
        """``(n, l, real)``: advertised tokens, logits rows, and the rows that really exist."""
        n, l = count_tokens(self.batch(), spec)
        real = n
        if self.mode == ForwardMode.DRAFT_EXTEND and self.accept is not None:
            real = sum(a + 1 for a in self.accept)
        return n, l, real

    def to_json(self):
        """The JSON object of this replica (defaults left out)."""
        out = {"mode": self.mode.name}
        if self.batch_size:
            out["batch_size"] = self.batch_size
        if self.extend_tokens:
            out["extend_tokens"] = self.extend_tokens
        if self.logprob_tokens is not None:
            out["logprob_tokens"] = self.logprob_tokens
        if self.can_run_graph:
            out["can_run_graph"] = True
        if self.accept is not None:
            out["accept"] = list(self.accept)
        return out


@dataclass
class Trace:
    """A replayable trace: ``steps[i][d]`` is replica ``d``'s :class:`ReplicaStep` at step ``i``.

    Attributes:
        dp_size: replicas per step (``D``).
        spec: the :class:`~dpgather.SpecConfig` of the speculative modes, or None.
        steps: list of tuples of ReplicaStep.
        step_ids: the ``step`` value of each step (file order).
        name: a label for reports (the file name or the generator's name).
    """

    dp_size: int
    spec: SpecConfig
    steps: list
    step_ids: list
    name: str = "trace"

    def __len__(self):
        return len(self.steps)

    def head(self, n):
        """The first ``n`` steps as a new trace (``n=None``: this trace)."""
        if n is None or n >= len(self.steps):
            return self
        return Trace(self.dp_size, self.spec, self.steps[:n], self.step_ids[:n], self.name)

    def mode_mix(self):
        """Replica-steps per forward mode, e.g. ``{"DECODE": 412, "IDLE": 31, ...}``."""
        mix = {}
        for step in self.steps:
            for r in step:
                mix[r.mode.name] = mix.get(r.mode.name, 0) + 1
        return {m.name: mix[m.name] for m in ForwardMode if m.name in mix}

    def header(self):
        out = {"format": FORMAT, "dp_size": self.dp_size, "name": self.name}
        if self.spec is not None:
            out["spec"] = {k: getattr(self.spec, k) for k in _SPEC_KEYS}
        return out


# -- loading ----------------------------------------------------------------------------------

def _int(value, what, where, minimum=0, maximum=_INT32_MAX):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: {what} must be an integer, got {_show(value)}")
    if value < minimum:
        raise InputError(f"{where}: {what} must be >= {minimum}, got {value}")
    if value > maximum:
        raise InputError(f"{where}: {what} must be <= {maximum}, got {value}")
    return value


def _parse_spec(obj, where):
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: 'spec' must be an object with keys {list(_SPEC_KEYS)}, got {_show(obj)}")
    extra = set(obj) - set(_SPEC_KEYS)
    missing = [k for k in _SPEC_KEYS if k not in obj]
    if extra or missing:
        raise InputError(f"{where}: 'spec' needs exactly the keys {list(_SPEC_KEYS)}"
                         + (f"; missing {missing}" if missing else "")
                         + (f"; unknown {_show(sorted(extra))}" if extra else ""))
    for k in _SPEC_KEYS:
        _int(obj[k], f"'spec.{k}'", where, 1)
    try:
        return SpecConfig(*(obj[k] for k in _SPEC_KEYS))
    except ConfigError as e:
        raise InputError(f"{where}: invalid 'spec': {e}") from None


def _parse_mode(value, where):
    # ASCII only: str.upper() also maps non-ASCII letters (dotless i) onto these names
    if isinstance(value, str) and value.isascii() and value.upper() in ForwardMode.__members__:
        return ForwardMode[value.upper()]
    raise InputError(f"{where}: 'mode' must be one of {[m.name for m in ForwardMode]} (any case), "
                     f"got {_show(value)}")


def _parse_replica(obj, spec, where):
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a replica must be a JSON object, got {_show(obj)}")
    extra = set(obj) - _REPLICA_KEYS
    if extra:
        raise InputError(f"{where}: unknown key(s) {_show(sorted(extra))}; a replica has {sorted(_REPLICA_KEYS)}")
    if "mode" not in obj:
        raise InputError(f"{where}: missing 'mode'")
    mode = _parse_mode(obj["mode"], where)
    bs = _int(obj.get("batch_size", 0), "'batch_size'", where)
    ext = _int(obj.get("extend_tokens", 0), "'extend_tokens'", where)
    lp = obj.get("logprob_tokens")
    if lp is not None:
        lp = _int(lp, "'logprob_tokens'", where)
    graph = obj.get("can_run_graph", False)
    if not isinstance(graph, bool):
        raise InputError(f"{where}: 'can_run_graph' must be true or false, got {_show(graph)}")
    accept = obj.get("accept")
    if accept is not None:
        if mode != ForwardMode.DRAFT_EXTEND:
            raise InputError(f"{where}: 'accept' is for DRAFT_EXTEND only, got it with {mode.name}")
        if not isinstance(accept, list) or len(accept) != bs:
            raise InputError(f"{where}: 'accept' must be a list of batch_size={bs} integers "
                             f"(accepted draft tokens per request), got {_show(accept)}")
        top = spec.num_steps if spec is not None else None
        for a in accept:
            _int(a, "every 'accept' entry", where)
            if top is not None and a > top:
                raise InputError(f"{where}: 'accept' entries must be in [0, num_steps={top}], got {a}")
        accept = tuple(accept)
    if mode.is_speculative and spec is None:
        raise InputError(f"{where}: {mode.name} needs the header's 'spec' (num_steps, topk, "
                         f"num_draft_tokens); add a header line {{\"format\": \"{FORMAT}\", ...}}")
    step = ReplicaStep(mode, bs, ext, lp, graph, accept)
    try:
        step.counts(spec)
    except DpGatherError as e:
        raise InputError(f"{where}: {e}") from None
    return step


def parse_trace(lines, source="<trace>"):
    """Parse and validate trace lines (strings); see :func:`load_trace`."""
    header = None
    spec = None
    dp_size = None
    steps, ids = [], []
    name = os.path.splitext(os.path.basename(source))[0] if source != "<trace>" else "trace"
    first = True
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        where = f"{source}:{lineno}"
        obj = _decode(text, where)
        if not isinstance(obj, dict):
            raise InputError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
        if first and "format" in obj:
            first = False
            if obj["format"] != FORMAT:
                raise InputError(f"{where}: unsupported format {_show(obj['format'])}; this dpgather reads {FORMAT!r}")
            extra = set(obj) - _HEADER_KEYS
            if extra:
                raise InputError(f"{where}: unknown header key(s) {_show(sorted(extra))}; the header has "
                                 f"{sorted(_HEADER_KEYS)}")
            header = obj
            if "dp_size" in obj:
                dp_size = _int(obj["dp_size"], "'dp_size'", where, 1)
            spec = _parse_spec(obj.get("spec"), where)
            for key in ("name", "description"):
                if key in obj and not isinstance(obj[key], str):
                    raise InputError(f"{where}: '{key}' must be a string, got {_show(obj[key])}")
            if "seed" in obj:
                _int(obj["seed"], "'seed'", where, 0, _INT64_MAX)
            name = obj.get("name", name)
            continue
        first = False
        if "format" in obj:
            raise InputError(f"{where}: a header line ('format') may only be the first line")
        extra = set(obj) - _STEP_KEYS
        if extra or "replicas" not in obj or "step" not in obj:
            raise InputError(f"{where}: a step line is {{\"step\": i, \"replicas\": [...]}}; got keys "
                             f"{_show(sorted(obj))}")
        sid = _int(obj["step"], "'step'", where, 0, _INT64_MAX)
        if ids and sid <= ids[-1]:
            raise InputError(f"{where}: 'step' must increase from line to line, got {sid} after {ids[-1]}")
        reps = obj["replicas"]
        if not isinstance(reps, list) or not reps:
            raise InputError(f"{where}: 'replicas' must be a non-empty list (one object per DP replica)")
        if dp_size is None:
            dp_size = len(reps)
        if len(reps) != dp_size:
            src = "the header's dp_size" if header and "dp_size" in header else "the first step"
            raise InputError(f"{where}: {len(reps)} replicas, but {src} has {dp_size}")
        steps.append(tuple(_parse_replica(r, spec, f"{where}: replica {d}") for d, r in enumerate(reps)))
        ids.append(sid)
    if not steps:
        raise InputError(f"{source}: the trace has no steps")
    return Trace(dp_size, spec, steps, ids, name)


def load_trace(path):
    """Read a JSON Lines trace file and validate every line.

    Returns:
        A :class:`Trace`.

    Raises:
        InputError: the file cannot be read, or a line is malformed; the message starts with
            ``FILE:LINE:`` and says what was expected.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read the trace file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    return parse_trace(lines, str(path))


def save_trace(trace, path):
    """Write ``trace`` as JSON Lines (a header line, then one line per step), atomically."""
    lines = [json.dumps(trace.header())]
    lines += [json.dumps({"step": sid, "replicas": [r.to_json() for r in step]})
              for sid, step in zip(trace.step_ids, trace.steps)]
    write_atomic(path, "\n".join(lines) + "\n")


# -- synthetic generators -----------------------------------------------------------------------

def accept_pmf(num_steps, p=ACCEPT_P):
    """P(accepted = k), k = 0..S: each draft token is accepted with probability ``p`` until the
    first rejection (a geometric law truncated at S)."""
    pmf = np.array([p ** k * (1 - p) for k in range(num_steps)] + [p ** num_steps])
    return pmf / pmf.sum()


def _walk(rng, bs, lo, hi, step=3):
    return int(np.clip(bs + rng.integers(-step, step + 1), lo, hi))


def _balanced_decode(rng, D, steps, spec):
    # Load ramps from ~28 to ~280 requests per replica halfway through: past the largest graph
    # bucket (256) the steps run eager, where the padding rule matters.
    share = rng.uniform(0.85, 1.15, size=D)
    out = []
    half = steps // 2
    for i in range(steps):
        share = np.clip(share + rng.uniform(-0.04, 0.04, size=D), 0.8, 1.2)
        ramp = min(1.0, max(0.0, (i - half + 1) / max(1, steps // 4)))
        target = 28 + (280 - 28) * ramp
        bs = np.maximum(1, np.round(target * share)).astype(int)
        out.append(tuple(ReplicaStep(ForwardMode.DECODE, int(b), can_run_graph=True) for b in bs))
    return out


def _prefill_burst(rng, D, steps, spec, chunk=512):
    bs = rng.integers(4, 33, size=D)
    out = []
    pending = 0          # prompt tokens left on the prefilling replica
    who = 0
    gap = 0              # pure-decode steps before the next burst
    for _ in range(steps):
        bs = np.array([_walk(rng, int(b), 1, 48) for b in bs])
        if pending == 0 and gap == 0:
            who = int(rng.integers(D))
            pending = int(rng.integers(1200, 4200))
            gap = int(rng.integers(1, 4))
        row = []
        for d in range(D):
            if d == who and pending > 0:
                tokens = min(chunk, pending)
                reqs = 1 if pending > chunk else int(rng.integers(1, 4))
                tokens = max(tokens, reqs)
                pending -= min(chunk, pending)
                lp = int(rng.integers(reqs, tokens + 1)) if rng.random() < 0.2 else None
                row.append(ReplicaStep(ForwardMode.EXTEND, reqs, tokens, lp))
            elif rng.random() < 0.05:
                row.append(ReplicaStep(ForwardMode.IDLE))
            else:
                row.append(ReplicaStep(ForwardMode.DECODE, int(bs[d]), can_run_graph=True))
        if pending == 0 and not any(r.mode == ForwardMode.EXTEND for r in row):
            gap = max(gap - 1, 0)
        out.append(tuple(row))
    return out


def _eagle(rng, D, steps, spec):
    S = spec.num_steps
    pmf = accept_pmf(S)
    bs = rng.integers(2, 33, size=D)
    idle = np.zeros(D, dtype=bool)
    out = []
    while len(out) < steps:
        bs = np.array([_walk(rng, int(b), 1, 36, step=4) for b in bs])
        if D > 1:  # a replica goes idle with p=0.12 per cycle and comes back with p=0.5
            flip = rng.random(D) < np.where(idle, 0.5, 0.12)
            idle = idle ^ flip
        if idle.all():
            idle[int(rng.integers(D))] = False
        big = int(rng.integers(D)) if rng.random() < 0.15 else -1
        cur = [int(rng.integers(70, 97)) if d == big else int(bs[d]) for d in range(D)]
        accept = [tuple(int(a) for a in rng.choice(S + 1, size=b, p=pmf)) for b in cur]
        cycle = [ForwardMode.DRAFT_DECODE] * S + [ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_EXTEND]
        for mode in cycle:
            row = []
            for d in range(D):
                if idle[d]:
                    row.append(ReplicaStep(ForwardMode.IDLE))
                else:
                    acc = accept[d] if mode == ForwardMode.DRAFT_EXTEND else None
                    row.append(ReplicaStep(mode, cur[d], can_run_graph=True, accept=acc))
            out.append(tuple(row))
    return out[:steps]


def _idle(rng, D, steps, spec):
    return [tuple(ReplicaStep(ForwardMode.IDLE) for _ in range(D)) for _ in range(steps)]


_LENGTHS = {"balanced-decode": 40, "prefill-burst": 60, "eagle": 100}
_GEN = {"balanced-decode": _balanced_decode, "prefill-burst": _prefill_burst, "eagle": _eagle}
_MIXED = (("idle", 1), ("balanced-decode", 40), ("prefill-burst", 60), ("eagle", 100), ("idle", 1))

#: Names accepted by :func:`synthetic`, with their default lengths in steps.
GENERATORS = {"mixed": sum(n for _, n in _MIXED), **_LENGTHS}


def synthetic(name="mixed", dp_size=4, seed=0, steps=None, spec=None):
    """A reproducible synthetic trace.

    Args:
        name: one of :data:`GENERATORS` (``mixed``, ``eagle``, ``prefill-burst``,
            ``balanced-decode``).
        dp_size: replicas per step.
        seed: the same seed gives the same trace.
        steps: length (default: the generator's default; ``mixed`` scales its parts).
        spec: SpecConfig of the EAGLE steps (default :data:`DEFAULT_SPEC`).

    Raises:
        InputError: unknown name, non-positive ``steps`` / ``dp_size``, or a negative ``seed``.
    """
    if name not in GENERATORS:
        raise InputError(f"unknown synthetic trace {name!r}; choose one of {sorted(GENERATORS)}")
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise InputError(f"dp_size must be a positive int, got {dp_size!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be a positive int, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative int (numpy's SeedSequence takes no negative "
                         f"entropy), got {seed!r}")
    spec = spec or DEFAULT_SPEC
    total = GENERATORS[name] if steps is None else steps
    # A seed sequence keyed by generator name: each part of "mixed" equals the stand-alone trace.
    key = [int(seed)] + [ord(c) for c in name]
    if name == "mixed":
        parts = []
        scale = total / GENERATORS["mixed"]
        for part, n in _MIXED:
            k = max(1, round(n * scale)) if part != "idle" else 1
            gen = _GEN.get(part, _idle)
            parts.extend(gen(np.random.default_rng([int(seed)] + [ord(c) for c in part]), dp_size, k, spec))
        out = parts[:total] if len(parts) > total else parts
    else:
        out = _GEN[name](np.random.default_rng(key), dp_size, total, spec)
    return Trace(dp_size, spec, list(out), list(range(len(out))), name)
