"""What real models from old exporters need (issue 11): IR < 4 initializer rules and rewrites in
the form of the model's opset."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.passes import opset_forms
from oracle import assert_rewrite, op_counts


def _ir3_model() -> onnx.ModelProto:
    """An IR-v3 export (PyTorch 0.4 era): weights are initializers *and* graph inputs; the
    Reshape target is a Constant node, which -O1 folds into a new initializer."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([-1, 2], np.int64))),
             helper.make_node("Reshape", ["h", "s"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_ir3_model_keeps_its_rule_by_moving_to_ir4(tmp_path):
    result = onnxopt.compile(_ir3_model(), opt_level=2)
    assert result.report["verification"]["ok"]
    upgrade = result.report["ir_version_upgrade"]
    assert upgrade["from"] == 3 and upgrade["to"] == 4 and "graph input" in upgrade["reason"]
    out = result.save(tmp_path / "o.onnx")
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    assert saved.ir_version == 4
    assert [i.name for i in saved.graph.input] == ["x", "w"]  # the interface is unchanged


def test_ir3_model_without_new_initializers_stays_ir3():
    model = _ir3_model()
    result = onnxopt.compile(model, opt_level=0)
    assert result.report["ir_version_upgrade"] is None and result.model.ir_version == 3


def _seq_model(opset: int, node: onnx.NodeProto, extra_nodes=(), out_shape=(2, 2, 3)) -> onnx.ModelProto:
    graph = helper.make_graph(
        [*extra_nodes, node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_concat_from_sequence_at_opset11_folds_to_attribute_unsqueeze():
    """onnxscript's folder writes ConcatFromSequence(new_axis=1) as Unsqueeze(x, axes) + Concat:
    the opset-13 form; at opset 11 the axes must be an attribute."""
    seq = helper.make_node("SequenceConstruct", ["x", "z"], ["s"])
    model = _seq_model(11, helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=1, new_axis=1), [seq])
    compiled = assert_rewrite("fold_constants", model, expect_ops={"Unsqueeze": 2, "Concat": 1},
                              absent_ops=("ConcatFromSequence",))
    for node in compiled.graph.node:
        if node.op_type == "Unsqueeze":
            assert len(node.input) == 1 and [a.name for a in node.attribute] == ["axes"]


def test_split_to_sequence_at_opset11_folds_to_attribute_split():
    split = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([1, 2], np.int64)))
    to_seq = helper.make_node("SplitToSequence", ["x", "k"], ["s"], axis=1)
    at = helper.make_node("SequenceAt", ["s", "i"], ["y"])
    one = helper.make_node("Constant", [], ["i"], value=numpy_helper.from_array(np.array(1, np.int64)))
    model = _seq_model(11, at, [split, to_seq, one], out_shape=(2, 2))
    compiled = assert_rewrite(1, model, absent_ops=("SplitToSequence",))
    splits = [n for n in compiled.graph.node if n.op_type == "Split"]
    assert splits and all(len(n.input) == 1 and any(a.name == "split" for a in n.attribute) for n in splits)


def test_split_to_sequence_with_dynamic_sizes_is_not_rewritten_before_opset13():
    """Split before opset 13 cannot take run-time sizes: the rewrite must decline."""
    graph = helper.make_graph(
        [helper.make_node("SplitToSequence", ["x", "k"], ["s"], axis=1),
         helper.make_node("SequenceLength", ["s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
    feeds = {"x": np.ones((2, 3), np.float32), "k": np.array([1, 2], np.int64)}
    compiled = assert_rewrite(3, model, feeds, absent_ops=("Split",))
    assert op_counts(compiled)["SplitToSequence"] == 1


# Each op written in its newest form at an opset that still has the older one; legalize must give
# a model the checker accepts and onnxruntime runs to the same result as the newest form.
NEW_FORMS = [
    ("Unsqueeze", 11, [("axes", np.array([0], np.int64))], {}),
    ("Squeeze", 11, [("axes", np.array([0], np.int64))], {}),
    ("Split", 11, [("split", np.array([1, 2], np.int64))], {"axis": 1}),
    ("ReduceSum", 11, [("axes", np.array([1], np.int64))], {}),
    ("ReduceMean", 13, [("axes", np.array([1], np.int64))], {}),
    ("ReduceMax", 17, [("axes", np.array([-1], np.int64))], {}),
    ("Slice", 9, [("starts", np.array([0], np.int64)), ("ends", np.array([2], np.int64)),
                  ("axes", np.array([1], np.int64))], {}),
    ("Pad", 10, [("pads", np.array([0, 1, 0, 1], np.int64)), ("value", np.array(0.5, np.float32))], {}),
    ("Clip", 10, [("min", np.array(-0.5, np.float32)), ("max", np.array(0.5, np.float32))], {}),
]


@pytest.mark.parametrize("op, opset, consts, attrs", NEW_FORMS, ids=[f"{c[0]}-opset{c[1]}" for c in NEW_FORMS])
def test_legalize_writes_the_opsets_form(op, opset, consts, attrs):
    shape = [1, 3] if op == "Squeeze" else [2, 3]
    outputs = ["y", "y2"] if op == "Split" else ["y"]
    inits = [numpy_helper.from_array(a, name) for name, a in consts]
    node = helper.make_node(op, ["x", *[n for n, _ in consts]], outputs, **attrs)
    def model(at: int, out_vi) -> onnx.ModelProto:
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  out_vi, inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", at)], ir_version=8)

    untyped = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    out_vi = list(onnx.shape_inference.infer_shapes(model(18, untyped)).graph.output)
    newest = model(18, out_vi)
    onnx.checker.check_model(newest, full_check=True)
    old = ir.serde.deserialize_model(model(opset, out_vi))  # invalid as it stands
    assert opset_forms.legalize(old) == 1
    fixed = ir.serde.serialize_model(old)
    onnx.checker.check_model(fixed, full_check=True)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})  # noqa: E731
    for got, want in zip(run(fixed), run(newest)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
