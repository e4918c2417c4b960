"""int8 post-training quantization end to end on the trained digits CNN, and bad calibration data.

Verification on synthesized standard-normal inputs is off here: the digits model sees inputs in
[-1, 1], and int8 clips out-of-distribution values by design; fidelity is measured on real data.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt import host, verify
from onnxopt.bench import zoo
from onnxopt.passes.int8.quantize import QuantizeInt8Pass


@pytest.fixture(scope="module")
def digits():
    return zoo.build("digits_cnn"), zoo.digits_data()


def _accuracy(model: onnx.ModelProto | str, x, y) -> float:
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def _run_pass(model_path, data, **options) -> tuple[ir.Model, QuantizeInt8Pass]:
    model = onnxopt.compile(model_path, opt_level=2, verify_outputs=False).ir_model
    p = QuantizeInt8Pass()
    p.configure({"calibration_data": data, "calibration_samples": None, "calibration_method": "entropy",
                 "int8_min_cosine": 0.99, "target": "cpu", "make_session": verify.session} | options)
    p(model)
    return model, p


@pytest.mark.parametrize("method", ["entropy", "minmax", "percentile"])
def test_digits_cnn_int8_accuracy(digits, tmp_path, method):
    path, (x_tr, _, x_te, y_te) = digits
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=x_tr[:200])
    result = onnxopt.compile(path, opt_level=2, int8=True, calibration_data=str(calib), calibration_method=method,
                             verify_outputs=False)
    ops = result.report["ops_after"]
    # Two Conv + one Gemm: three activations and three weights (+ two int32 biases) quantized.
    assert ops["QuantizeLinear"] == 3, ops
    assert ops["DequantizeLinear"] == 3 + 3 + 3, ops
    rec = next(r for r in result.report["passes"] if r["name"] == "quantize_int8")
    assert rec["fired"] == 3
    out = tmp_path / "int8.onnx"
    result.save(out)
    onnx.checker.check_model(str(out), full_check=True)
    base = _accuracy(str(path), x_te, y_te)
    got = _accuracy(str(out), x_te, y_te)
    assert base > 0.95
    assert got >= base - 0.003, (base, got)
    # Weights are stored as int8 (per output channel), the float originals are gone.
    saved = onnx.load(str(out))
    kinds = {t.name: t.data_type for t in saved.graph.initializer}
    assert sum(1 for k in kinds.values() if k == onnx.TensorProto.INT8) >= 3
    assert not any(n.endswith(".bnfold") and kinds[n] == onnx.TensorProto.FLOAT for n in kinds)


def test_digits_cnn_details_and_idempotence(digits):
    path, (x_tr, *_) = digits
    feeds = [{"input": x_tr[i : i + 1]} for i in range(60)]
    model, p = _run_pass(path, feeds)
    d = p.details
    assert d["samples"] == {"calibration": 48, "validation": 12, "validation_kept": 12}
    assert d["activation_type"] == "uint8" and d["quantized"] == 3 and d["excluded"] == []
    # Post-ReLU activations get zero point 0 (u8 over [0, T]); the input in [-1, 1] a mid zero point.
    relu = [s for name, s in d["scales"].items() if name != "input"]
    assert relu and all(s["zero_point"] == 0 and s["range"][0] == 0.0 for s in relu)
    assert d["scales"]["input"]["zero_point"] in range(120, 136)
    assert d["fidelity"]["validation"]["min_cosine"] >= 0.999 and d["fidelity"]["calibration"]["min_cosine"] >= 0.999
    # Every quantized layer with a bias (2 Convs, the Gemm) has it corrected for the weight rounding.
    with_bias = [n for n in model.graph if n.op_type in ("Conv", "Gemm") and len(n.inputs) > 2
                 and n.inputs[2].name.endswith("int32_dq")]
    assert d["bias_corrected"] == len(with_bias) == 3
    # A second run finds every layer fed by DequantizeLinear and changes nothing.
    again = QuantizeInt8Pass()
    again.configure(p.options)
    assert not again(model).modified
    assert all("already quantized" in x.reason for x in again.declined)


def test_fidelity_control_keeps_worst_layers_float(digits):
    path, (x_tr, *_) = digits
    feeds = [{"input": x_tr[i : i + 1]} for i in range(40)]
    # An unreachable target: layers go back to float, worst first, until it holds.
    model, p = _run_pass(path, feeds, int8_min_cosine=1.0)
    d = p.details
    errors = [e["error"] for e in d["excluded"]]
    assert errors and errors == sorted(errors, reverse=True)
    assert all(layer["error"] is not None for layer in d["layers"])
    worst = max(d["layers"], key=lambda layer: layer["error"])
    assert not worst["quantized"]
    assert d["quantized"] + d["float"] == 3
    ops = [n.op_type for n in model.graph]
    assert ops.count("DequantizeLinear") <= 3 * d["quantized"]


def test_targets_pick_activation_types(digits):
    path, (x_tr, *_) = digits
    feeds = [{"input": x_tr[i : i + 1]} for i in range(20)]
    model, p = _run_pass(path, feeds, target="cuda")
    assert p.details["activation_type"] == "int8"
    zps = [n.inputs[2].const_value.numpy() for n in model.graph if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and int(z) == 0 for z in zps)


def test_attention_matmuls_stay_float():
    # Scores = Q @ K^T (two activations) stays float; the projection with a constant weight is quantized.
    model = ir.from_proto(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 8] x) => (float[1, 4, 4] y) <float[8, 8] w = {""" + ", ".join(["0.1"] * 64) + """}> {
            q = MatMul(x, w)
            kt = Transpose<perm = [0, 2, 1]>(x)
            y = MatMul(q, kt)
        }"""))
    p = QuantizeInt8Pass()
    rng = np.random.default_rng(0)
    p.configure({"calibration_data": [{"x": rng.standard_normal((1, 4, 8)).astype(np.float32)} for _ in range(10)],
                 "calibration_method": "entropy", "int8_min_cosine": 0.0, "target": "cpu",
                 "make_session": verify.session})
    p(model)
    assert p.fired == 1
    assert any("both operands are activations" in d.reason for d in p.declined)


