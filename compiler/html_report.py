"""The compile report as one self-contained HTML page (`--report-html OUT.html`).

A person reads a per-layer picture faster than JSON: the page shows the op counts before and after,
what every pass fired and declined (with the reasons), verification, and per-layer charts for the
lossy passes: units kept per pruned group, and for int8 each layer's measured error with its
float/int8 choice. Charts are inline SVG, so the page needs no script, no network and no plotting
library.
"""

from __future__ import annotations

import html
import json

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#087f23}.bad{color:#b00020}
details{margin:.3em 0}code{background:#f4f4f4;padding:0 3px}svg text{font:11px system-ui,sans-serif}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                                     for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def bar_chart(labels: list[str], values: list[float], colors: list[str], *, unit: str = "", width: int = 640) -> str:
    """Horizontal bars, one per label, as an inline SVG."""
    if not labels:
        return "<p>(nothing to plot)</p>"
    row, left = 16, min(320, 8 + 7 * max(len(label) for label in labels))
    top = max(max(values), 1e-12)
    height = row * len(labels) + 10
    bars = []
    for i, (label, value, color) in enumerate(zip(labels, values, colors)):
        y = 5 + i * row
        w = max(1.0, (width - left - 90) * value / top)
        bars.append(f'<text x="{left - 4}" y="{y + 11}" text-anchor="end">{_e(label[-45:])}</text>'
                    f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="{color}"/>'
                    f'<text x="{left + w + 4:.1f}" y="{y + 11}">{value:.4g}{_e(unit)}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{"".join(bars)}</svg>'


def _ops(rep: dict) -> str:
    before, after = rep.get("ops_before", {}), rep.get("ops_after", {})
    rows = [[op, before.get(op, 0), after.get(op, 0)] for op in sorted(set(before) | set(after))
            if before.get(op, 0) != after.get(op, 0)]
    return (f"<p>{rep.get('nodes_before')} &rarr; {rep.get('nodes_after')} nodes.</p>"
            + (_table(["op", "before", "after"], rows, {1, 2}) if rows else "<p>No op count changed.</p>"))


def _passes(rep: dict) -> str:
    rows = [[p["name"], p.get("stage", ""), p["fired"], p.get("declined_count", 0), f"{p['time_s'] * 1000:.1f}"]
            for p in rep.get("passes", [])]
    out = [_table(["pass", "stage", "fired", "declined", "ms"], rows, {2, 3, 4})]
    for p in rep.get("passes", []):
        if p.get("declined"):
            items = "".join(f"<li><code>{_e(d['node'] or '-')}</code> ({_e(d['op'])}, {_e(d['rule'])}): {_e(d['reason'])}</li>"
                            for d in p["declined"])
            more = p.get("declined_count", 0) - len(p["declined"])
            extra = f"<li>... and {more} more</li>" if more > 0 else ""
            out.append(f"<details><summary>{_e(p['name'])}: {p.get('declined_count', 0)} declined</summary>"
                       f"<ul>{items}{extra}</ul></details>")
    return "".join(out)


def _verification(rep: dict) -> str:
    ver = rep.get("verification", {})
    if not ver.get("enabled"):
        return "<p>Verification skipped (--no-verify).</p>"
    state = '<span class="ok">passed</span>' if ver.get("ok") else '<span class="bad">failed</span>'
    rows = [[o["name"], f"{o.get('rel', 0):.3g}", f"{o['cosine']:.6f}" if o.get("cosine") is not None else "",
             o.get("note") or ""] for o in ver.get("outputs", [])]
    shapes = ", ".join(f"{k}: {'x'.join(map(str, v))}" for k, v in ver.get("input_shapes", {}).items())
    return f"<p>{state} on {_e(shapes)}</p>" + _table(["output", "max relative error", "cosine", "note"], rows)


def _pruning(details: dict) -> str:
    groups = details.get("groups", [])
    labels = [f"{g.get('node') or g['group']} ({g.get('kind', '')})" for g in groups]
    kept = [g["kept"] / g["units"] if g.get("units") else 0.0 for g in groups]
    colors = ["#1f77b4" if g.get("removed") else "#9ecae1" for g in groups]
    fid = details.get("fidelity", {})
    head = (f"<p>{details.get('macs_removed_fraction', 0):.1%} of the prunable MACs removed; held-out min cosine "
            f"{fid.get('held_out_min_cosine', float('nan')):.4f}. Units kept per group (light: kept whole):</p>")
    declined = details.get("declined_groups", [])
    rest = _table(["group not pruned", "why"], [[d["group"], d["reason"]] for d in declined]) if declined else ""
    return head + bar_chart(labels, kept, colors) + rest


def _int8(details: dict) -> str:
    layers = details.get("layers", [])
    labels = [f"{layer['node']} ({layer['op']})" for layer in layers]
    errors = [float(layer.get("error") or 0.0) for layer in layers]
    colors = ["#2ca02c" if layer.get("quantized") else "#d62728" for layer in layers]
    n = sum(1 for layer in layers if layer.get("quantized"))
    return (f"<p>{n} of {len(layers)} layers int8 (green), the others kept in float (red). Measured output error "
            "of each layer quantized alone:</p>" + bar_chart(labels, errors, colors))


LOSSY = {"prune": ("Pruning", _pruning), "quantize_int8": ("int8", _int8)}


def render(rep: dict) -> str:
    """The page for a compile report (the dict `onnxopt.compile(...).report`)."""
    opts = rep.get("options", {})
    title = f"onnxopt -O{opts.get('opt_level')} --target {opts.get('target')}: {rep.get('input', '')}"
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p>onnxopt {_e(rep.get('onnxopt_version', ''))}, total {rep.get('time_s', {}).get('total', 0):.2f} s</p>",
             "<h2>Ops before and after</h2>", _ops(rep),
             "<h2>Passes</h2>", _passes(rep),
             "<h2>Verification</h2>", _verification(rep)]
    for p in rep.get("passes", []):
        if p["name"] in LOSSY and p.get("details"):
            name, section = LOSSY[p["name"]]
            parts += [f"<h2>{name}</h2>", section(p["details"])]
    parts += ["<h2>Options</h2>", f"<pre>{_e(json.dumps(opts, indent=1, default=str))}</pre>"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
