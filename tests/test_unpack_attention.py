"""unpack_attention (with --int8): com.microsoft Attention becomes MatMul + Add + Split +
MultiHeadAttention, exactly, so that the projection is quantized. Through the oracle on real zoo
exports compiled with -O3 first (padded batches, causal GPT-2), on hand-written Attention nodes for
the forms the exporters do not make (unequal qkv_hidden_sizes, no bias, no mask, opset 12's Split),
and a negative test for each precondition."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.bench import zoo
from oracle import assert_rewrite, declined, op_counts, padded_feeds

ATT = "com.microsoft.Attention"
MHA = "com.microsoft.MultiHeadAttention"
B, S, HID, HEADS = 2, 5, 16, 2


@pytest.mark.parametrize("kw", [dict(name="bert", opset=14), dict(name="bert", opset=17, attention="sdpa"),
                                dict(name="bert", exporter="dynamo"), dict(name="gpt2", opset=14)],
                         ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_o3_attention_of_zoo_exports_unpacks_exactly(kw, tmp_path):
    path = zoo.build(**kw)
    packed = onnx.load(str(onnxopt.compile(path, opt_level=3).save(tmp_path / "o3.onnx")))
    n = op_counts(packed)[ATT]
    assert n == 2
    out = assert_rewrite("unpack_attention", packed, padded_feeds(kw["name"], path), expect_ops={ATT: 0, MHA: n},
                         expect_fired=True)
    # The attributes carry over (GPT-2's causal mask is unidirectional=1).
    before = [{a.name: helper.get_attribute_value(a) for a in x.attribute} for x in packed.graph.node if x.op_type == "Attention"]
    after = [{a.name: helper.get_attribute_value(a) for a in x.attribute} for x in out.graph.node if x.op_type == "MultiHeadAttention"]
    assert before == after


def test_int8_of_an_o3_model_quantizes_the_projection_like_o3_int8_at_once(tmp_path):
    """A model compiled with -O3 first (Attention fused), then with --int8: the projection is
    quantized, as in one -O3 --int8 compile of the export."""
    path = zoo.build("bert", size="tiny")
    calib = [zoo.sample_feeds("bert", path, seed=s) for s in range(8)]
    packed = onnxopt.compile(path, opt_level=3).save(tmp_path / "o3.onnx")
    # The QDQ form (lower_int8, which would fold the projection back into QAttention, off).
    twice = onnxopt.compile(packed, opt_level=3, int8=True, calibration_data=calib, int8_min_cosine=0.0,
                            disable=["lower_int8"])
    once = onnxopt.compile(path, opt_level=3, int8=True, calibration_data=calib, int8_min_cosine=0.0,
                           disable=["lower_int8"])
    ops = twice.report["ops_after"]
    assert ATT not in ops and ops[MHA] == 2
    assert ops["QuantizeLinear"] == once.report["ops_after"]["QuantizeLinear"]
    qkv = [x for x in twice.ir_model.graph if x.op_type == "MatMul" and x.inputs[1].shape[1] == 3 * x.inputs[1].shape[0]]
    assert len(qkv) == 2 and all(x.inputs[1].producer().op_type == "DequantizeLinear" for x in qkv)
    assert not declined(twice.report, "quantize_int8")


def _attention(*, opset=14, bias=True, mask="2d", sizes=None, weight_input=False, past=False, attrs=None,
               bias_input=False) -> onnx.ModelProto:
    """One com.microsoft Attention over x [B, S, HID]; y = Attention(x) + 0 so the output is not the node's."""
    rng = np.random.default_rng(0)
    sizes = sizes or [HID, HID, HID]
    width = sum(sizes)
    inits = [numpy_helper.from_array((rng.standard_normal((HID, width)) * 0.4).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, HID])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [HID, width]))
    if bias_input:
        inits.pop()
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [width]))
    names = ["x", "W", "b" if bias else ""]
    if mask == "2d":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [B, S]))
        names.append("mask")
    elif mask == "3d":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [B, S, S]))
        names.append("mask")
    if past:
        names += [""] * (4 - len(names)) + ["past"]
        inputs.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, B, HEADS, 3, HID // HEADS]))
    while names[-1] == "":
        names.pop()
    attributes = {"num_heads": HEADS, **({"qkv_hidden_sizes": sizes} if sizes != [HID] * 3 else {}), **(attrs or {})}
    outputs = ["a", "present"] if past else ["a"]
    nodes = [helper.make_node("Attention", names, outputs, domain="com.microsoft", **attributes),
             helper.make_node("Add", ["a", "zero"], ["y"])]
    inits.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    graph = helper.make_graph(nodes, "attn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, sizes[2]])],
                              [i for i in inits if not (weight_input and i.name == "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    return model


def _feeds(model) -> dict:
    rng = np.random.default_rng(1)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == TensorProto.INT32:
            m = np.ones(dims, np.int32)
            m[1, ..., -2:] = 0
            feeds[i.name] = m
        else:
            feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.mark.parametrize("kw", [dict(), dict(opset=12), dict(bias=False), dict(mask=None), dict(sizes=[HID, HID, 8]),
                                dict(attrs={"scale": 0.3, "unidirectional": 1})],
                         ids=["plain", "opset12-split-attribute", "no-bias", "no-mask", "narrow-v", "scale-causal"])
def test_hand_written_attention_unpacks(kw):
    model = _attention(**kw)
    assert_rewrite("unpack_attention", model, _feeds(model), expect_ops={ATT: 0, MHA: 1, "MatMul": 1, "Split": 1},
                   expect_fired=True, rtol=1e-5)


@pytest.mark.parametrize("kw, reason", [
    (dict(past=True), "the node has a past state, an attention bias or more inputs"),
    (dict(weight_input=True), "weight 'W' is a graph input (overridable), nothing to quantize"),
    (dict(bias_input=True), "the packed bias is not a constant vector of the weight's width"),
    (dict(mask="3d"), "the mask is not a 2-D int32 [batch, kv length] mask"),
    (dict(attrs={"do_rotary": 1}), "attribute 'do_rotary' has no MultiHeadAttention counterpart here"),
    (dict(sizes=[HID, 8, HID]), "qkv_hidden_sizes"),
], ids=["past", "weight-input", "bias-input", "3d-mask", "rotary", "qk-widths"])
def test_declined_with_reason_and_left_to_int8_to_report(kw, reason):
    model = _attention(**kw)
    result = onnxopt.compile(model, opt_level=0, enable=["unpack_attention"], verify_outputs=False)
    assert op_counts(result.model)[ATT] == 1
    reasons = declined(result.report, "unpack_attention")
    assert len(reasons) == 1 and reasons[0].startswith(reason), reasons