def test_int8_at_O3_keeps_attention_projections_quantizable():
    """With --int8, -O3 fuses the attention core into MultiHeadAttention and leaves the merged Q/K/V
    projection outside, where it is quantized (com.microsoft Attention would keep it float inside)."""
    path = zoo.build("bert", size="tiny")
    calib = [zoo.sample_feeds("bert", path, seed=s) for s in range(8)]
    qdq = onnxopt.compile(path, opt_level=3, int8=True, calibration_data=calib, int8_min_cosine=0.0,
                          disable=["lower_int8"])
    ops = qdq.report["ops_after"]
    assert ops.get("com.microsoft.MultiHeadAttention") == 2 and "com.microsoft.Attention" not in ops
    qkv = [n for n in qdq.ir_model.graph if n.op_type == "MatMul" and n.inputs[1].shape[1] == 3 * n.inputs[1].shape[0]]
    assert len(qkv) == 2
    assert all(n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "DequantizeLinear" for n in qkv)
    # On the cpu target lower_int8 then runs the quantized projection and the core as one QAttention
    # and every other MatMul as MatMulIntegerToFloat.
    ops = onnxopt.compile(path, opt_level=3, int8=True, calibration_data=calib, int8_min_cosine=0.0).report["ops_after"]
    assert ops.get("com.microsoft.QAttention") == 2 and "com.microsoft.MultiHeadAttention" not in ops
    assert ops.get("com.microsoft.MatMulIntegerToFloat") == 6 and "MatMul" not in ops
    # Without --int8 the same level packs the projection into Attention.
    assert onnxopt.compile(path, opt_level=3).report["ops_after"]["com.microsoft.Attention"] == 2


