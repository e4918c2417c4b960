"""`onnxopt bench`: a real small run through the CLI, EP skips, one-line errors, the report schema, peers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest

import onnxopt
from onnxopt import cli, load
from onnxopt.bench import peers, schema, timing, zoo

DATA = Path(__file__).parent / "data"
FAST = ["--warmup", "1", "--iterations", "6", "--rounds", "3", "-q"]


@pytest.fixture(scope="module")
def cnn() -> Path:
    return zoo.build("cnn", size="tiny", opset=13)


@pytest.fixture(scope="module")
def report(cnn, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "r.json"
    assert cli.main(["bench", str(cnn), "--ep", "cpu,cuda", "--label", "test box", "-o", str(out), *FAST]) == 0
    return json.loads(out.read_text())


def test_bench_report_measures_cpu_and_skips_cuda(report, cnn):
    assert schema.validate(report) is report
    assert report["label"] == "test box" and report["settings"]["mode"] == "isolated"
    (model,) = report["models"]
    assert model["size_bytes"] == cnn.stat().st_size and len(model["sha256"]) == 64
    assert model["input_shapes"] == {"input": [1, 1, 8, 8]} and model["batch_size"] == 1
    by_ep = {r["ep"]: r for r in report["results"]}
    cpu, cuda = by_ep["cpu"], by_ep["cuda"]
    assert cpu["status"] == "ok" and cpu["providers"][0] == "CPUExecutionProvider"
    lat = cpu["latency_ms"]
    assert lat["runs"] == 6 and lat["rounds"] == 3
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert cpu["throughput"]["inferences_per_s"] == pytest.approx(1000 / lat["mean"], rel=1e-3)
    assert cpu["session_load_s"] > 0 and cpu["memory"]["host_peak_delta_mb"] >= 0
    assert cuda["status"] == "skipped" and "CUDAExecutionProvider is not available" in cuda["reason"]
    assert report["device"]["cpu"]["logical_cores"] >= 1 and report["created_utc"].endswith("Z")


def test_bench_prints_a_table_and_the_skip(cnn, capsys):
    assert cli.main(["bench", str(cnn), "--ep", "cpu,cuda", "--warmup", "0", "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    assert "p50 ms" in out and "cuda: skipped" in out


def test_only_unavailable_eps_is_an_error(cnn, capsys):
    assert cli.main(["bench", str(cnn), "--ep", "cuda", *FAST]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxopt bench: error: no measurement ran (cuda: ") and "\n" not in err


@pytest.mark.parametrize("argv, code, message", [
    (["missing.onnx"], 1, "onnxopt bench: error: missing.onnx: no such file"),
    (["m.onnx", "--ep", "cpu,gpu"], 2, "onnxopt bench: error: argument --ep: unknown execution provider 'gpu'"),
    (["m.onnx", "--iterations", "0"], 2, "onnxopt bench: error: argument --iterations: must be at least 1"),
    (["m.onnx", "--input-shape", "x:1,a"], 2, "onnxopt bench: error: argument --input-shape:"),
    (["m.onnx", "--variants", "tvm"], 2, "onnxopt bench: error: argument --variants: unknown variant 'tvm'"),
])
def test_bad_input_is_one_line(argv, code, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", *argv]) == code
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_input_shape_name(cnn, capsys):
    assert cli.main(["bench", str(cnn), "--input-shape", "nope:1,2", *FAST]) == 1
    assert "unknown input 'nope'" in capsys.readouterr().err


def test_summarize_statistics():
    stats = timing.summarize([1.0, 2.0, 3.0, 4.0, 10.0, 1.0], per_round=2)
    assert stats["p50"] == 2.5 and stats["min"] == 1.0 and stats["max"] == 10.0 and stats["runs"] == 6
    # round medians 1.5, 3.5, 5.5: spread 4.0, interquartile range 2.0 = 80 % of p50
    assert stats["round_medians"] == [1.5, 3.5, 5.5] and stats["rounds"] == 3
    assert stats["round_spread"] == 4.0 and stats["noise_pct"] == pytest.approx(80.0)


def test_round_ratios_pair_the_same_rounds():
    base = {"round_medians": [10.0, 20.0, 10.0, 10.0]}
    # Round 2 drifted for both: per-round ratios are all 0.9, whatever the drift.
    assert timing.round_ratios({"round_medians": [9.0, 18.0, 9.0, 9.0]}, base) == {"median": 0.9, "q25": 0.9, "q75": 0.9}


def test_kernels_are_what_onnxruntime_runs(cnn, tmp_path):
    # onnxruntime folds the CNN's BatchNorms into its Convs itself: the original and onnxopt's -O2
    # output run the same kernels (so neither can be faster but by noise), though their graphs differ.
    out = onnxopt.compile(str(cnn), opt_level=2).save(tmp_path / "cnn.O2.onnx")
    assert [n.op_type for n in onnx.load(str(cnn)).graph.node].count("BatchNormalization") == 2
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(out)).graph.node]
    original, compiled = timing.kernels(cnn, tmp_path, 1), timing.kernels(out, tmp_path, 1)
    assert original == compiled and "BatchNormalization" not in original


# --- schema ------------------------------------------------------------------------------------------

def test_schema_round_trip(report, tmp_path):
    path = schema.save(report, tmp_path / "copy.json")
    assert schema.load(path) == report


def _broken(report, edit) -> dict:
    bad = copy.deepcopy(report)
    edit(bad)
    return bad


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(schema_version=2), "unsupported schema_version 2 written by a newer onnxopt"),
    (lambda r: r.update(schema_version="1"), "schema_version: expected an integer"),
    (lambda r: r.pop("schema"), 'not an onnxopt bench report: no "schema"'),
    (lambda r: r.pop("device"), "device: missing"),
    (lambda r: r["results"][0]["latency_ms"].update(p50="fast"), 'results[0].latency_ms.p50: expected a number, got "fast"'),
    (lambda r: r["results"][0].update(status="great"), "results[0].status: expected one of"),
    (lambda r: r["results"][0].update(model="other"), "results[0].model: 'other' is not in models"),
    (lambda r: r["results"][0].update(latency_ms=None), "results[0].latency_ms: missing for a measurement with status ok"),
    (lambda r: r["results"][1].update(reason=None), "results[1].reason: a skipped entry needs a reason"),
    (lambda r: r["models"][0]["input_shapes"].update(input=[1, "x"]),
     "models[0].input_shapes.input[1]: expected an integer"),
])
def test_schema_rejects_malformed_reports(report, edit, message, tmp_path):
    with pytest.raises(schema.ReportError, match=None) as info:
        schema.validate(_broken(report, edit))
    assert message in str(info.value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(report, edit)))
    assert cli.main(["compare", str(path), "-q"]) == 1


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "the JSON is a list"),
    (json.dumps({"schema_version": 1, "passes": []}), "looks like an `onnxopt --report` compile report"),
])
def test_schema_rejects_other_files(text, message, tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(schema.ReportError, match="x.json"):
        schema.load(path)
    assert cli.main(["compare", str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_hand_made_reports_are_valid():
    for path in sorted(DATA.glob("report_*.json")):
        schema.load(path)


# --- peers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expect", [
    ("bert", {"model_type": "bert", "num_heads": 4, "hidden_size": 64}),
    ("gpt2", {"model_type": "gpt2", "num_heads": 4, "hidden_size": 64}),
    ("vit", {"model_type": "vit", "num_heads": 4, "hidden_size": 64}),
])
def test_transformer_hints_from_the_graph_alone(name, expect):
    model = load.load(zoo.build(name, size="tiny", opset=14))
    model.metadata_props.clear()  # no zoo metadata: the graph must say it
    assert peers.transformer_hints(model)[0] == expect


def test_transformer_hints_refuse_a_cnn(cnn):
    hints, why = peers.transformer_hints(load.load(cnn))
    assert hints is None and "not a transformer" in why


def test_peers_run(cnn, tmp_path):
    out = tmp_path / "peers.json"
    md = tmp_path / "peers.md"
    argv = ["bench", str(cnn), "--variants", "onnxopt-O2,ort-transformer-optimizer,onnxsim", "--ep", "cpu,cuda",
            "-o", str(out), "--markdown", str(md), *FAST]
    assert cli.main(argv) == 0
    rep = schema.load(out)
    assert rep["settings"]["mode"] == "alternating"
    variants = {v["name"]: v for v in rep["variants"]}
    assert list(variants) == ["original", "onnxopt-O2", "ort-transformer-optimizer", "onnxsim"]
    o2 = variants["onnxopt-O2"]
    assert o2["status"] == "ok" and o2["compile"]["time_s"] > 0 and o2["compile"]["peak_mb"] >= 0
    assert o2["fidelity"]["max_rel"] < 1e-5 and o2["fidelity"]["cosine"] > 0.99999
    # BN folded into the convs: fewer nodes than the original
    assert o2["nodes"] < variants["original"]["nodes"] == rep["models"][0]["nodes"]
    ort_opt = variants["ort-transformer-optimizer"]
    assert ort_opt["status"] == "skipped" and "not a transformer" in ort_opt["reason"]
    cpu = {r["variant"]: r for r in rep["results"] if r["ep"] == "cpu"}
    assert set(cpu) == {"original", "onnxopt-O2"} | ({"onnxsim"} if variants["onnxsim"]["status"] == "ok" else set())
    assert all(r["status"] == "ok" and r["latency_ms"]["rounds"] == 3 for r in cpu.values())
    assert all(r["status"] == "skipped" for r in rep["results"] if r["ep"] == "cuda")
    text = md.read_text()
    assert "| onnxopt-O2 |" in text and "not a transformer" in text
    assert "/ original, onnxopt-O2" in text and "/ cuda: skipped: CUDAExecutionProvider is not available" in text


def test_missing_peer_is_skipped(cnn, tmp_path, monkeypatch):
    monkeypatch.setitem(peers.TOOLS, "fake-peer", peers.Tool("fake-peer", "peer", lambda *a: None, ("no_such_mod_xyz",)))
    out = tmp_path / "r.json"
    assert cli.main(["bench", str(cnn), "--variants", "fake-peer", "-o", str(out), *FAST]) == 0
    rep = schema.load(out)
    fake = rep["variants"][1]
    assert fake["status"] == "skipped" and fake["reason"] == "no_such_mod_xyz is not installed (pip install no_such_mod_xyz)"
    assert [r["variant"] for r in rep["results"]] == ["original"]


def test_norm_kernels_measures_both_forms(capsys):
    """The benchmark behind the catalogue's `avoid` note runs the kernels it names (not timed here)."""
    from onnxopt.bench.experiments import norm_kernels

    assert set(norm_kernels.kernel_times("SkipLayerNormalization", 4, 8, threads=1, runs=2)) == {"SkipLayerNormalization"}
    assert set(norm_kernels.kernel_times("Add + LayerNormalization", 4, 8, threads=1, runs=2)) == {"Add", "LayerNormalization"}
    assert norm_kernels.main(["--shapes", "4x8", "--threads", "1", "--runs", "2"]) == 0
    assert "| [1, 4, 8] | 1 |" in capsys.readouterr().out


