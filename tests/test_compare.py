"""`onnxopt compare` on hand-made reports (tests/data): grouping, baselines, ratios, Markdown, HTML."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path

import pytest

from onnxopt import cli
from onnxopt.bench import compare, plots, schema

DATA = Path(__file__).parent / "data"
LAPTOP, SERVER, PEERS = (DATA / f"report_{n}.json" for n in ("laptop", "server", "peers"))


def _reports(*paths):
    return [schema.load(p) for p in paths]


def _speedups(comp):
    return {(e.device, e.model, e.ep, e.variant): comp.speedup(e) for e in comp.entries}


def test_device_baseline_ratios():
    comp = compare.build(_reports(LAPTOP, SERVER))
    assert comp.labels() == ["laptop", "server"] and comp.baseline == ("device", "laptop")
    s = _speedups(comp)
    # laptop bert cpu 40 ms, server 10 ms; mnv2 8 ms vs 4 ms; no laptop cuda measurement
    assert s[("server", "bert", "cpu", "original")] == pytest.approx(4.0)
    assert s[("server", "mnv2", "cpu", "original")] == pytest.approx(2.0)
    assert s[("laptop", "bert", "cpu", "original")] == pytest.approx(1.0)
    assert s[("server", "bert", "cuda", "original")] is None
    assert s[("laptop", "bert", "cuda", "original")] is None  # skipped


def test_explicit_baselines():
    comp = compare.build(_reports(LAPTOP, SERVER), baseline="server")
    assert _speedups(comp)[("laptop", "bert", "cpu", "original")] == pytest.approx(0.25)
    comp = compare.build(_reports(SERVER), baseline="cpu")  # an EP: cuda against cpu on each device
    assert comp.baseline == ("ep", "cpu")
    assert _speedups(comp)[("server", "bert", "cuda", "original")] == pytest.approx(5.0)
    comp = compare.build(_reports(PEERS))  # one device with variants: against the original
    assert comp.baseline == ("variant", "original")
    s = _speedups(comp)
    assert s[("laptop", "bert", "cpu", "onnxopt-O3")] == pytest.approx(1.6)
    assert s[("laptop", "bert", "cpu", "onnxslim")] == pytest.approx(0.8)
    with pytest.raises(schema.ReportError, match="--baseline 'phone' is neither a device"):
        compare.build(_reports(LAPTOP, SERVER), baseline="phone")


def test_alternating_rounds_give_paired_speedups():
    (rep,) = _reports(PEERS)
    rounds = {"original": [40.0, 40.0, 80.0], "onnxopt-O3": [20.0, 25.0, 40.0], "onnxslim": [50.0, 50.0, 100.0]}
    for r in rep["results"]:
        r["latency_ms"]["round_medians"] = rounds[r["variant"]]
    schema.validate(rep)
    comp = compare.build([rep])
    o3 = next(e for e in comp.entries if e.variant == "onnxopt-O3")
    # per-round ratios 2.0, 1.6, 2.0: the median pairs rounds, unlike p50s (40 / 25 = 1.6)
    assert comp.speedup(o3) == pytest.approx(2.0)
    assert comp.speedup_range(o3, "variant", "original") == pytest.approx((2.0, 1.8, 2.0))
    assert "| 2.00x (1.80-2.00) |" in compare.markdown(comp)


def test_same_label_different_machines_stay_apart():
    a, b = _reports(LAPTOP, SERVER)
    b = copy.deepcopy(b)
    b["label"] = "laptop"
    comp = compare.build([a, b])
    assert comp.labels() == ["laptop [111111]", "laptop [222222]"]


def test_same_machine_reports_merge_and_warn_about_duplicates():
    comp = compare.build(_reports(LAPTOP, PEERS))
    assert comp.labels() == ["laptop"]
    assert any("measured twice" in n for n in comp.notes)


def test_markdown_tables():
    md = compare.markdown(compare.build(_reports(LAPTOP, SERVER)))
    assert "| laptop | Intel Core i7 | 4 | AVX2 |" in md
    assert "| server | AMD EPYC 7763 | 64 | AVX-512 VNNI | 16 GB | NVIDIA A100 (driver 550.54) |" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| bert | cpu | server |")]
    assert len(rows) == 1 and rows[0].split("|")[4].strip() == "10.0" and rows[0].endswith("| 4.00x |")
    assert "speedup over device 'laptop' (> 1 is faster): p50 of the baseline / p50" in md
    assert "- laptop / bert / cuda: skipped: CUDAExecutionProvider is not available" in md


def test_markdown_variant_table():
    md = compare.markdown(compare.build(_reports(PEERS)))
    assert "### Variants on laptop, cpu EP" in md
    assert "| bert | onnxopt-O3 | 3.00 | 500 | 300 | 440.0 | 1.0e-06 | 0.999999 | 25.0 | 30.0 | 2.0 | 1.60x |" in md
    assert "| bert | onnxsim |" in md and "skipped: onnxsim is not installed" in md
    assert "### Latency" not in md  # one device: the variant table holds every latency


def test_html_is_self_contained_with_plots(tmp_path, capsys):
    md, page = tmp_path / "c.md", tmp_path / "c.html"
    assert cli.main(["compare", str(LAPTOP), str(SERVER), "--markdown", str(md), "--html", str(page)]) == 0
    assert "| server |" in capsys.readouterr().out
    text = page.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 2  # latency, speedup
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "http" not in text.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert md.read_text() == compare.markdown(compare.build(_reports(LAPTOP, SERVER)))


def test_no_baseline_no_speedup_plot():
    comp = compare.build([_reports(LAPTOP)[0]])
    assert comp.baseline is None
    assert [title for title, _ in plots.figures(comp)] == ["Latency"]


def test_compare_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "none.json")]) == 1
    assert capsys.readouterr().err.strip().endswith("none.json: no such file")
    assert cli.main(["compare", str(LAPTOP), "--baseline", "phone", "-q"]) == 1
    assert cli.main(["compare"]) == 2
    err = capsys.readouterr().err
    assert "onnxopt compare: error: the following arguments are required" in err
