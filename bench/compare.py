"""Compare bench reports: tables of model x device x EP (x variant) with speedups over a baseline.

Devices: reports are grouped by their label and device fingerprint id. Reports with the same label and
fingerprint (two runs on one machine) merge into one device; two reports with the same label from
different machines get the fingerprint id appended so they stay apart; the same machine under two
labels (e.g. `--label 1-thread` and `--label 2-threads`) are two columns, which is how settings are
compared.

Baseline (`--baseline NAME`): NAME is looked up as a device label, then a variant name, then an EP
name; the baseline of a measurement is the same measurement with the device / variant / EP replaced by
NAME. Speedup (> 1: faster than the baseline): when both were measured in the alternating rounds of one
run (`--peers`), the median over rounds of baseline round median / round median, with the interquartile
range of those per-round ratios, so drift of the machine cancels; otherwise baseline p50 / p50.
Without --baseline: the first report's device when there are several devices, else the `original`
variant when there are variants, else the first EP when there are several, else no speedups.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json

import numpy as np

from onnxopt.bench.fingerprint import simd_summary
from onnxopt.bench.tables import Table, ms, num


@dataclasses.dataclass
class Device:
    label: str
    fingerprint: dict
    reports: list[dict]


@dataclasses.dataclass
class Entry:
    """One measurement (a results[] item) with where it came from."""

    device: str
    model: str
    ep: str
    variant: str
    result: dict
    source: int = 0  # which report
    mode: str = "isolated"

    @property
    def ok(self) -> bool:
        return self.result["status"] == "ok"

    @property
    def p50(self) -> float | None:
        return self.result["latency_ms"]["p50"] if self.ok else None


@dataclasses.dataclass
class Comparison:
    devices: list[Device]
    entries: list[Entry]
    variants: dict[tuple[str, str, str], dict]  # (device, model, variant) -> variants[] item
    baseline: tuple[str, str] | None  # (kind, name): kind is "device", "variant" or "ep"
    notes: list[str]

    def speedup(self, e: Entry) -> float | None:
        if self.baseline is None or not e.ok:
            return None
        return self.speedup_over(e, *self.baseline)

    def speedup_over(self, e: Entry, kind: str, name: str) -> float | None:
        found = self.speedup_range(e, kind, name)
        return None if found is None else found[0]

    def speedup_range(self, e: Entry | None, kind: str, name: str) -> tuple[float, float, float] | None:
        """(speedup, low, high): paired per-round ratios (median and quartiles) when both measurements
        alternated in one run, else the ratio of p50s three times."""
        if e is None or not e.ok or not e.p50:
            return None
        key = {"device": e.device, "model": e.model, "ep": e.ep, "variant": e.variant}
        key[kind] = name
        base = self._index.get((key["device"], key["model"], key["ep"], key["variant"]))
        if base is None or not base.ok:
            return None
        mine, theirs = e.result["latency_ms"].get("round_medians"), base.result["latency_ms"].get("round_medians")
        if (e.source == base.source and e.mode == "alternating" and mine and theirs and len(mine) == len(theirs)
                and len(mine) > 1 and all(mine)):
            ratios = np.array(theirs) / np.array(mine)
            q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
            return float(q50), float(q25), float(q75)
        ratio = base.p50 / e.p50
        return ratio, ratio, ratio

    def __post_init__(self):
        self._index = {(e.device, e.model, e.ep, e.variant): e for e in self.entries}

    def labels(self) -> list[str]:
        return [d.label for d in self.devices]


def group_devices(reports: list[dict]) -> list[Device]:
    devices: dict[tuple[str, str], Device] = {}
    for rep in reports:
        key = (rep["label"], rep["device"]["id"])
        if key in devices:
            devices[key].reports.append(rep)
        else:
            devices[key] = Device(rep["label"], rep["device"], [rep])
    taken = [label for label, _ in devices]
    for (label, dev_id), dev in devices.items():
        if taken.count(label) > 1:
            dev.label = f"{label} [{dev_id[:6]}]"
    return list(devices.values())


def _resolve_baseline(name: str | None, devices: list[Device], entries: list[Entry]) -> tuple[str, str] | None:
    labels = [d.label for d in devices]
    variants = list(dict.fromkeys(e.variant for e in entries))
    eps = list(dict.fromkeys(e.ep for e in entries if e.ok))
    if name is not None:
        for kind, names in (("device", labels), ("variant", variants), ("ep", eps)):
            if name in names:
                return kind, name
        from onnxopt.bench.schema import ReportError

        raise ReportError(f"--baseline {name!r} is neither a device ({', '.join(labels)}), a variant "
                          f"({', '.join(variants)}) nor an EP ({', '.join(eps) or 'none measured'})")
    if len(labels) > 1:
        return "device", labels[0]
    if len(variants) > 1 and "original" in variants:
        return "variant", "original"
    if len(eps) > 1:
        return "ep", eps[0]
    return None


def build(reports: list[dict], baseline: str | None = None) -> Comparison:
    devices = group_devices(reports)
    entries: dict[tuple, Entry] = {}
    variants: dict[tuple[str, str, str], dict] = {}
    notes: list[str] = []
    shas: dict[str, set[str]] = {}
    source = {id(rep): i for i, rep in enumerate(reports)}
    for dev in devices:
        for rep in dev.reports:
            for m in rep["models"]:
                shas.setdefault(m["name"], set()).add(m["sha256"])
            for r in rep["results"]:
                key = (dev.label, r["model"], r["ep"], r["variant"])
                if key in entries and entries[key].ok and r["status"] != "ok":
                    continue  # keep a real measurement over a later skip
                if key in entries and entries[key].ok:
                    notes.append(f"{r['model']} / {r['variant']} / {r['ep']} was measured twice on {dev.label}; "
                                 "the later report wins")
                entries[key] = Entry(*key, r, source[id(rep)], rep["settings"]["mode"])
            for v in rep.get("variants", []):
                variants[(dev.label, v["model"], v["name"])] = v
    for model, digests in shas.items():
        if len(digests) > 1:
            notes.append(f"model {model!r} is not the same file in every report ({len(digests)} different sha256)")
    ordered = list(entries.values())
    comp = Comparison(devices, ordered, variants, _resolve_baseline(baseline, devices, ordered), notes)
    return comp


# --- tables -----------------------------------------------------------------------------------------

def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _x_range(found: tuple[float, float, float] | None) -> str:
    if found is None:
        return ""
    mid, low, high = found
    return _x(mid) if low == high else f"{mid:.2f}x ({low:.2f}-{high:.2f})"


def device_table(comp: Comparison) -> Table:
    rows = []
    for d in comp.devices:
        fp = d.fingerprint

        def each(get) -> str:
            return ", ".join(dict.fromkeys(str(get(r)) for r in d.reports))

        gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in fp["gpus"])
        rows.append([
            d.label, fp["cpu"]["model"], str(fp["cpu"]["usable_cores"] or fp["cpu"]["logical_cores"] or ""),
            simd_summary(fp["cpu"]["simd"]), num(fp["memory_gb"], "{:.0f} GB"), gpus,
            f"{fp['os'].split('-with-')[0]}, Python {fp['python']}", each(lambda r: r["onnxruntime_version"]),
            each(lambda r: r["settings"]["threads"] or "default"), each(lambda r: r["settings"]["graph_optimization_level"]),
            each(lambda r: r["settings"]["mode"]), each(lambda r: r["created_utc"][:16].replace("T", " ")),
        ])
    return Table("Devices", ["device", "CPU", "cores", "SIMD", "memory", "GPU", "OS", "onnxruntime",
                             "threads", "ORT opt level", "mode", "date (UTC)"], rows).drop_empty_columns()


def _baseline_text(comp: Comparison) -> str:
    if comp.baseline is None:
        return ""
    kind, name = comp.baseline
    return (f"speedup over {kind} {name!r} (> 1 is faster): p50 of the baseline / p50, or, for measurements "
            "that alternated in one run, the median of per-round ratios (interquartile range in brackets).")


def latency_table(comp: Comparison) -> Table:
    rows = []
    devices = comp.labels()
    order = {label: i for i, label in enumerate(devices)}
    show_variant = len({e.variant for e in comp.entries}) > 1
    for e in sorted(comp.entries, key=lambda e: (e.model, e.ep, order[e.device])) if not show_variant else \
            _variant_order(comp):
        if not e.ok:
            continue
        lat, r = e.result["latency_ms"], e.result
        mem = r["memory"] or {}
        rows.append([
            e.model, e.variant, e.ep, e.device, ms(lat["p50"]), ms(lat["p90"]), ms(lat["p99"]),
            f"{ms(lat['mean'])} ± {ms(lat['stdev'])}", num(lat["noise_pct"]),
            num(r["throughput"]["inferences_per_s"]),
            num(r["throughput"]["items_per_s"]) if r["throughput"]["batch_size"] != 1 else "",
            num(r["session_load_s"], "{:.3f}"), num(mem.get("host_peak_delta_mb"), "{:.0f}"),
            num(mem.get("device_mb"), "{:.0f}"), _x_range(comp.speedup_range(e, *comp.baseline) if comp.baseline else None),
        ])
    headers = ["model", "variant", "EP", "device", "p50 ms", "p90 ms", "p99 ms", "mean ± sd ms", "noise %",
               "inferences/s", "items/s", "load s", "host MB", "GPU MB", "speedup"]
    table = Table("Latency", headers, rows, right=set(range(4, len(headers))), note=_baseline_text(comp))
    if not show_variant:
        table.rows = [r[:1] + r[2:] for r in table.rows]
        table.headers = headers[:1] + headers[2:]
        table.right = {i - 1 for i in table.right}
    return table.drop_empty_columns(keep=(0,))


def _variant_order(comp: Comparison) -> list[Entry]:
    model_order = list(dict.fromkeys(e.model for e in comp.entries))
    variant_order = list(dict.fromkeys(e.variant for e in comp.entries))
    dev_order = comp.labels()
    return sorted(comp.entries, key=lambda e: (model_order.index(e.model), e.ep, dev_order.index(e.device),
                                                variant_order.index(e.variant)))


def variant_tables(comp: Comparison) -> list[Table]:
    """Per device and EP: each variant's compile cost, size, fidelity and latency (--peers reports)."""
    tables = []
    for dev in comp.devices:
        vs = [v for (label, _, _), v in comp.variants.items() if label == dev.label]
        if not vs:
            continue
        eps = list(dict.fromkeys(e.ep for e in comp.entries if e.device == dev.label and e.variant != "original"
                                 and (dev.label, e.model, e.variant) in comp.variants)) or ["cpu"]
        for ep in eps:
            if not any(e.ok for e in comp.entries if e.device == dev.label and e.ep == ep):
                continue  # nothing ran on this EP: "Skipped and failed" says why
            rows = []
            for v in vs:
                e = comp._index.get((dev.label, v["model"], ep, v["name"]))
                lat = e.result["latency_ms"] if e is not None and e.ok else None
                c, f = v["compile"], v["fidelity"]
                if v["status"] != "ok":
                    note = f"{v['status']}: {v['reason']}"
                else:
                    note = f"{e.result['status']}: {e.result['reason']}" if e is not None and not e.ok else ""
                rows.append([
                    v["model"], v["name"], num(c and c["time_s"], "{:.2f}"), num(c and c["peak_mb"], "{:.0f}"),
                    num(v["nodes"], "{:d}"), num(v["size_bytes"] and v["size_bytes"] / 1e6),
                    "reference" if v["kind"] == "original" else num(f and f["max_rel"], "{:.1e}"),
                    "" if v["kind"] == "original" else num(f and f["cosine"], "{:.6f}"),
                    ms(lat and lat["p50"]), ms(lat and lat["p90"]), num(lat and lat["noise_pct"]),
                    _x_range(comp.speedup_range(e, "variant", "original")),
                    note,
                ])
            headers = ["model", "variant", "compile s", "compile peak MB", "nodes", "size MB", "max rel err", "cosine",
                       "p50 ms", "p90 ms", "noise %", "vs original", "note"]
            tables.append(Table(f"Variants on {dev.label}, {ep} EP", headers, rows, right=set(range(2, 12)),
                                note="compile: one fresh process per tool (time, peak memory above the "
                                     "process's baseline); fidelity: max relative error and cosine of the "
                                     "outputs against the original, onnxruntime optimizations off; latency: "
                                     "rounds alternating between variants; noise: interquartile range of the "
                                     "per-round medians / p50; vs original: median over rounds of the original's "
                                     "round median / the variant's (interquartile range of those ratios), or "
                                     "p50 of the original / p50 when not measured in alternating rounds.")
                          .drop_empty_columns(keep=(0, 1)))
    return tables


