"""lower_int8 (cpu target, with --int8): QDQ MatMuls become MatMulIntegerToFloat with their bias,
a quantized packed projection + Split + MultiHeadAttention becomes QAttention. Through the oracle
(the QDQ graph run as float ops against the integer kernels) on the QDQ output of real zoo exports
(legacy and dynamo, eager and SDPA, ViT, no value_info; GPT-2's Gemm form is left), on hand-written QDQ graphs
for the forms quantize_int8 does not write (per-tensor weights, no zero points, the bias on the
left, s8 x s8, MultiHeadAttention's own bias, no bias), the numpy references against onnxruntime's
kernels, and a negative test for each precondition."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.bench import zoo
from onnxopt.kernels import attention as KA
from onnxopt.kernels import catalogue
from onnxopt.kernels import quantize as KQ
from oracle import assert_rewrite, assert_rewrites_to, declined, op_counts, padded_feeds, run_ort

MMITF = "com.microsoft.MatMulIntegerToFloat"
QATT = "com.microsoft.QAttention"
MHA = "com.microsoft.MultiHeadAttention"
RNG = np.random.default_rng(0)


def _qdq(path, name: str, tmp_path) -> onnx.ModelProto:
    """-O3 --int8 with lower_int8 off: the QDQ graph quantize_int8 writes."""
    calib = [zoo.sample_feeds(name, path, seed=s) for s in range(8)]
    result = onnxopt.compile(path, opt_level=3, int8=True, calibration_data=calib, int8_min_cosine=0.0,
                             disable=["lower_int8"])
    return onnx.load(str(result.save(tmp_path / "qdq.onnx")))


def _quantized_matmuls(model: onnx.ModelProto) -> int:
    made = {o: n.op_type for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul"
               and all(made.get(i) == "DequantizeLinear" for i in n.input))


@pytest.mark.parametrize("kw", [dict(name="bert", opset=14), dict(name="bert", opset=17, attention="sdpa"),
                                dict(name="bert", exporter="dynamo"), dict(name="bert", strip_value_info=True),
                                dict(name="vit", opset=17)],
                         ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_qdq_of_zoo_exports_lowers_to_integer_kernels(kw, tmp_path):
    path = zoo.build(**kw)
    qdq = _qdq(path, kw["name"], tmp_path)
    counts = op_counts(qdq)
    n_mha, n_mm = counts[MHA], _quantized_matmuls(qdq)
    assert n_mha == 2 and n_mm >= 6
    out = assert_rewrite("lower_int8", qdq, padded_feeds(kw["name"], path), rtol=2e-4, expect_fired=True,
                         expect_ops={QATT: n_mha, MHA: 0, MMITF: n_mm - n_mha, "MatMul": counts["MatMul"] - n_mm})
    # Every bias Add of a lowered MatMul, and every BiasGelu's bias, went into its kernel.
    assert op_counts(out)["Add"] < counts["Add"]
    assert op_counts(out)["com.microsoft.BiasGelu"] == 0
    assert op_counts(out)["com.microsoft.Gelu"] == counts["com.microsoft.BiasGelu"] + counts["com.microsoft.Gelu"]
    # The attributes carry over.
    attrs = lambda m, op: [{a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
                           for n in m.graph.node if n.op_type == op]
    assert attrs(qdq, "MultiHeadAttention") == attrs(out, "QAttention")


def test_gpt2_gemm_projections_stay_qdq_with_a_reason(tmp_path):
    """GPT-2's Conv1D exports as Reshape -> Gemm -> Reshape: onnxruntime's QDQ fusion makes those
    QGemm with their bias already, so lower_int8 leaves them, and its attention block, as they are."""
    path = zoo.build("gpt2", opset=14)
    calib = [zoo.sample_feeds("gpt2", path, seed=s) for s in range(8)]
    result = onnxopt.compile(path, opt_level=3, int8=True, calibration_data=calib, int8_min_cosine=0.0)
    ops = result.report["ops_after"]
    assert ops[MHA] == 2 and ops["Gemm"] == 8 and MMITF not in ops and QATT not in ops
    assert declined(result.report, "lower_int8") == ["the Split's input is not an integer projection (MatMulIntegerToFloat)"] * 2


def test_int8_lowers_on_cpu_only():
    path = zoo.build("bert", size="tiny")
    calib = [zoo.sample_feeds("bert", path, seed=s) for s in range(8)]
    cpu = onnxopt.compile(path, opt_level=3, int8=True, calibration_data=calib, int8_min_cosine=0.0)
    assert cpu.report["ops_after"][QATT] == 2 and "MatMul" not in cpu.report["ops_after"]
    rec = next(p for p in cpu.report["passes"] if p["name"] == "lower_int8")
    assert rec["fired"] == 6 + 2 + 2 and not rec["declined"]  # 8 MatMuls, then 2 attention blocks
    assert next(p for p in cpu.report["passes"] if p["name"] == "quantize_int8")["details"]["fidelity"]["ok"]
    # At -O2 the attention's score and context MatMuls stay float: not candidates, nothing declined.
    o2 = onnxopt.compile(path, opt_level=2, int8=True, calibration_data=calib, int8_min_cosine=0.0)
    rec = next(p for p in o2.report["passes"] if p["name"] == "lower_int8")
    assert o2.report["ops_after"]["MatMul"] == 4 and o2.report["ops_after"][MMITF] == 8 and not rec["declined"]
    # The GPU targets keep the QDQ form for their own fusions.
    cuda = onnxopt.compile(path, opt_level=3, int8=True, calibration_data=calib, int8_min_cosine=0.0, target="cuda")
    assert MMITF not in cuda.report["ops_after"] and "lower_int8" not in [p["name"] for p in cuda.report["passes"]]


# ---- the references against onnxruntime's kernels -----------------------------------------------


def _run(node: onnx.NodeProto, feeds: dict, inits: list, shape: list) -> np.ndarray:
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint8): TensorProto.UINT8,
             np.dtype(np.int8): TensorProto.INT8, np.dtype(np.int32): TensorProto.INT32}
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(k, types[v.dtype], v.shape) for k, v in feeds.items()],
                              [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return run_ort(model, feeds)[node.output[0]]


def test_catalogue_names_these_references():
    assert catalogue.reference("MatMulIntegerToFloat") is KQ.matmul_integer_to_float
    assert catalogue.reference("QAttention") is KA.qattention


@pytest.mark.parametrize("a_type, per_column, bias", [(np.uint8, True, True), (np.uint8, False, False), (np.int8, True, True)])
def test_matmul_integer_to_float_reference_matches_onnxruntime(a_type, per_column, bias):
    info = np.iinfo(a_type)
    a = RNG.integers(info.min, info.max + 1, (2, 5, 16)).astype(a_type)
    w = RNG.integers(-127, 128, (16, 12)).astype(np.int8)
    sa, za = np.float32(0.02), np.array(7 if a_type == np.uint8 else -3, a_type)
    sw = (RNG.random(12).astype(np.float32) + 0.5) * 0.01 if per_column else np.float32(0.01)
    zw = np.zeros(np.shape(sw), np.int8)
    b = RNG.standard_normal(12).astype(np.float32)
    names = ["a", "w", "sa", "sw", "za", "zw"] + (["b"] if bias else [])
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names[1:], [w, sa, sw, za, zw, b])]
    got = _run(helper.make_node("MatMulIntegerToFloat", names, ["y"], domain="com.microsoft"), {"a": a}, inits, [2, 5, 12])
    ref = KQ.matmul_integer_to_float(a, w, sa, sw, za, zw, b if bias else None)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("masked, unidirectional", [(True, 0), (False, 1)])
def test_qattention_reference_matches_onnxruntime(masked, unidirectional):
    b, s, hid, heads = 2, 5, 8, 2
    x = RNG.integers(0, 256, (b, s, hid)).astype(np.uint8)
    w = RNG.integers(-127, 128, (hid, 3 * hid)).astype(np.int8)
    bias = RNG.standard_normal(3 * hid).astype(np.float32)
    sx, zx = np.float32(0.01), np.uint8(120)
    sw, zw = (RNG.random(3 * hid).astype(np.float32) + 0.5) * 0.01, np.zeros(3 * hid, np.int8)
    mask = np.ones((b, s), np.int32)
    mask[1, -2:] = 0
    feeds = {"x": x, **({"mask": mask} if masked else {})}
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in
             [("w", w), ("bias", bias), ("sx", sx), ("sw", sw), ("zx", zx), ("zw", zw)]]
    node = helper.make_node("QAttention", ["x", "w", "bias", "sx", "sw", "mask" if masked else "", "zx", "zw"], ["y"],
                            domain="com.microsoft", num_heads=heads, unidirectional=unidirectional)
    got = _run(node, feeds, inits, [b, s, hid])
    ref = KA.qattention(x, w, bias, sx, sw, mask if masked else None, zx, zw, num_heads=heads, unidirectional=unidirectional)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


# ---- hand-written QDQ graphs --------------------------------------------------------------------

K, N = 8, 6


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _matmul_model(*, a_type=np.uint8, w_type=np.int8, per_column=True, zero_points=True, bias="right",
                  second_use=False, a_axis=None, w_axis=1, block=False, weight_input=False) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(., DQ(W)) [-> Add(bias)] -> y."""
    ta = TensorProto.UINT8 if a_type == np.uint8 else TensorProto.INT8
    wi = np.iinfo(w_type)
    codes = RNG.integers(max(wi.min, -127), min(wi.max, 127) + 1, (K, N)).astype(w_type)
    scale_w = (RNG.random(N).astype(np.float32) + 0.5) * 0.05 if per_column else np.float32(0.05)
    a_scale = np.full(K, 0.02, np.float32) if a_axis is not None else np.float32(0.02)
    a_zp = np.full(np.shape(a_scale), 5 if a_type == np.uint8 else 0, a_type)
    inits = [_init("sx", a_scale), _init("sw", scale_w), _init("b", RNG.standard_normal(N).astype(np.float32)),
             _init("b2", RNG.standard_normal((1, N)).astype(np.float32))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("wq", TensorProto.INT8, [K, N]))
    inits.append(_init("wq", codes))
    zp_names = ["zx", "zw"] if zero_points else ["", ""]
    if zero_points:
        inits += [_init("zx", a_zp), _init("zw", np.zeros(np.shape(scale_w), w_type))]
    qa = {"axis": a_axis} if a_axis is not None else {}
    qw = {"axis": w_axis} if per_column else {}
    if block:
        qw = {"axis": 0, "block_size": 4}
        inits[1] = _init("sw", np.full((K // 4, N), 0.05, np.float32))
        if zero_points:
            inits[-1] = _init("zw", np.zeros((K // 4, N), w_type))
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", zp_names[0] or "zx_q"], ["xq"], **qa),
             helper.make_node("DequantizeLinear", ["xq", "sx", zp_names[0]], ["xd"], **qa),
             helper.make_node("DequantizeLinear", ["wq", "sw", zp_names[1]], ["wd"], **qw),
             helper.make_node("MatMul", ["xd", "wd"], ["m"])]
    if not zero_points:
        inits.append(_init("zx_q", np.zeros((), a_type)))
    outputs = []
    if bias == "none":
        nodes[-1].output[0] = "y"
    else:
        if bias == "biasgelu":
            nodes.append(helper.make_node("BiasGelu", ["m", "b"], ["y"], domain="com.microsoft"))
        else:
            add_in = {"right": ["m", "b"], "left": ["b", "m"], "2d": ["m", "b2"]}[bias]
            nodes.append(helper.make_node("Add", add_in, ["y"]))
    if second_use:
        nodes.append(helper.make_node("Relu", ["m"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3, N]))
    outputs.insert(0, helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, N]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21 if block else 17),
                                                    *([helper.make_opsetid("com.microsoft", 1)] if bias == "biasgelu" else [])])
    onnx.checker.check_model(model)
    return model


def _x():
    return {"x": RNG.standard_normal((2, 3, K)).astype(np.float32)}


@pytest.mark.parametrize("kw, expect", [
    (dict(), {MMITF: 1, "Add": 0}),
    (dict(per_column=False, zero_points=False), {MMITF: 1, "Add": 0}),
    (dict(bias="left"), {MMITF: 1, "Add": 0}),
    (dict(bias="none"), {MMITF: 1, "Add": 0}),
    (dict(a_type=np.int8), {MMITF: 1, "Add": 0}),
    (dict(a_type=np.uint8, w_type=np.uint8), {MMITF: 1, "Add": 0}),
    # A bias of another shape, or a MatMul output used twice, keeps its Add.
    # BiasGelu's bias moves into the kernel, the GELU stays (com.microsoft Gelu, the same erf GELU).
    (dict(bias="biasgelu"), {MMITF: 1, "Add": 0, "com.microsoft.BiasGelu": 0, "com.microsoft.Gelu": 1}),
    (dict(bias="2d"), {MMITF: 1, "Add": 1}),
    (dict(second_use=True), {MMITF: 1, "Add": 1}),
], ids=["per-column", "per-tensor-no-zp", "bias-left", "no-bias", "s8xs8", "u8xu8", "biasgelu", "bias-2d", "two-uses"])
def test_hand_written_matmuls_lower(kw, expect):
    out = assert_rewrite("lower_int8", _matmul_model(**kw), _x(), expect_ops={**expect, "MatMul": 0}, expect_fired=True)
    fused = next(n for n in out.graph.node if n.op_type == "MatMulIntegerToFloat")
    assert len(fused.input) == (7 if expect["Add"] == 0 and kw.get("bias", "right") != "none" else
                                6 if kw.get("zero_points", True) else 4)


@pytest.mark.parametrize("kw, reason", [
    (dict(a_axis=2), "the activation is quantized per axis"),
    (dict(w_axis=0, per_column=True), "not quantized per tensor or per column"),
    (dict(block=True), "block-wise"),
    (dict(a_type=np.int8, w_type=np.uint8), "onnxruntime's CPU kernel takes"),
    (dict(weight_input=True), "the weight's codes are not a constant 2-D matrix"),
], ids=["activation-per-axis", "weight-per-row", "block-wise", "s8xu8", "weight-overridable"])
def test_matmul_preconditions_decline(kw, reason):
    model = _matmul_model(**kw)
    if kw.get("w_axis") == 0:  # per row: the scale has K entries
        model.graph.initializer[1].CopyFrom(_init("sw", np.full(K, 0.05, np.float32)))
        model.graph.initializer[-1].CopyFrom(_init("zw", np.zeros(K, np.int8)))
    result = onnxopt.compile(model, opt_level=0, enable=["lower_int8"], verify_outputs=False)
    assert op_counts(result.model)[MMITF] == 0
    assert any(reason in r for r in declined(result.report, "lower_int8")), declined(result.report, "lower_int8")


def test_matmul_of_a_float_weight_declines():
    model = _matmul_model()
    model.graph.node[2].CopyFrom(helper.make_node("Identity", ["wf"], ["wd"]))
    model.graph.initializer.append(_init("wf", RNG.standard_normal((K, N)).astype(np.float32)))
    result = onnxopt.compile(model, opt_level=0, enable=["lower_int8"], verify_outputs=False)
    assert any("the weight does not come from DequantizeLinear" in r for r in declined(result.report, "lower_int8"))


HID, HEADS = 8, 2


def _attention_model(*, sizes=(HID, HID, HID), axis=2, proj_bias=True, mha_bias=False, mask="int32",
                     extra_use=False, a_type=np.uint8, attrs=None) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(., DQ(W_qkv)) [+ b] -> Split -> MultiHeadAttention(q, k, v[, bias], mask) -> y."""
    width = sum(sizes)
    ta = TensorProto.UINT8 if a_type == np.uint8 else TensorProto.INT8
    inits = [_init("sx", np.float32(0.02)), _init("zx", np.array(3 if a_type == np.uint8 else 0, a_type)),
             _init("wq", RNG.integers(-127, 128, (HID, width)).astype(np.int8)),
             _init("sw", (RNG.random(width).astype(np.float32) + 0.5) * 0.05), _init("zw", np.zeros(width, np.int8)),
             _init("b", RNG.standard_normal(width).astype(np.float32)), _init("sizes", np.array(sizes, np.int64))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["m"])]
    packed = "m"
    if proj_bias:
        nodes.append(helper.make_node("Add", ["m", "b"], ["mb"]))
        packed = "mb"
    nodes.append(helper.make_node("Split", [packed, "sizes"], ["q", "k", "v"], axis=axis))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, HID])]
    mha_in = ["q", "k", "v", "b" if mha_bias else "", ""]
    if mask:
        mtype = {"int32": TensorProto.INT32, "3d": TensorProto.INT32}[mask]
        inputs.append(helper.make_tensor_value_info("mask", mtype, [2, 5] if mask == "int32" else [2, 5, 5]))
        mha_in[4] = "mask"
    while mha_in and not mha_in[-1]:
        mha_in.pop()
    nodes.append(helper.make_node("MultiHeadAttention", mha_in, ["y"], domain="com.microsoft", num_heads=HEADS,
                                  **(attrs or {})))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, sizes[2]])]
    if extra_use:
        nodes.append(helper.make_node("Relu", ["v"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 5, sizes[2]]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _attention_feeds(model):
    feeds = {"x": RNG.standard_normal((2, 5, HID)).astype(np.float32)}
    if any(i.name == "mask" for i in model.graph.input):
        m = np.ones((2, 5), np.int32)
        m[1, -2:] = 0
        feeds["mask"] = m
    return feeds


@pytest.mark.parametrize("kw", [dict(), dict(mask=None), dict(proj_bias=False, mha_bias=True),
                                dict(proj_bias=False), dict(attrs={"unidirectional": 1, "scale": 0.25})],
                         ids=["bias-mask", "no-mask", "mha-bias", "no-bias", "causal-scale"])
def test_hand_written_attention_lowers_to_qattention(kw):
    model = _attention_model(**kw)
    out = assert_rewrite("lower_int8", model, _attention_feeds(model), expect_fired=True,
                         expect_ops={QATT: 1, MHA: 0, MMITF: 0, "Split": 0, "MatMul": 0, "Add": 0})
    node = next(n for n in out.graph.node if n.op_type == "QAttention")
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"num_heads": HEADS, **kw.get("attrs", {})}


@pytest.mark.parametrize("kw, reason", [
    (dict(sizes=(8, 8, 4)), "are not three equal thirds"),
    (dict(extra_use=True), "a Split output has another consumer"),
    (dict(mha_bias=True), "both the projection and MultiHeadAttention add a bias"),
    (dict(a_type=np.int8), "input codes are not u8"),
    (dict(mask="3d"), "the mask is not a 2-D int32"),
    (dict(attrs={"do_rotary": 1}), "attribute 'do_rotary' has no QAttention counterpart"),
], ids=["unequal", "split-shared", "two-biases", "s8-input", "3d-mask", "extra-attribute"])
def test_attention_preconditions_decline(kw, reason):
    """The MatMul still lowers; the attention block stays MatMulIntegerToFloat + Split + MultiHeadAttention."""
    result = onnxopt.compile(_attention_model(**kw), opt_level=0, enable=["lower_int8"], verify_outputs=False)
    counts = op_counts(result.model)
    assert counts[QATT] == 0 and counts[MMITF] == 1 and counts[MHA] == 1
    assert any(reason in r for r in declined(result.report, "lower_int8")), declined(result.report, "lower_int8")


def test_split_not_on_the_last_axis_declines():
    model = _attention_model(axis=1)
    result = onnxopt.compile(model, opt_level=0, enable=["lower_int8"], verify_outputs=False)
    assert any("not the last" in r for r in declined(result.report, "lower_int8"))


def _values(a) -> str:
    return "{" + ", ".join(repr(float(v)) for v in np.asarray(a, np.float32).ravel()) + "}"


def _ints(a) -> str:
    return "{" + ", ".join(str(int(v)) for v in np.asarray(a).ravel()) + "}"


def test_rewrites_to_expected_graph():
    """Before/Expected: a quantized FFN MatMul with its bias, and a quantized packed projection
    with its bias, Split and MultiHeadAttention (2 heads of 4)."""

    rng = np.random.default_rng(1)
    w1, w2 = rng.integers(-127, 128, (8, 24)), rng.integers(-127, 128, (8, 8))
    s1, s2 = rng.random(24) * 0.05 + 0.01, rng.random(8) * 0.05 + 0.01
    b1, b2 = rng.standard_normal(24), rng.standard_normal(8)
    head = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>\nagraph (float[1, 4, 8] x, int32[1, 4] mask) => (float[1, 4, 8] y)'
    inits = (f"float sx = {{0.02}}, uint8 zx = {{3}}, int8[8, 24] w1 = {_ints(w1)}, float[24] s1 = {_values(s1)}, "
             f"int8[24] z1 = {_ints(np.zeros(24))}, float[24] b1 = {_values(b1)}, int64[3] sizes = {{8, 8, 8}}, "
             f"float sa = {{0.05}}, uint8 za = {{128}}, int8[8, 8] w2 = {_ints(w2)}, float[8] s2 = {_values(s2)}, "
             f"int8[8] z2 = {_ints(np.zeros(8))}, float[8] b2 = {_values(b2)}")
    before = f"""{head} <{inits}> {{
    xq = QuantizeLinear(x, sx, zx)
    xd = DequantizeLinear(xq, sx, zx)
    wd1 = DequantizeLinear <axis = 1> (w1, s1, z1)
    p0 = MatMul(xd, wd1)
    p1 = Add(p0, b1)
    q, k, v = Split <axis = 2> (p1, sizes)
    a = com.microsoft.MultiHeadAttention <num_heads = 2> (q, k, v, , mask)
    aq = QuantizeLinear(a, sa, za)
    ad = DequantizeLinear(aq, sa, za)
    wd2 = DequantizeLinear <axis = 1> (w2, s2, z2)
    o0 = MatMul(ad, wd2)
    y = Add(b2, o0)
}}"""
    expected = f"""{head} <{inits.replace(", int64[3] sizes = {8, 8, 8}", "")}> {{
    xq = QuantizeLinear(x, sx, zx)
    a = com.microsoft.QAttention <num_heads = 2> (xq, w1, b1, sx, s1, mask, zx, z1)
    aq = QuantizeLinear(a, sa, za)
    y = com.microsoft.MatMulIntegerToFloat(aq, w2, sa, s2, za, z2, b2)
}}"""
    assert_rewrites_to("lower_int8", before, expected)
