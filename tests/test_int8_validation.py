"""int8 fidelity on samples the calibration did not see: the split, the metrics and their margin, the
masked evaluation session, the opset upgrade, the progress callback and the CLI line."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt import cli, verify
from onnxopt.bench import zoo
from onnxopt.kernels import fidelity
from onnxopt.kernels.metrics import cosine
from onnxopt.passes.int8 import calibration_data
from onnxopt.passes.int8.quantize import QuantizeInt8Pass, _Samples


@pytest.fixture(scope="module")
def digits():
    return zoo.build("digits_cnn"), zoo.digits_data()


def _run_pass(model_path, data, **options):
    model = onnxopt.compile(model_path, opt_level=2, verify_outputs=False).ir_model
    p = QuantizeInt8Pass()
    p.configure({"calibration_data": data, "calibration_method": "entropy", "int8_min_cosine": 0.99,
                 "target": "cpu", "make_session": verify.session} | options)
    p(model)
    return model, p


# ---- the split -------------------------------------------------------------------------------


def test_split_is_a_fifth_evenly_spaced_at_least_four():
    plan = calibration_data.split_plan(120)
    assert [k for k in range(120) if plan.is_validation(k)] == list(range(4, 120, 5))
    small = calibration_data.split_plan(10)
    assert sum(map(small.is_validation, range(10))) == 4
    assert not calibration_data.split_plan(7).split
    assert not any(map(calibration_data.split_plan(7).is_validation, range(7)))
    stream = calibration_data.split_plan(None)
    assert [k for k in range(12) if stream.is_validation(k)] == [4, 9]


def test_thresholds_come_from_the_calibration_part_only(digits):
    path, (x_tr, *_) = digits
    feeds = [{"input": x_tr[i : i + 1]} for i in range(20)]
    # Validation samples (every fifth) made huge: the histograms must not see them.
    for k in range(4, 20, 5):
        feeds[k] = {"input": feeds[k]["input"] * 50}
    _, p = _run_pass(path, feeds, int8_min_cosine=0.0)
    d = p.details
    assert d["samples"]["calibration"] == 16 and d["samples"]["validation"] == 4
    observed_max = d["scales"]["input"]["observed"][1]
    assert observed_max <= float(np.abs(np.concatenate([f["input"] for k, f in enumerate(feeds) if k % 5 != 4])).max())


def test_too_few_samples_to_split_are_said(digits, tmp_path, capsys):
    path, (x_tr, *_) = digits
    _, p = _run_pass(path, [{"input": x_tr[i : i + 1]} for i in range(6)])
    assert "too few to split" in p.details["samples"]["not_split"]
    assert p.details["fidelity"]["decided_on"].startswith("calibration")
    np.savez(tmp_path / "calib.npz", input=x_tr[:6])
    assert cli.main([str(path), "--int8", "--calibration-data", str(tmp_path / "calib.npz"),
                     "-o", str(tmp_path / "o.onnx"), "--no-verify"]) == 0
    assert "too few to split" in capsys.readouterr().out


# ---- metrics and the margin ------------------------------------------------------------------


def test_cosine_margin_needs_more_than_the_worst_sample_when_errors_spread():
    refs = [{"y": np.ones(100, np.float32)} for _ in range(10)]
    rng = np.random.default_rng(0)

    def noisy(scales):
        return [{"y": (r["y"] + rng.standard_normal(100) * s).astype(np.float32)} for r, s in zip(refs, scales)]

    metric = fidelity.Metric("cosine", 0.99)
    # The same worst sample, once with uniform errors, once with widely spread ones.
    uniform = metric.summary(refs, noisy([0.1] * 10))
    spread = metric.summary(refs, noisy(np.geomspace(0.1, 0.003, 10)))
    assert uniform["min_cosine"] >= 0.99 and uniform["ok"]
    assert spread["min_cosine"] >= 0.99 and not spread["ok"]
    assert spread["q0.99_cosine"] < 0.99 <= uniform["q0.99_cosine"]


def test_top1_counts_near_ties_apart_and_predicts_from_margins():
    refs = [{"logits": np.array([[5.0, 1.0, 0.0]], np.float32)},
            {"logits": np.array([[2.0, 2.0001, 0.0]], np.float32)},  # a near-tie
            {"logits": np.array([[0.0, 3.0, 1.0]], np.float32)}]
    gots = [{"logits": np.array([[5.0, 1.0, 0.0]], np.float32)},
            {"logits": np.array([[2.001, 2.0, 0.0]], np.float32)},  # flips the tie: not a disagreement
            {"logits": np.array([[0.0, 3.0, 1.0]], np.float32)}]
    margins, ties = zip(*(fidelity.top2_margins(r) for r in refs))
    s = fidelity.Metric("top1", 0.99, np.concatenate(margins), np.concatenate(ties)).summary(refs, gots)
    assert s["near_ties"] == 1 and s["rows"] == 3 and s["agreement"] == 1.0
    assert 0.99 <= s["predicted_agreement"] <= 1.0 and s["ok"]
    flipped = [gots[0], gots[1], {"logits": np.array([[0.0, 1.0, 3.0]], np.float32)}]
    bad = fidelity.Metric("top1", 0.99, np.concatenate(margins), np.concatenate(ties)).summary(refs, flipped)
    assert bad["agreement"] == 0.5 and not bad["ok"]


@pytest.mark.parametrize("metric", ["top1", "rel-error"])
def test_other_metrics_through_the_pass(digits, metric):
    path, (x_tr, *_) = digits
    _, p = _run_pass(path, [{"input": x_tr[i : i + 1]} for i in range(40)], int8_metric=metric)
    fid = p.details["fidelity"]
    assert fid["metric"] == metric and fid["ok"]
    assert ("agreement" if metric == "top1" else "max_rel_error") in fid["validation"]
    assert fid["target"] == fidelity.DEFAULT_TARGETS[metric]


def test_bad_metric_and_target_are_refused(digits):
    path, (x_tr, *_) = digits
    feeds = [{"input": x_tr[i : i + 1]} for i in range(10)]
    with pytest.raises(onnxopt.CompileError, match="int8-metric"):
        onnxopt.compile(path, int8=True, calibration_data=feeds, int8_metric="accuracy", verify_outputs=False)
    with pytest.raises(onnxopt.CompileError, match="int8-target"):
        onnxopt.compile(path, int8=True, calibration_data=feeds, int8_metric="top1", int8_target=2.0,
                        verify_outputs=False)


# ---- the masked evaluation session -----------------------------------------------------------


def test_masked_session_computes_what_the_qdq_graph_means(digits):
    """The control decides through one session with fed masks; its figure for the final choice must be
    the QDQ graph's own (run as float ops) on the same samples."""
    path, (x_tr, *_) = digits
    feeds = [{"input": x_tr[i : i + 1]} for i in range(40)]
    model, p = _run_pass(path, feeds, int8_min_cosine=0.99995)  # forces range choice and exclusions
    d = p.details
    assert "ranges_chosen" in d["control_steps"] and d["evaluations"] > 3
    sess = verify.session(model)
    ref = verify.session(onnxopt.compile(path, opt_level=2, verify_outputs=False).ir_model)
    val = [feeds[k] for k in range(4, 40, 5)]
    cos = [cosine(ref.run(None, f)[0], sess.run(None, f)[0]) for f in val]
    assert d["fidelity"]["validation_qdq_float"]["min_cosine"] == pytest.approx(min(cos), abs=2e-5)