# ---- bad calibration data: a clear error before any work ----------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x: {"image": x[:10]}, "missing array(s) for input(s) 'input'"),
        (lambda x: {"input": x[:10].astype(np.float64)}, "dtype float64, the model expects float32"),
        (lambda x: {"input": x[:10, :, :4]}, "the model expects float32"),
        (lambda x: {"input": x[:10, 0]}, "expected rank 4 or 5"),
        (lambda x: {"input": np.where(np.arange(10)[:, None, None, None] == 3, np.nan, x[:10])}, "NaN or infinite"),
        (lambda x: {"input": x[:1]}, "1 calibration sample(s), at least 2 needed"),
    ],
)
def test_bad_npz_is_refused(digits, tmp_path, make, message):
    path, (x_tr, *_) = digits
    f = tmp_path / "bad.npz"
    np.savez(f, **make(x_tr))
    with pytest.raises(onnxopt.CompileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        onnxopt.compile(path, opt_level=2, int8=True, calibration_data=str(f), verify_outputs=False)


def test_bad_sources_are_refused(digits, tmp_path):
    path, (x_tr, *_) = digits

    def compile_with(data, **kw):
        return onnxopt.compile(path, opt_level=2, int8=True, calibration_data=data, verify_outputs=False, **kw)

    with pytest.raises(onnxopt.CompileError, match="no such file"):
        compile_with(str(tmp_path / "missing.npz"))
    with pytest.raises(onnxopt.CompileError, match="no .npz or .npy files"):
        compile_with(str(tmp_path))
    np.save(tmp_path / "input.npy", x_tr[:5])
    with pytest.raises(onnxopt.CompileError, match="5 calibration sample\\(s\\), --calibration-samples 8 asked"):
        compile_with(str(tmp_path), calibration_samples=8)
    with pytest.raises(onnxopt.CompileError, match="unknown calibration method 'mse'"):
        compile_with(str(tmp_path), calibration_method="mse")
    with pytest.raises(onnxopt.CompileError, match="calibration sample 0: unknown name\\(s\\) 'pixels'"):
        compile_with([{"input": x_tr[:1], "pixels": x_tr[:1]}] * 3)
    with pytest.raises(onnxopt.CompileError, match="single dict"):
        compile_with({"input": x_tr[:10]})
    # A folder of .npy named after the inputs works, as does a generator of feed dicts.
    assert compile_with(str(tmp_path)).report["ops_after"]["QuantizeLinear"] == 3
    gen = ({"input": x_tr[i : i + 1]} for i in range(10))
    assert compile_with(gen).report["ops_after"]["QuantizeLinear"] == 3


def _saturation_model() -> onnx.ModelProto:
    """A 1x1 Conv, a depthwise Conv and a MatMul whose weights are all large: with u8 activations near
    their max, pairs of u8 x s8 products overflow int16 (2 * 255 * 127) unless weights have 7 bits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 64
    inits = [
        numpy_helper.from_array((np.sign(rng.standard_normal((c, c, 1, 1))) * (1 + 0.01 * rng.random((c, c, 1, 1))))
                                .astype(np.float32), "w_pointwise"),
        numpy_helper.from_array((1 + 0.01 * rng.random((c, 1, 3, 3))).astype(np.float32), "w_depthwise"),
        numpy_helper.from_array((1 + 0.01 * rng.random((c, 16))).astype(np.float32), "w_matmul"),
        numpy_helper.from_array(np.array([1, 16, c], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_pointwise"], ["p"]),
        helper.make_node("Relu", ["p"], ["r"]),
        helper.make_node("Conv", ["r", "w_depthwise"], ["d"], group=c, pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["d"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w_matmul"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "saturation", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _kernels_vs_qdq(model: onnx.ModelProto, feeds) -> float:
    """Worst relative difference between onnxruntime's integer kernels and the QDQ graph run as floats."""
    worst = 0.0
    fast, exact = verify.session(model, optimize=True), verify.session(model)
    for feed in feeds:
        a, b = fast.run(None, feed)[0], exact.run(None, feed)[0]
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    return worst


def _saturation_int8(reduce_range):
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.random((1, 64, 4, 4)).astype(np.float32)} for _ in range(20)]
    # The QDQ form (lower_int8 off): lowered, both sessions would run the integer kernels.
    result = onnxopt.compile(_saturation_model(), opt_level=2, int8=True, calibration_data=feeds,
                             int8_min_cosine=0.0, verify_outputs=False, int8_reduce_range=reduce_range,
                             disable=["lower_int8"])
    details = next(r for r in result.report["passes"] if r["name"] == "quantize_int8")["details"]
    assert details["quantized"] == 3
    return result, details, feeds


def test_int8_integer_kernels_compute_what_the_qdq_graph_means():
    # On every host the default weight range makes onnxruntime's integer kernels agree with the QDQ
    # meaning (float rounding only), and the report says how fidelity was measured.
    result, details, feeds = _saturation_int8(None)
    assert details["reduce_range"] == host.u8s8_saturates()
    assert details["fidelity_measured_on"].startswith("onnxruntime CPU integer kernels")
    assert "min_cosine" in details["fidelity"]["validation_qdq_float"]
    assert _kernels_vs_qdq(result.model, feeds) < 1e-3
    weights = {n.inputs[0].name: n.inputs[0].const_value.numpy() for n in result.ir_model.graph
               if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
               and n.inputs[0].const_value.dtype == ir.DataType.INT8}
    # 7 bits where the kernel goes through int16 pair sums; the depthwise kernel accumulates in int32.
    limit = 63 if details["reduce_range"] else 127
    assert np.abs(weights["w_pointwise.int8"]).max() == limit
    assert np.abs(weights["w_matmul.int8"]).max() == limit
    assert np.abs(weights["w_depthwise.int8"]).max() == 127