def problems(comp: Comparison) -> list[str]:
    """Skipped and failed measurements and variants, one line each."""
    many_devices = len(comp.devices) > 1
    many_variants = len({e.variant for e in comp.entries}) > 1

    def where(*parts):
        device, rest = parts[0], [p for p in parts[1:] if p]
        return " / ".join(([device] if many_devices else []) + rest)

    lines = []
    grouped: dict[tuple, list[str]] = {}
    for e in comp.entries:
        if not e.ok:
            key = (e.device, e.model, e.ep, e.result["status"], e.result["reason"])
            grouped.setdefault(key, []).append(e.variant)
    for (device, model, ep, status, reason), names in grouped.items():
        which = ", ".join(names) if many_variants else ""
        lines.append(f"{where(device, model, which, ep)}: {status}: {reason}")
    for (label, model, name), v in comp.variants.items():
        if v["status"] != "ok":
            lines.append(f"{where(label, model, name)}: {v['status']}: {v['reason']}")
    return lines


def _tables(comp: Comparison) -> list[Table]:
    tables = [device_table(comp)]
    vt = variant_tables(comp)
    # With variants on one device, the variant tables already hold every latency.
    if not vt or len(comp.devices) > 1:
        tables.append(latency_table(comp))
    return tables + vt


def markdown(comp: Comparison) -> str:
    out = ["# onnxopt benchmark comparison", ""]
    for t in _tables(comp):
        out.append(t.markdown())
    lines = problems(comp)
    if lines:
        out += ["### Skipped and failed", ""] + [f"- {ln}" for ln in lines] + [""]
    if comp.notes:
        out += ["### Notes", ""] + [f"- {n}" for n in comp.notes] + [""]
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
p.note { color: #555; font-size: 0.85em; max-width: 60em; } img { max-width: 100%; }
"""


def html_page(comp: Comparison, figures: list[tuple[str, bytes]]) -> str:
    """One self-contained HTML file: tables and the figures as base64 PNGs."""
    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>onnxopt benchmark comparison</title>"
             f"<style>{_CSS}</style></head><body>\n<h1>onnxopt benchmark comparison</h1>\n"]
    tables = _tables(comp)
    parts.append(tables[0].html())
    for title, png in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h3>{html.escape(title)}</h3>\n<img alt=\"{html.escape(title)}\" "
                     f"src=\"data:image/png;base64,{data}\">\n")
    for t in tables[1:]:
        parts.append(t.html())
    lines = problems(comp)
    if lines:
        parts.append("<h3>Skipped and failed</h3>\n<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>\n")
    if comp.notes:
        parts.append("<h3>Notes</h3>\n<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in comp.notes) + "</ul>\n")
    meta = json.dumps([{"label": d.label, "device_id": d.fingerprint["id"]} for d in comp.devices])
    parts.append(f"<script type=\"application/json\" id=\"devices\">{html.escape(meta)}</script>\n</body></html>\n")
    return "".join(parts)