def test_batched_runs_give_the_per_sample_outputs(digits):
    path, (x_tr, *_) = digits
    model = onnxopt.compile(path, opt_level=2, verify_outputs=False).ir_model
    sess = verify.session(model)
    samples = [({"input": x_tr[i : i + 1]}, {"logits": sess.run(None, {"input": x_tr[i : i + 1]})[0]}) for i in range(5)]
    batched, single = _Samples(samples, model), _Samples(samples, model, batch=False)
    assert batched.batch is not None and single.batch is None
    for a, b in zip(batched.run(sess), single.run(sess)):
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-6)


# ---- opset, progress, CLI --------------------------------------------------------------------


def _opset12_model(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8])],
        [onnx.numpy_helper.from_array(w, "w")])
    path = tmp_path / "op12.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 12)]), path)
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((20, 16)).astype(np.float32))
    return path


def test_int8_upgrades_an_opset_12_model_and_says_so(tmp_path, capsys):
    path = _opset12_model(tmp_path)
    out = tmp_path / "q.onnx"
    assert cli.main([str(path), "--int8", "--calibration-data", str(tmp_path / "x.npz"), "-o", str(out),
                     "--int8-min-cosine", "0.9"]) == 0
    text = capsys.readouterr().out
    assert "opset 12 upgraded to 13 for int8 (verified)" in text and re.search(r"int8: 1 of 1 layers quantized", text)
    saved = onnx.load(str(out))
    assert {o.domain: o.version for o in saved.opset_import}[""] >= 13
    assert any(n.op_type == "QuantizeLinear" for n in saved.graph.node)