@pytest.mark.skipif(not host.u8s8_saturates(), reason="this CPU has VNNI: its u8 x s8 kernels do not saturate")
def test_int8_8bit_weights_saturate_on_this_host():
    # Why the default is 7 bits here: forced 8-bit weights make the kernels differ from the QDQ meaning.
    result, details, feeds = _saturation_int8(False)
    assert not details["reduce_range"]
    assert _kernels_vs_qdq(result.model, feeds) > 1e-2


@pytest.mark.parametrize(("flags", "machine", "saturates"), [
    ({"avx2", "fma"}, "x86_64", True),
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", True),
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),
    ({"avx2", "avx_vnni"}, "x86_64", False),
    ({"amx_int8", "avx512f"}, "x86_64", False),
    (set(), "AMD64", True),
    ({"asimd", "asimddp"}, "aarch64", False),
])
def test_host_u8s8_saturation(flags, machine, saturates):
    assert host.u8s8_saturates(flags, machine) is saturates


def test_fidelity_control_widens_a_range_that_clips_outliers():
    # Outlier features (a few tokens of one channel at 20-40, as in transformer FFNs): KL clips them,
    # which ruins the output they drive; the control measures both ranges and keeps the observed one.
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 32)) * 0.1).astype(np.float32)
    w[5] = 1.0
    model = ir.from_proto(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "outliers",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16, 32])],
        [onnx.numpy_helper.from_array(w, "w")]), opset_imports=[onnx.helper.make_opsetid("", 17)]))

    def sample():
        x = rng.standard_normal((1, 16, 64)).astype(np.float32)
        x[0, rng.integers(16), 5] = rng.uniform(20, 40)
        return {"x": x}

    feeds = [sample() for _ in range(40)]
    p = QuantizeInt8Pass()
    p.configure({"calibration_data": feeds, "calibration_method": "entropy", "int8_min_cosine": 0.999,
                 "target": "cpu", "make_session": verify.session})
    p(model)
    d = p.details
    scale = d["scales"]["x"]
    assert d["control_steps"]["all_quantized"]["min_cosine"] < 0.99  # the KL range clipped the outliers
    assert scale["chosen_by"].startswith("minmax, output error")
    assert scale["range"][1] == pytest.approx(scale["observed"][1])
    assert d["control_steps"]["ranges_chosen"]["min_cosine"] >= 0.999
    assert d["quantized"] == 1 and d["excluded"] == []


@pytest.mark.parametrize(("flag", "bits"), [("on", 63), ("off", 127)])
def test_cli_int8_reduce_range(digits, tmp_path, capsys, flag, bits):
    from onnxopt import cli

    path, (x_tr, *_) = digits
    np.savez(tmp_path / "calib.npz", input=x_tr[:100])
    out, rep = tmp_path / "int8.onnx", tmp_path / "report.json"
    assert cli.main([str(path), "--int8", "--calibration-data", str(tmp_path / "calib.npz"), "-o", str(out),
                     "--report", str(rep), "--int8-reduce-range", flag, "--no-verify"]) == 0
    summary = capsys.readouterr().out
    # 8-bit weights on a CPU whose kernels saturate: the check on those kernels may keep a layer float.
    assert re.search(r"int8: [1-3] of 3 layers quantized", summary) and re.search(r"validation min cosine 0.99\d+ \(target 0.99 with margin: met\)", summary)
    assert ("7-bit" in summary) == (flag == "on")
    assert json.loads(rep.read_text())["options"]["int8_reduce_range"] is (flag == "on")
    codes = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and t.name.endswith(".int8")]
    assert codes and max(int(np.abs(c).max()) for c in codes) == bits


def test_html_report_shows_int8_layers():
    """--report-html's int8 section: one bar per layer, green int8, red kept in float."""
    from onnxopt import html_report

    details = {"layers": [{"node": "conv1", "op": "Conv", "quantized": True, "error": 0.001},
                          {"node": "fc", "op": "Gemm", "quantized": False, "error": 0.2}]}
    page = html_report.render({"options": {}, "passes": [{"name": "quantize_int8", "fired": 1, "time_s": 0.1,
                                                          "declined": [], "details": details}]})
    assert page.count("<rect") == 2 and "#2ca02c" in page and "#d62728" in page and "1 of 2 layers int8" in page
