"""The replay's report: summaries, the policy table, ``report.json`` and the plots.

Sizes are per rank (the gathered buffer is replicated on every rank) and count the hidden-state
gather plus the logits gather:

- **ours**: ``plan.gathered_rows + plan.logits_rows`` rows of the policy's plan (in a graph step
  the static bucket-sized buffer the graph replays on, which allocates nothing per step).
- **SGLang before #8277**: a zeroed ``sum(n)`` buffer every forward, graph or not, plus logits
  rows sized by the token counts (the speculative modes counted ``n`` logits rows, also in
  DRAFT_EXTEND).
- **SGLang after #8277/#8278**: the ``"sglang"`` policy's plan: counts aligned to ``attn_tp``,
  MAX_LEN ``M*D`` or SUM_LEN ``sum(n)`` by the #8278 rule, graph buckets from ``max(n)``, and
  ``sum(l)`` logits rows with ``l = bs`` in DRAFT_EXTEND.

"wire/rank" estimates the bytes each rank receives with ring collectives (factor
``f = (T-1)/T``): all-gather, reduce-scatter and their v-variants ``f*B``, all-reduce ``2f*B``;
a MAX_LEN or VARLEN step moves ``2fB`` (gather + combine), a SUM_LEN step ``4fB``.

Rank 0 alone calls this module. :func:`write_report` writes ``report.json`` and the plots
atomically (:func:`dpgather.core.files.write_atomic`: a temporary file in the same folder, then a
rename), so a reader -- ``dpgather run``, a CI job -- never sees a truncated report, even when
the disk fills up.
"""

import os
import tempfile

import numpy as np

import dpgather
from dpgather.core import ConfigError
from dpgather.core.files import write_atomic, write_json_atomic

from ._common import PIP, missing

__all__ = [
    "REPORT_FORMAT", "make_out_dir", "write_report", "print_report",
    "summary", "mode_mix", "text_table", "fmt_bytes", "fmt_rows", "plots",
]

#: The value of report.json's ``format`` key.
REPORT_FORMAT = "dpgather-report/1"
_DSV3_ROW = 7168 * 2   # DeepSeek-V3 hidden row in bf16, for the scale-up line


def make_out_dir(path):
    """Create the folder ``path`` (and its parents) now, before any work, and make sure a file can
    be created in it; raise :class:`dpgather.ConfigError` naming ``--out``, the path and why not.

    An existing *file* of that name, a path under a file, a name too long, a parent where nothing
    can be created (whatever ``access()`` says) would otherwise only fail once the whole replay
    ran. The folder stays (empty until the report is written).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {path}: a file of that name exists; --out names a folder "
                          "(for report.json and the plots)")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # an anonymous file: nothing is left behind
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot create the folder or a file in it "
                          f"({e.strerror or e})") from None


def fmt_bytes(b):
    """``1536`` -> ``"1.5 KiB"``."""
    for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{int(b)} B"


def fmt_rows(r):
    """A row count for a table cell: ``12345`` -> ``"12.3k"``."""
    if r >= 1e6:
        return f"{r / 1e6:.2f}M"
    if r >= 1e4:
        return f"{r / 1e3:.1f}k"
    return f"{int(round(r))}"


def summary(sizes, row_bytes, times=None, forward=None):
    """Peak/mean bytes, rows moved, padding and wire bytes over the forward steps.

    ``sizes``: one sizing dict per step (``rows``, ``logits_rows``, ``dyn_rows``, ``padding``,
    ``wire_rows``, ``graph``); ``times``: seconds per step (max over ranks) or None;
    ``forward``: per step, whether any replica ran a forward (skip steps are left out).
    """
    fwd = [s for s, f in zip(sizes, forward) if f]
    tot = [s["dyn_rows"] * row_bytes for s in fwd]
    out = {
        "forward_steps": len(fwd),
        "rows_moved": int(sum(s["rows"] + s["logits_rows"] for s in fwd)),
        "hidden_rows": int(sum(s["rows"] for s in fwd)),
        "logits_rows": int(sum(s["logits_rows"] for s in fwd)),
        "padding_rows": int(sum(s["padding"] for s in fwd)),
        "wire_bytes_per_rank": float(sum(s["wire_rows"] for s in fwd) * row_bytes),
        "peak_bytes": int(max(tot, default=0)),
        "mean_bytes": float(np.mean(tot)) if tot else 0.0,
        "graph_steps": int(sum(1 for s in fwd if s["graph"])),
    }
    if times is not None:
        ft = times[np.asarray(forward, dtype=bool)] if len(times) else times
        out["time_us_mean"] = float(ft.mean() * 1e6) if ft.size else 0.0
        out["time_us_p50"] = float(np.percentile(ft, 50) * 1e6) if ft.size else 0.0
        out["time_us_p99"] = float(np.percentile(ft, 99) * 1e6) if ft.size else 0.0
    return out


def text_table(rows, header, left=(0,)):
    """A fixed-width text table; columns in ``left`` are left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