def test_progress_callback_and_bars(digits, tmp_path, capsys):
    path, (x_tr, *_) = digits
    calls = []
    onnxopt.compile(path, int8=True, calibration_data=[{"input": x_tr[i : i + 1]} for i in range(20)],
                    int8_min_cosine=0.9999, verify_outputs=False, progress=lambda *a: calls.append(a))
    stages = [c[0] for c in calls]
    # Calibration advances shard by shard (SHARD_SAMPLES samples each; 20 samples are one shard).
    calibrating = [c for c in calls if c[0] == "calibrating"]
    assert calibrating == [("calibrating", 20, 20)]
    assert "fidelity control" in stages
    np.savez(tmp_path / "calib.npz", input=x_tr[:20])
    args = [str(path), "--int8", "--calibration-data", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "o.onnx"),
            "--no-verify", "--progress"]
    assert cli.main(args) == 0
    assert "onnxopt: calibrating" in capsys.readouterr().err
    assert cli.main(args + ["-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_cli_int8_metric_top1(digits, tmp_path, capsys):
    path, (x_tr, *_) = digits
    np.savez(tmp_path / "calib.npz", input=x_tr[:60])
    assert cli.main([str(path), "--int8", "--calibration-data", str(tmp_path / "calib.npz"), "-o",
                     str(tmp_path / "o.onnx"), "--no-verify", "--int8-metric", "top1"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"int8 top1: validation top-1 agreement 100.00% \(0 near-tie\(s\) apart, predicted", text)
    assert "12 validation samples held out of the 48 that calibrated" in text


def test_ir_model_is_unchanged_by_a_failed_eval_build(digits):
    """The masked session is built on a temporary rewrite; the graph is given back as it was."""
    path, (x_tr, *_) = digits
    model = onnxopt.compile(path, opt_level=2, verify_outputs=False).ir_model

    def state(m):
        return ([(n.op_type, [v.name if v is not None else "" for v in n.inputs]) for n in m.graph],
                [v.name for v in m.graph.inputs], [v.name for v in m.graph.outputs], sorted(m.graph.initializers))

    before = state(model)

    def broken(_):
        raise RuntimeError("no session")

    p = QuantizeInt8Pass()
    p.configure({"calibration_data": [{"input": x_tr[i : i + 1]} for i in range(10)], "target": "generic",
                 "make_session": lambda m: broken(m) if any(v.name.startswith("onnxopt.int8_eval") for v in m.graph.inputs)
                 else verify.session(m)})
    with pytest.raises(RuntimeError):
        p.apply(model)
    after = state(model)
    assert after[:3] == before[:3] and set(after[3]) <= set(before[3])
    assert not any(name.startswith("onnxopt.int8_eval") for name in after[3])


def test_int8_opset_upgrade_failure_is_one_line(tmp_path, capsys, monkeypatch):
    path = _opset12_model(tmp_path)
    out = tmp_path / "q.onnx"

    def refuse(model, opset):
        raise RuntimeError("No Adapter For MatMul\ntraceback lines")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    assert cli.main([str(path), "--int8", "--calibration-data", str(tmp_path / "x.npz"), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["onnxopt: error: --int8 needs opset 13 (the model has 12): cannot upgrade the model to opset 13: "
                   "No Adapter For MatMul"]
    assert not out.exists()