def test_peer_sparsity_matching_the_same_macs():
    """The prune benchmark reruns onnxsim at the sparsity that removes onnxopt's MACs: linear in its
    probe run, refused without one or past what a uniform sparsity can reach."""
    from onnxopt.bench.experiments.prune_bench import _matched_sparsity

    assert _matched_sparsity({"macs": 0.162}, 0.25, "macs", 0.25) == pytest.approx(0.386, abs=1e-3)
    assert _matched_sparsity({"macs": 0.1}, 0.1, "macs", 0.3) == pytest.approx(0.3)
    assert _matched_sparsity({}, 0.25, "macs", 0.25) is None
    assert _matched_sparsity({"macs": 0.0}, 0.25, "macs", 0.25) is None
    assert _matched_sparsity({"macs": 0.1}, 0.25, "macs", 0.5) is None  # would need sparsity 1.25


def test_prune_curves_group_results_by_method():
    """The fidelity-vs-MACs figure has one curve per method at default settings, points in MAC order
    (onnxsim's probe and MAC-matched runs on one curve; non-default onnxopt runs left out)."""
    from onnxopt.bench.experiments.prune_bench import curves, curves_png

    res = {"efficientnet": {
        "onnxopt_O2_prune0.2": {"macs_removed": 0.2, "top1_agreement": 0.85},
        "onnxopt_O2_prune0.1": {"macs_removed": 0.1, "top1_agreement": 0.9},
        "onnxsim_O2_sparsity0.1": {"macs_removed": 0.09, "top1_agreement": 0.3},
        "onnxsim_O2_sparsity0.107_matching0.1": {"macs_removed": 0.1, "top1_agreement": 0.28},
        "torch_pruning_magnitude_matching0.1": {"error": "ImportError: no torch_pruning"},
        "dense_macs": {"Conv": 1.0}},
        "digits": {"onnxopt_prune0.3_round4": {"conv_macs_removed": 0.4, "accuracy": 0.99}}}
    got = curves(res)
    assert got == {"efficientnet": {"onnxopt": [(0.1, 0.9), (0.2, 0.85)],
                                    "onnxsim 0.8": [(0.09, 0.3), (0.1, 0.28)]}}
    assert curves_png(res)[:8] == b"\x89PNG\r\n\x1a\n"
    assert curves_png({}) is None


