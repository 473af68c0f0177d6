"""The alpha-beta cost model the ``"auto"`` policy uses to pick a padding mode each step.

Each collective ``c`` over ``P`` ranks moving a buffer of ``B`` bytes (the full gathered size)
is predicted to take::

    t_c(P, B) = alpha_c(P) + B * f_c(P) / (beta_c * 1e3)          [microseconds]
    alpha_c(P) = a0_c + a1_c * (P - 1)
    f_c(P) = (P - 1) / P          (all-gather, reduce-scatter, gatherv, reduce-scatterv)
    f_c(P) = 2 * (P - 1) / P      (all-reduce)
    t_c(1, B) = 0

``beta_c`` is the bus bandwidth in GB/s (nccl-tests' busbw). For the v-collectives (grouped
broadcasts / reduces) ``alpha`` grows with the number of *non-empty* slots, because empty roots
are skipped by every rank. The planner prices the v-collectives over the whole group and the P2P
transport per rank instead, from what each rank receives and sends ("link time"), with measured
one-way and two-way time curves per collective where :attr:`CostModel.curves` has them. The formulas of each mode's predicted gather + combine time are in
``docs/cost-model.md``; the defaults below are fitted to a 4x H100 probe
(NCCL 2.28; the figures are in BENCHMARKS.md) and checked against a 4x H200 pattern probe.
``dg.calibrate()`` measures the constants on the current machine and writes a JSON file that
:meth:`CostModel.load` reads.
"""

import math
import numbers
import os
import re

from .errors import ConfigError
from .files import JsonRefused, decode_json, write_json_atomic