#: Line styles of the plots' series, one per series, so that identical curves stay visible (a
#: dashed line over a solid one, markers at different steps) and each is named by its style too.
_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 2)), "P"),
           ((0, (8, 2)), "X"))


def _styled(ax, kind, x, y, i, n, **kw):
    """Series ``i`` of ``n`` on ``ax`` with its own line style and markers (staggered, so markers
    of overlapping series fall on different steps)."""
    ls, marker = _STYLES[i % len(_STYLES)]
    every = max(n, len(x) // 12)  # at least one step per series: no two series mark the same step
    offset = (i * every // max(1, n)) % every
    draw = ax.step if kind == "step" else ax.plot
    extra = {"where": "post"} if kind == "step" else {}
    return draw(x, y, linestyle=ls, marker=marker, markersize=4, markevery=(offset, every), **extra, **kw)


def _legend_outside(ax):
    """The legend to the right of the axes, never over the data."""
    return ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                     frameon=False)


def figures(trace, results, prepared, row_bytes, title):
    """The replay's figures ``{"memory.png": fig, "rows.png": fig, "time.png": fig}`` (matplotlib,
    Agg backend); :func:`plots` saves them. Every series has its own line style and marker, and
    every legend sits outside its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    x = np.arange(len(prepared))
    kib = row_bytes / 1024.0
    before = np.array([s.before["dyn_rows"] * kib for s in prepared])
    after = np.array([s.after["dyn_rows"] * kib for s in prepared])
    fig, ax = plt.subplots(figsize=(12, 4.5))
    pols = [p_ for p_ in results if p_ != "_ref"]
    graph = [s["graph"] for s in results[pols[0]]["sizes"]]
    for i, g in enumerate(graph):
        if g:
            ax.axvspan(i, i + 1, color="0.92", lw=0, label="graph replay" if i == graph.index(True) else None)
    main = "auto" if "auto" in pols else pols[0]
    series = [("SGLang before #8277", before, dict(color="tab:red", lw=1.4)),
              ("SGLang after #8277/#8278", after, dict(color="tab:orange", lw=1.4))]
    others = iter(["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    for pol in pols:
        ours = np.array([s["dyn_rows"] * kib for s in results[pol]["sizes"]])
        style = dict(color="tab:blue", lw=1.8) if pol == main else dict(color=next(others, "tab:gray"), lw=1.1)
        series.append((f"dpgather ({pol})", ours, style))
    for i, (label, y, style) in enumerate(series):
        _styled(ax, "step", x, y, i, len(series), label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("dynamic gathered buffers per rank [KiB]\n(hidden + logits)")
    ax.set_title(f"Gathered memory over the trace: {title}")
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    figs["memory.png"] = fig

    names = pols + ["SGLang <#8277", "SGLang #8277+"]
    sums = [results[p_]["summary"] for p_ in pols]
    sums += [results["_ref"]["before"], results["_ref"]["after"]]
    real = np.array([s["rows_moved"] - s["padding_rows"] for s in sums])
    pad = np.array([s["padding_rows"] for s in sums])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(names, real, color="tab:blue", label="real rows")
    ax.bar(names, pad, bottom=real, color="tab:gray", hatch="//", edgecolor="white", label="padding rows")
    for i, (r, q) in enumerate(zip(real, pad)):
        ax.text(i, r + q, fmt_rows(r + q), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("rows moved over the trace\n(hidden + logits gathers)")
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_title(f"Rows moved per policy: {title}")
    ax.margins(y=0.12)  # room for the value labels above the bars
    _legend_outside(ax)
    ax.grid(axis="y", alpha=0.3)
    figs["rows.png"] = fig

    fig, ax = plt.subplots(figsize=(12, 4.5))
    for i, pol in enumerate(pols):
        _styled(ax, "line", x, results[pol]["times"] * 1e3, i, len(pols), lw=0.9, label=pol)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("data-plane time per step [ms]\n(max over ranks)")
    ax.set_title(f"Time per step: {title}")
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    figs["time.png"] = fig
    return figs


def plots(outdir, trace, results, prepared, row_bytes, title):
    """memory.png, rows.png and time.png in ``outdir`` (see docs/traces.md); returns their paths."""
    import matplotlib.pyplot as plt

    files = []
    for name, fig in figures(trace, results, prepared, row_bytes, title).items():
        p = os.path.join(outdir, name)
        # the figure grows to hold the outside legend
        write_atomic(p, lambda f, fig=fig: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"),
                     binary=True)
        plt.close(fig)
        files.append(p)
    return files


def mode_mix(plans):
    """Forward steps per layout: ``{"skip", "graph", "MAX_LEN", "SUM_LEN", "VARLEN"}``."""
    mix = {"skip": 0, "graph": 0, "MAX_LEN": 0, "SUM_LEN": 0, "VARLEN": 0}
    for p in plans:
        if p.skip:
            mix["skip"] += 1
        elif p.graph:
            mix["graph"] += 1
        else:
            mix[p.mode.name] += 1
    return mix


def print_report(cfg, results, row_bytes, T, title, backend="host"):
    """Print the policy table, the comparison with SGLang and the DeepSeek-V3 scale-up line."""
    head = ["policy", "graph", "MAX", "SUM", "VAR", "rows moved", "padding", "wire/rank",
            "peak/rank", "mean/rank", "ms/step", "allocs", "verify"]
    rows = []
    for pol, res in results.items():
        if pol == "_ref":
            continue
        s, m = res["summary"], res["summary"]["modes"]
        ver = "-" if not cfg.verify else ("ok" if not s["bad_rows"] else f"FAIL {s['bad_rows']}")
        rows.append([pol, m["graph"], m["MAX_LEN"], m["SUM_LEN"], m["VARLEN"], fmt_rows(s["rows_moved"]),
                     fmt_rows(s["padding_rows"]), fmt_bytes(s["wire_bytes_per_rank"]),
                     fmt_bytes(s["peak_bytes"]), fmt_bytes(s["mean_bytes"]),
                     f"{s['time_us_mean'] / 1e3:.2f}", s["arena_allocations"], ver])
    for label, key in (("SGLang <#8277", "before"), ("SGLang #8277+", "after")):
        s = results["_ref"][key]
        rows.append([label, s["graph_steps"] if key == "after" else "-", "", "", "",
                     fmt_rows(s["rows_moved"]), fmt_rows(s["padding_rows"]),
                     fmt_bytes(s["wire_bytes_per_rank"]), fmt_bytes(s["peak_bytes"]),
                     fmt_bytes(s["mean_bytes"]), "-", "-", "-"])
    print(f"\n== {title} ==")
    print("graph/MAX/SUM/VAR: forward steps per layout; rows moved and padding: hidden + logits gathers "
          "over the trace;\nwire/rank: estimated bytes received per rank; peak/mean: gathered buffers "
          "per rank; ms/step: data plane\n(sync + gather + scatter + logits), max over ranks; allocs: "
          "arena allocations over the whole replay.\n")
    print(text_table(rows, head))
    pols = [p for p in results if p != "_ref"]
    main = "auto" if "auto" in pols else pols[0]
    s = results[main]["summary"]
    b, a = results["_ref"]["before"], results["_ref"]["after"]
    keys = (("rows moved", "rows_moved"), ("padding rows", "padding_rows"),
            ("wire bytes", "wire_bytes_per_rank"), ("peak memory", "peak_bytes"),
            ("mean memory", "mean_bytes"))
    print(f"\n{main} vs SGLang #8277+: " + ", ".join(f"{k} {_pct(s[f], a[f])}" for k, f in keys))
    print(f"{main} vs SGLang <#8277: " + ", ".join(f"{k} {_pct(s[f], b[f])}" for k, f in keys))
    scale = _DSV3_ROW / row_bytes
    print(f"At DeepSeek-V3 width (H=7168 bf16) the peak / mean gathered memory per rank and layer "
          f"would be {fmt_bytes(s['peak_bytes'] * scale)} / {fmt_bytes(s['mean_bytes'] * scale)} "
          f"({main}), {fmt_bytes(a['peak_bytes'] * scale)} / {fmt_bytes(a['mean_bytes'] * scale)} "
          f"(SGLang #8277+), {fmt_bytes(b['peak_bytes'] * scale)} / {fmt_bytes(b['mean_bytes'] * scale)} "
          f"(SGLang <#8277).")
    print("Memory counts the buffers allocated per step: graph steps replay on static buffers "
          "(D x largest bucket, the same for all) and\n"
          "allocate none, except SGLang <#8277 which "
          "zeroed a sum(n) buffer every step. "
          + ("Time is host MPI time, not GPU time." if backend == "host" else
             "Times synchronize the device after each call; a CUDA graph step's time includes its MLP."))


def _pct(ours, ref):
    if not ref:
        return "n/a" if ours else "same"
    r = ours / ref - 1
    if abs(r) < 0.005:
        return "same"
    return f"{r:+.0%}"


def write_report(cfg, results, trace, prepared, topo, dtype, backend, H, buckets, row_bytes, spec,
                 title, forward):
    """Write ``cfg.out/report.json`` (atomically) and the plots; returns the report's path.

    ``results`` maps each policy to its plans, times, bad-row counts, sizes and summary, plus
    ``"_ref"`` with the two SGLang reference summaries (what :func:`dpgather.tools.replay.replay`
    gathered on rank 0). Without matplotlib the plots are skipped with a one-line note.

    Raises:
        OSError: the folder, the report or a plot cannot be written.
    """
    out = cfg.out
    os.makedirs(out, exist_ok=True)  # made before the replay (make_out_dir); here if removed since
    report = {
        "format": REPORT_FORMAT,
        "version": dpgather.__version__,
        "config": {
            "trace": cfg.trace, "synthetic": None if cfg.trace else cfg.synthetic,
            "steps": len(trace), "seed": cfg.seed, "hidden": H, "dtype": dtype, "row_bytes": row_bytes,
            "world_size": topo.world_size, "attn_tp": topo.attn_tp_size, "dp_size": topo.dp_size,
            "backend": backend, "policies": [p for p in results if p != "_ref"],
            "graph_buckets": list(buckets), "verify": bool(cfg.verify), "timeout_s": cfg.timeout,
            "mlp_row_us": cfg.mlp_row_us,
            "spec": None if spec is None else {"num_steps": spec.num_steps, "topk": spec.topk,
                                               "num_draft_tokens": spec.num_draft_tokens},
        },
        "trace": {"name": trace.name, "steps": len(trace), "dp_size": trace.dp_size,
                  "mode_mix": trace.mode_mix()},
        "reference": {"sglang_before_8277": results["_ref"]["before"],
                      "sglang_after_8277": results["_ref"]["after"]},
        "policies": {},
    }
    ok = True
    for pol, res in results.items():
        if pol == "_ref":
            continue
        steps = []
        for i, (sid, st, plan) in enumerate(zip(trace.step_ids, prepared, res["plans"])):
            ours = res["sizes"][i]
            nbad = [int(v) for v in res["bad"][i]]
            steps.append({
                "step": sid, "modes": st.modes, "forward": bool(forward[i]),
                "real_rows": list(map(int, st.real)), "plan": plan.as_dict(),
                "rows_moved": {"ours": ours["rows"] + ours["logits_rows"],
                               "sglang_before": st.before["rows"] + st.before["logits_rows"],
                               "sglang_after": st.after["rows"] + st.after["logits_rows"]},
                "gathered_bytes": {"ours": ours["dyn_rows"] * row_bytes,
                                   "sglang_before": st.before["dyn_rows"] * row_bytes,
                                   "sglang_after": st.after["dyn_rows"] * row_bytes},
                "padding_rows": ours["padding"],
                "time_us": float(res["times"][i] * 1e6),
                "verify": None if not cfg.verify else {
                    "ok": not any(nbad),
                    "bad_rows": dict(zip(("gathered", "output", "logits_gathered", "logits_output", "plan"), nbad)),
                },
            })
        ok = ok and not res["summary"]["bad_rows"]
        report["policies"][pol] = {"summary": res["summary"], "memory_stats": res["memory_stats"],
                                   "steps": steps}
    report["verified"] = bool(cfg.verify)
    report["ok"] = bool(ok)
    path = os.path.join(out, "report.json")
    write_json_atomic(path, report)
    print(f"\nreport written to {path}")
    if missing("matplotlib"):
        print(f"plots skipped: matplotlib is not installed ({PIP['matplotlib']})")
        return path
    try:
        files = plots(out, trace, results, prepared, row_bytes, title)
    except ImportError as e:  # a broken matplotlib install
        print(f"plots skipped: matplotlib does not load ({e}; {PIP['matplotlib']})")
        return path
    print("plots written to " + ", ".join(files))
    return path
