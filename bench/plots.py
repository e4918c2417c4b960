"""Figures for `onnxopt compare`, as PNG bytes (matplotlib's object API: no pyplot global state).

latency_png: per model, one horizontal bar per measurement (variant / EP / device): the bar is p50,
  the whisker runs to p99 (|) with p90 marked (diamond), the number is p50.
speedup_png: per model, the speedup of each measurement over the baseline (see compare.py), with the
  line at 1x; bars right of it are faster than the baseline; whiskers show the interquartile range of
  the per-round ratios when the measurements alternated in one run.
Colors follow the device when there are several, else the variant.
fidelity_curves_png: one panel per model, a line per method through its (x, fidelity) points (the
  pruning benchmark: fidelity on held-out data against the MACs removed).
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from onnxopt.bench.compare import Comparison, Entry, _variant_order

_BAR_IN = 0.32  # inches per bar
_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
           "#64B5CD")


def _label(e: Entry, vary: dict[str, bool]) -> str:
    parts = [getattr(e, k) for k in ("variant", "ep", "device") if vary[k]]
    return " / ".join(parts) or e.model


def _layout(comp: Comparison, entries: list[Entry]):
    """Models of `entries`; labels, colors and legend from every measurement, so both figures agree."""
    models = list(dict.fromkeys(e.model for e in entries))
    everything = [e for e in _variant_order(comp) if e.ok]
    vary = {k: len({getattr(e, k) for e in everything}) > 1 for k in ("variant", "ep", "device")}
    color_key = "device" if vary["device"] else "variant"
    keys = list(dict.fromkeys(getattr(e, color_key) for e in everything))
    colors = {k: _COLORS[i % len(_COLORS)] for i, k in enumerate(keys)}
    return models, vary, color_key, colors


def _figure(models: list[str], per_model: dict[str, list], title: str) -> tuple[Figure, list]:
    heights = [max(len(per_model[m]), 1) * _BAR_IN + 0.7 for m in models]
    fig = Figure(figsize=(10, sum(heights) + 0.9), layout="constrained")
    axes = fig.subplots(len(models), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    fig.suptitle(title, fontsize=12)
    return fig, list(axes)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def latency_png(comp: Comparison) -> bytes | None:
    entries = [e for e in _variant_order(comp) if e.ok]
    if not entries:
        return None
    models, vary, color_key, colors = _layout(comp, entries)
    per_model = {m: [e for e in entries if e.model == m] for m in models}
    fig, axes = _figure(models, per_model, "Latency per inference (bar: p50, whisker to p99 |, p90 ◆)")
    for ax, model in zip(axes, models):
        rows = per_model[model]
        ys = list(range(len(rows)))[::-1]
        p50 = [e.result["latency_ms"]["p50"] for e in rows]
        p90 = [e.result["latency_ms"]["p90"] for e in rows]
        p99 = [e.result["latency_ms"]["p99"] for e in rows]
        # An outlier-heavy p99 (a busy machine) would squash the bars: switch to a log axis then.
        log = max(p99) / min(p50) > 10
        left = min(p50) / 2 if log else 0.0
        ax.barh(ys, [v - left for v in p50], left=left, color=[colors[getattr(e, color_key)] for e in rows],
                height=0.7, zorder=2)
        ax.hlines(ys, p50, p99, color="#333", linewidth=1, zorder=3)
        ax.plot(p99, ys, linestyle="none", marker="|", markersize=10, color="#333", zorder=4)
        ax.plot(p90, ys, linestyle="none", marker="D", markersize=4, color="#333", zorder=4)
        right = max(p99)
        for y, v, end in zip(ys, p50, p99):
            ax.text(end * 1.08 if log else end + right * 0.01, y, f"p50 {v:.3g} ms", va="center", fontsize=8)
        if log:
            ax.set_xscale("log")
            ax.set_xlim(left, right * 3)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            ax.set_xlim(0, right * 1.18)
        ax.set_yticks(ys, [_label(e, vary) for e in rows], fontsize=9)
        ax.set_title(model, fontsize=10, loc="left")
        ax.set_xlabel("ms (log scale)" if log else "ms")
        ax.grid(axis="x", alpha=0.3, zorder=0)
        ax.spines[["top", "right"]].set_visible(False)
    # Colors are named in the legend when they stand for devices; variants are named on the axis already.
    handles = [Patch(color=c, label=k) for k, c in colors.items()] if color_key == "device" else []
    handles += [Line2D([], [], color="#333", marker="D", linestyle="none", markersize=4, label="p90"),
                Line2D([], [], color="#333", marker="|", linestyle="none", markersize=10, label="p99")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=9, frameon=False)
    return _png(fig)


def speedup_png(comp: Comparison) -> bytes | None:
    if comp.baseline is None:
        return None
    kind, name = comp.baseline
    entries = [e for e in _variant_order(comp) if comp.speedup(e) is not None and getattr(e, kind) != name]
    if not entries:
        return None
    models, vary, color_key, colors = _layout(comp, entries)
    per_model = {m: [e for e in entries if e.model == m] for m in models}
    paired = any(r[1] != r[2] for r in (comp.speedup_range(e, kind, name) for e in entries))
    title = f"Speedup over {kind} {name!r} (> 1 is faster" + ("; whiskers: quartiles of per-round ratios)" if paired else ")")
    fig, axes = _figure(models, per_model, title)
    for ax, model in zip(axes, models):
        rows = per_model[model]
        ys = list(range(len(rows)))[::-1]
        found = [comp.speedup_range(e, kind, name) for e in rows]
        values = [f[0] for f in found]
        # whiskers: interquartile range of per-round ratios (alternating runs only)
        err = [[v - f[1] for v, f in zip(values, found)], [f[2] - v for v, f in zip(values, found)]]
        ax.barh(ys, values, color=[colors[getattr(e, color_key)] for e in rows], height=0.7, zorder=2,
                xerr=err if any(any(x) for x in err) else None, error_kw={"ecolor": "#333", "capsize": 3, "lw": 1})
        ax.axvline(1.0, color="#333", linewidth=1, zorder=3)
        right = max(max(f[2] for f in found), 1.0)
        for y, v, f in zip(ys, values, found):
            ax.text(f[2] + right * 0.015, y, f"{v:.2f}x", va="center", fontsize=8)
        ax.set_yticks(ys, [_label(e, vary) for e in rows], fontsize=9)
        ax.set_xlim(0, right * 1.18)
        ax.set_title(model, fontsize=10, loc="left")
        ax.set_xlabel("speedup (x)")
        ax.grid(axis="x", alpha=0.3, zorder=0)
        ax.spines[["top", "right"]].set_visible(False)
    shown = {getattr(e, color_key) for e in entries}
    if color_key == "device":
        fig.legend(handles=[Patch(color=c, label=k) for k, c in colors.items() if k in shown], loc="outside lower center",
                   ncols=min(len(colors), 5), fontsize=9, frameon=False)
    return _png(fig)


def figures(comp: Comparison) -> list[tuple[str, bytes]]:
    out = []
    for title, make in (("Latency", latency_png), ("Speedup", speedup_png)):
        png = make(comp)
        if png is not None:
            out.append((title, png))
    return out


def fidelity_curves_png(panels: dict, title: str, xlabel: str, first: str | None = None) -> bytes:
    """`panels`: {(panel title, y label): {method: [(x fraction, y), ...]}}; x is drawn in percent.
    Each method keeps one color across panels; `first` is listed (and colored) first."""
    methods = sorted({k for per in panels.values() for k in per}, key=lambda k: (k != first, k))
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, ((name, ylabel), per) in zip(axes, panels.items()):
        for i, method in enumerate(methods):
            if method in per:
                xs, ys = zip(*per[method])
                ax.plot([100 * v for v in xs], ys, marker="o", color=_COLORS[i % len(_COLORS)], label=method)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)