def _finite(name, value, kind=float):
    """``kind(value)`` for a finite number, else ConfigError naming ``name``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return kind(v)

__all__ = ["CostModel", "COLLECTIVES", "CURVED", "CURVE_POINTS", "cache_dir", "cache_path", "check_schema"]

#: Collectives with their own (a0, a1, beta) triple.
COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "gatherv", "reduce_scatterv", "p2p", "push")
#: Collectives whose bandwidth term is priced per rank from what it receives and sends, and may
#: carry measured link-time curves (docs/cost-model.md, "Link time").
CURVED = ("gatherv", "reduce_scatterv", "p2p", "push")
#: Most points of one curve.
CURVE_POINTS = 16

_DEFAULTS = {
    # (a0 us, a1 us per extra rank, beta GB/s busbw); fitted on 4x H100, see docs/cost-model.md.
    "all_gather": (12.0, 4.0, 300.0),
    "reduce_scatter": (10.2, 3.4, 295.0),
    "all_reduce": (12.3, 4.1, 335.0),
    # v-collectives: priced per rank from what it receives and passes on (docs/cost-model.md,
    # "Link time"); refitted with that formula to the 4x H200 pattern probe
    "gatherv": (28.0, 3.0, 330.0),
    "reduce_scatterv": (28.0, 3.0, 330.0),
    # the P2P transport's pull collective (docs/p2p.md): latency per collective (pack, barrier,
    # pull in one kernel), per extra peer, and the pull bandwidth over NVLink; the minimax fit on
    # 2x H200 of 22 layouts (balanced, one-sided, uneven; 1..8192 rows per rank): within 20 %,
    # one-sided layouts over-predicted (a calibration's curves separate the two, docs/cost-model.md)
    "p2p": (8.5, 0.47, 440.0),
    # the P2P transport's push collective (docs/push.md): one one-way NVLink trip, no barrier, no
    # pack; beta counts line bytes (each 16-byte line carries 8 data bytes). Defaults until
    # calibrated, from the anchors of docs/cost-model.md ("Push"): a launch (0.70 us) plus half
    # the pull's measured flag round trip (3.68 us) plus the local write-out; per extra peer the
    # NCCL LL figures' growth; the SM-store link ceiling measured on 2x H200 (353-357 GB/s)
    "push": (3.0, 0.3, 350.0),
}


_KEYS = ("row_bytes", "copy_GBps", "mlp_row_us", "mode_us", *COLLECTIVES, "curves", "meta")


def _shown(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(name, value, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}, got {_shown(value)}")


def _numbers(name, value, n):
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ConfigError(f"{name} must be a list of {n} numbers, got {_shown(value)}")
    for v in value:
        _number(name, v)


def check_schema(data):
    """Raise :class:`ConfigError` unless ``data`` has the form of :meth:`CostModel.to_dict` (types
    only; the constructor checks the ranges): a dict whose keys are among ``row_bytes`` (an
    integer), ``copy_GBps`` and ``mlp_row_us`` (numbers), ``mode_us`` (3 numbers), one per
    :data:`COLLECTIVES` (3 numbers: ``a0_us, a1_us, beta_GBps``), ``curves`` (``{collective:
    {"one"|"both": [[x, us], ...]}}``) and ``meta`` (an object). Booleans are not numbers."""
    if not isinstance(data, dict):
        kind = {list: "an array", tuple: "an array", str: "a string", bool: "a boolean",
                type(None): "null"}.get(type(data), "a number" if isinstance(data, numbers.Real) else
                                        type(data).__name__)
        raise ConfigError(f"a cost model is a JSON object of its constants, got {kind}: {_shown(data)}")
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        raise ConfigError(f"unknown key(s) {_shown(unknown)}; a cost model has {list(_KEYS)}")
    for name, value in data.items():
        if name == "row_bytes":
            _number(name, value, integer=True)
        elif name in ("copy_GBps", "mlp_row_us"):
            _number(name, value)
        elif name in ("mode_us", *COLLECTIVES):
            _numbers(name, value, 3)
        elif name == "meta" and not isinstance(value, dict):
            raise ConfigError(f"meta must be an object, got {_shown(value)}")
        elif name == "curves" and value is not None:
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(f"curves must be {{collective: {{'one'|'both': [[x, us], ...]}}}}, got "
                                  f"{_shown(value)}")
            for c, sides in value.items():
                for w, pts in sides.items():
                    if not isinstance(pts, (list, tuple)):
                        raise ConfigError(f"curves[{c!r}][{w!r}] must be [[x_bytes, us], ...], got {_shown(pts)}")
                    for pt in pts:
                        _numbers(f"curves[{c!r}][{w!r}] point", pt, 2)


class CostModel:
    """Constants of the alpha-beta model (see the module docstring).

    Args:
        row_bytes: bytes of one gathered row, ``hidden_size * itemsize`` (default: DeepSeek-V3,
            7168 x bfloat16 = 14336).
        copy_GBps: device copy bandwidth (bytes written per microsecond x 1e-3), used for the
            SUM_LEN memset of the gathered buffer.
        mlp_row_us: optional cost of one padding row in the MLP/MoE (0 by default: padding rows
            are masked out of routing).
        mode_us: ``(MAX_LEN, SUM_LEN, VARLEN)`` fixed microseconds of dpgather's own kernels
            (pack, unpack, zero fill) per gather + combine over NCCL, added to each mode's
            prediction when T > 1; ``(0, 0, 0)`` by default (the default constants were fitted to
            eagerly timed collectives, whose launch cost covers it); ``dpgather calibrate``
            measures it beside its graph-timed collectives.
        curves: measured link times of the :data:`CURVED` collectives, ``{name: {"one": [[x,
            us], ...], "both": [[x, us], ...]}}``: ``x`` bytes per direction (increasing, > 0),
            ``us`` the time to move them (excluding the latency ``a0 + a1*(k-1)``), ``"one"``
            with traffic in one direction of the rank's link, ``"both"`` with ``x`` each way at
            once; at most :data:`CURVE_POINTS` points each. Between points the time is linear
            in ``x``; below the first and past the last it scales with ``x`` at that point's
            bandwidth. Without a curve the time is ``x / beta`` (docs/cost-model.md, "Link
            time"). ``dpgather calibrate`` measures them.
        **collectives: ``name=(a0_us, a1_us, beta_GBps)`` overrides for any of
            :data:`COLLECTIVES`.
    """

    __slots__ = ("row_bytes", "copy_GBps", "mlp_row_us", "mode_us", "params", "curves")

    def __init__(self, row_bytes=14336, copy_GBps=2900.0, mlp_row_us=0.0, mode_us=(0.0, 0.0, 0.0),
                 curves=None, **collectives):
        self.row_bytes = _finite("row_bytes", row_bytes, int)
        self.copy_GBps = _finite("copy_GBps", copy_GBps)
        self.mlp_row_us = _finite("mlp_row_us", mlp_row_us)
        if self.row_bytes <= 0:
            raise ConfigError(f"row_bytes must be > 0, got {row_bytes}")
        if self.copy_GBps <= 0:
            raise ConfigError(f"copy_GBps must be > 0, got {copy_GBps}")
        if self.mlp_row_us < 0:
            raise ConfigError(f"mlp_row_us must be >= 0, got {mlp_row_us}")
        try:
            modes = tuple(mode_us)
        except TypeError:
            raise ConfigError(f"mode_us must be (max_len_us, sum_len_us, varlen_us), got {mode_us!r}") from None
        if len(modes) != 3:
            raise ConfigError(f"mode_us must be (max_len_us, sum_len_us, varlen_us), got {mode_us!r}")
        self.mode_us = tuple(_finite("mode_us", v) for v in modes)
        if min(self.mode_us) < 0:
            raise ConfigError(f"mode_us must be >= 0, got {mode_us!r}")
        params = dict(_DEFAULTS)
        for name, value in collectives.items():
            if name not in _DEFAULTS:
                raise ConfigError(f"unknown collective {name!r} in CostModel; expected one of {COLLECTIVES}")
            try:
                a0, a1, beta = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be (a0_us, a1_us, beta_GBps), got {value!r}") from None
            if not all(math.isfinite(v) for v in (a0, a1, beta)):
                raise ConfigError(f"{name} must be finite numbers (a0_us, a1_us, beta_GBps), got {value!r}")
            if a0 < 0 or a1 < 0 or beta <= 0:
                raise ConfigError(f"{name} needs a0 >= 0, a1 >= 0, beta > 0, got {value!r}")
            params[name] = (a0, a1, beta)
        self.params = params
        self.curves = _check_curves(curves)

    def with_row_bytes(self, row_bytes):
        """A copy of this model for rows of ``row_bytes`` bytes."""
        return CostModel(row_bytes, self.copy_GBps, self.mlp_row_us, self.mode_us, self.curves, **self.params)

    def time_us(self, collective, group_size, nbytes, active=None):
        """The alpha-beta time of one collective (microseconds) with the same traffic on every rank;
        ``active`` = non-empty roots (v only). The planner prices the :data:`CURVED` collectives
        per rank instead (link time, with :attr:`curves`), which this does not."""
        if group_size <= 1:
            return 0.0
        a0, a1, beta = self.params[collective]
        ranks = group_size if active is None else max(int(active), 1)
        factor = 2.0 if collective == "all_reduce" else 1.0
        return a0 + a1 * (ranks - 1) + nbytes * factor * (group_size - 1) / group_size / (beta * 1e3)

    def curve(self, collective, which):
        """The ``[(x bytes, us), ...]`` points of one curve (``which``: ``"one"`` or ``"both"``);
        empty when the collective has none."""
        return list(self.curves.get(collective, {}).get(which, ()))

    def to_dict(self):
        out = {
            "row_bytes": self.row_bytes,
            "copy_GBps": self.copy_GBps,
            "mlp_row_us": self.mlp_row_us,
            "mode_us": list(self.mode_us),
            **{k: list(v) for k, v in self.params.items()},
        }
        if self.curves:
            out["curves"] = {c: {w: [list(p) for p in pts] for w, pts in v.items()}
                             for c, v in self.curves.items()}
        return out

    @classmethod
    def from_dict(cls, data):
        """The model of ``data``, a dict of :meth:`to_dict`'s form (plus an optional ``meta``
        object, ignored). Exactly that schema (:func:`check_schema`): a missing key keeps its
        default; anything else -- an unknown key, a value of another type (``1.5`` or ``"16"``
        for ``row_bytes``, a string or boolean constant) -- raises :class:`ConfigError`."""
        check_schema(data)
        data = dict(data)
        base = {k: data.pop(k) for k in ("row_bytes", "copy_GBps", "mlp_row_us", "mode_us", "curves")
                if k in data}
        data.pop("meta", None)
        return cls(**base, **data)

    def save(self, path, meta=None):
        """Write the constants as JSON (``meta``: free-form provenance, e.g. card and date),
        atomically (:func:`dpgather.core.files.write_atomic`: a failed write leaves the previous
        file whole)."""
        write_json_atomic(path, {**self.to_dict(), **({"meta": meta} if meta else {})}, indent=2)

    @classmethod
    def load(cls, path):
        """Read constants written by :meth:`save` or ``dpgather calibrate``.

        The file must be JSON (read strictly: :func:`dpgather.core.files.decode_json` refuses
        duplicate keys, ``NaN``, integer literals past 20 digits, deep nesting) holding exactly
        :meth:`from_dict`'s schema. Anything else raises :class:`ConfigError` naming the file and
        what is wrong; nothing else escapes.
        """
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read cost model from {str(path)!r}: {e}") from None
        try:
            return cls.from_dict(decode_json(text))
        except (JsonRefused, ConfigError) as e:
            raise ConfigError(f"cannot read cost model from {str(path)!r}: {e}") from None

    def __eq__(self, other):
        return isinstance(other, CostModel) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"CostModel({self.to_dict()})"


def _check_curves(curves):
    """``curves`` validated and frozen: ``{name: {"one"|"both": ((x, us), ...)}}`` with only
    non-empty curves kept (ConfigError naming the bad entry otherwise)."""
    if curves is None:
        return {}
    if not isinstance(curves, dict):
        raise ConfigError(f"curves must be a dict {{collective: {{'one'|'both': [[x, us], ...]}}}}, got {curves!r}")
    out = {}
    for name, sides in curves.items():
        if name not in CURVED:
            raise ConfigError(f"curves: unknown collective {name!r}; curves exist for {CURVED}")
        if not isinstance(sides, dict) or not set(sides) <= {"one", "both"}:
            raise ConfigError(f"curves[{name!r}] must be a dict with keys 'one' and/or 'both', got {sides!r}")
        kept = {}
        for which, pts in sides.items():
            try:
                pts = [(float(x), float(t)) for x, t in pts]
            except (TypeError, ValueError):
                raise ConfigError(f"curves[{name!r}][{which!r}] must be [[x_bytes, us], ...], got {pts!r}") from None
            if len(pts) > CURVE_POINTS:
                raise ConfigError(f"curves[{name!r}][{which!r}]: at most {CURVE_POINTS} points, got {len(pts)}")
            for i, (x, t) in enumerate(pts):
                if not (math.isfinite(x) and math.isfinite(t)) or x <= 0 or t <= 0 or (i and x <= pts[i - 1][0]):
                    raise ConfigError(f"curves[{name!r}][{which!r}]: points need increasing x > 0 and us > 0, "
                                      f"got {pts!r}")
            if pts:
                kept[which] = tuple(pts)
        if kept:
            out[name] = kept
    return out


def cache_dir():
    """Where calibrated cost models are cached: ``$DPGATHER_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dpgather``, else ``~/.cache/dpgather``."""
    explicit = os.environ.get("DPGATHER_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dpgather")


def cache_path(card, ranks, nccl_version):
    """The cache file of one machine shape: GPU model, ranks (one GPU each) and NCCL version,
    e.g. ``cost-nvidia-h200-2gpu-nccl22809.json`` under :func:`cache_dir`. ``dpgather
    calibrate`` writes it; ``DpAttention(cost=None)`` reads it (rank 0's copy, sent to every
    rank). The constants are per byte, so one file serves every row width."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(card).lower()).strip("-") or "gpu"
    return os.path.join(cache_dir(), f"cost-{slug}-{int(ranks)}gpu-nccl{nccl_version}.json")