def test_prune_results_get_size_and_latency(cnn, tmp_path):
    """Every prune-benchmark result with a model file gets its parameter count, file size and
    latency beside the dense model's (and the A/A control); results without one are left alone."""
    from onnxopt.bench.experiments.prune_bench import _add_size_and_latency, _footprint, markdown

    model = onnx.load(str(cnn))
    params = sum(onnx.numpy_helper.to_array(t).size for t in model.graph.initializer)
    params += sum(onnx.numpy_helper.to_array(a.t).size for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value")
    assert _footprint(cnn) == {"params_in_file": params, "file_mb": round(cnn.stat().st_size / 2**20, 2)}
    # The same model stored with its weights in an external file: the same parameters, both files counted.
    ext = tmp_path / "ext.onnx"
    onnx.save(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    got = _footprint(ext)
    assert got["params_in_file"] == params
    assert got["file_mb"] == round((ext.stat().st_size + (tmp_path / "ext.data").stat().st_size) / 2**20, 2)
    res = {"digits": {"onnxopt_prune0.3_round8": {"accuracy": 0.99, "conv_macs_removed": 0.4, "_path": str(ext)},
                      "onnxsim_sparsity0.1": {"error": "ImportError"}, "fp32_accuracy": 0.99}}
    feed = {"input": zoo.sample_feeds("cnn", cnn, seed=0)["input"]}
    _add_size_and_latency(res["digits"], cnn, feed, rounds=2, per_round=3)
    r = res["digits"]["onnxopt_prune0.3_round8"]
    assert "_path" not in r and r["params_in_file"] == params and r["latency_vs_dense"] > 0
    assert res["digits"]["onnxsim_sparsity0.1"] == {"error": "ImportError"}
    assert res["digits"]["latency_aa_control"] > 0 and res["digits"]["dense_footprint"]["params_in_file"] == params
    assert f"{r['latency_vs_dense']}x" in markdown(res)
