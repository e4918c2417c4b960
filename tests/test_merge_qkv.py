"""Merged Q/K/V projections (-O2, every target): zoo exports and hand-written graphs through the
oracle; every precondition has a graph where it fails and the candidate is declined with a reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import assert_rewrite, op_counts

import onnxopt
from onnxopt.bench import zoo
from onnxopt.passes.merge_qkv import MergeQKVPass

K = 8


def _graph(projections, *, opset=14, extra_inputs=(), outputs=None, x_shape=("batch", "seq", K)):
    """x -> one MatMul (+ bias Add) per projection; each result is a graph output.

    A projection is a dict: weight (array, or a graph-input name), bias (array or None),
    x_right (True: MatMul(weight, x)).
    """
    rng = np.random.default_rng(0)
    inits, nodes, outs = [], [], []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    inputs += list(extra_inputs)
    for i, p in enumerate(projections):
        weight = p["weight"]
        if isinstance(weight, str):
            w_name = weight
        else:
            w_name = f"w{i}"
            inits.append(numpy_helper.from_array(weight, w_name))
        mm_inputs = [w_name, "x"] if p.get("x_right") else ["x", w_name]
        y = f"mm{i}"
        nodes.append(helper.make_node("MatMul", mm_inputs, [y], name=f"MatMul_{i}"))
        if p.get("bias") is not None:
            inits.append(numpy_helper.from_array(p["bias"], f"b{i}"))
            nodes.append(helper.make_node("Add", [y, f"b{i}"], [f"y{i}"], name=f"Add_{i}"))
            y = f"y{i}"
        # A Relu keeps each projection's result internal (as in a real model).
        nodes.append(helper.make_node("Relu", [y], [f"out{i}"]))
        rank = len(x_shape) - (1 if not isinstance(weight, str) and weight.ndim == 1 else 0)
        outs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [f"d{i}_{j}" for j in range(rank)]))
    graph = helper.make_graph(nodes, "g", inputs, outputs or outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    del rng
    return model


def _w(rows, cols, seed):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def _b(n, seed):
    return np.random.default_rng(100 + seed).standard_normal(n).astype(np.float32)


def _feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value or {"batch": 2, "seq": 3}[d.dim_param] for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _declined(model) -> list[str]:
    report = onnxopt.compile(model, opt_level=2, verify_outputs=False).report
    return [d["reason"] for d in next(p for p in report["passes"] if p["name"] == "merge_qkv")["declined"]]


@pytest.mark.parametrize(
    "kw",
    [dict(name="bert", opset=13), dict(name="bert", opset=14, attention="sdpa"), dict(name="bert", exporter="dynamo"),
     dict(name="vit", opset=14), dict(name="minilm", opset=14)],
    ids=["bert-13", "bert-14-sdpa", "bert-dynamo", "vit-14", "minilm-14"],
)
def test_zoo_projections_merge(kw):
    path = zoo.build(**kw)
    model = onnx.load(str(path))
    layers = 6 if kw["name"] == "minilm" else 2
    before = op_counts(model)["MatMul"]
    compiled = assert_rewrite(2, model, zoo.sample_feeds(kw["name"], path),
                              expect_ops={"MatMul": before - 2 * layers, "Split": layers})
    assert not [op for op in op_counts(compiled) if op.startswith("com.microsoft.")]
    assert_rewrite("merge_qkv", model, zoo.sample_feeds(kw["name"], path), expect_fired=True)


def test_three_projections_with_biases():
    model = _graph([dict(weight=_w(K, 6, i), bias=_b(6, i)) for i in range(3)])
    compiled = assert_rewrite("merge_qkv", model, _feeds(model), expect_ops={"MatMul": 1, "Add": 1, "Split": 1},
                              expect_fired=True)
    (split,) = [n for n in compiled.graph.node if n.op_type == "Split"]
    sizes = next(i for i in compiled.graph.initializer if i.name == split.input[1])
    assert numpy_helper.to_array(sizes).tolist() == [6, 6, 6]
    names = {i.name for i in compiled.graph.initializer}
    assert {"w0.qkv", "b0.qkv"} <= names


def test_missing_bias_becomes_zeros_and_no_bias_means_no_add():
    mixed = _graph([dict(weight=_w(K, 4, 0), bias=None), dict(weight=_w(K, 5, 1), bias=_b(5, 1))])
    compiled = assert_rewrite("merge_qkv", mixed, _feeds(mixed), expect_ops={"MatMul": 1, "Add": 1, "Split": 1})
    add = next(n for n in compiled.graph.node if n.op_type == "Add")
    bias = numpy_helper.to_array(next(i for i in compiled.graph.initializer if i.name in add.input))
    np.testing.assert_array_equal(bias[:4], 0)
    np.testing.assert_array_equal(bias[4:], _b(5, 1))
    plain = _graph([dict(weight=_w(K, 4, 0)), dict(weight=_w(K, 4, 1))])
    assert_rewrite("merge_qkv", plain, _feeds(plain), expect_ops={"MatMul": 1, "Add": 0, "Split": 1})


def test_split_sizes_are_an_attribute_before_opset_13():
    model = _graph([dict(weight=_w(K, 4, i), bias=_b(4, i)) for i in range(3)], opset=12)
    compiled = assert_rewrite("merge_qkv", model, _feeds(model), expect_ops={"MatMul": 1, "Split": 1})
    (split,) = [n for n in compiled.graph.node if n.op_type == "Split"]
    assert len(split.input) == 1
    assert helper.get_attribute_value(next(a for a in split.attribute if a.name == "split")) == [4, 4, 4]


def test_projection_result_that_is_a_graph_output_keeps_its_name():
    projections = [dict(weight=_w(K, 4, i), bias=_b(4, i)) for i in range(2)]
    model = _graph(projections)
    model.graph.output.append(helper.make_tensor_value_info("y0", TensorProto.FLOAT, ["batch", "seq", 4]))
    assert_rewrite("merge_qkv", model, _feeds(model), expect_ops={"MatMul": 1, "Split": 1}, expect_fired=True)


def test_weight_graph_input_is_declined():
    w_in = helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [K, 4])
    model = _graph([dict(weight=_w(K, 4, 0)), dict(weight="w_in")], extra_inputs=[w_in])
    assert_rewrite("merge_qkv", model, _feeds(model), expect_ops={"MatMul": 2}, expect_fired=False)
    assert any("'w_in' is a graph input" in r for r in _declined(model))


def test_initializer_that_is_also_an_input_is_declined():
    model = _graph([dict(weight=_w(K, 4, 0)), dict(weight=_w(K, 4, 1))])
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [K, 4]))
    model.ir_version = 8
    assert_rewrite("merge_qkv", model, _feeds(model) | {"w1": _w(K, 4, 1)}, expect_ops={"MatMul": 2}, expect_fired=False)
    assert any("'w1' is a graph input" in r for r in _declined(model))


def test_computed_weight_is_declined():
    w_in = helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [4, K])
    model = _graph([dict(weight=_w(K, 4, 0)), dict(weight="w_t")], extra_inputs=[w_in])
    model.graph.node.insert(0, helper.make_node("Transpose", ["w_in"], ["w_t"], perm=[1, 0]))
    assert_rewrite("merge_qkv", model, _feeds(model), expect_ops={"MatMul": 2}, expect_fired=False)
    assert any("'w_t' is not a constant" in r for r in _declined(model))


def test_batched_and_vector_weights_are_declined():
    batched = np.random.default_rng(3).standard_normal((2, K, 4)).astype(np.float32)
    model = _graph([dict(weight=_w(K, 4, 0)), dict(weight=batched)], x_shape=(2, 3, K))
    assert_rewrite("merge_qkv", model, _feeds(model), expect_ops={"MatMul": 2}, expect_fired=False)
    assert any("is 3-D, not 2-D" in r for r in _declined(model))
    vector = np.random.default_rng(4).standard_normal(K).astype(np.float32)
    model = _graph([dict(weight=_w(K, 4, 0)), dict(weight=vector)])
    assert_rewrite("merge_qkv", model, _feeds(model), expect_ops={"MatMul": 2}, expect_fired=False)
    assert any("is 1-D, not 2-D" in r for r in _declined(model))


def test_shared_value_as_right_operand_is_declined_and_the_others_merge():
    square = (K, K)
    model = _graph(
        [dict(weight=_w(K, 4, 0)), dict(weight=_w(K, 4, 1)), dict(weight=_w(*square, 2), x_right=True)],
        x_shape=square,
    )
    assert_rewrite("merge_qkv", model, _feeds(model), expect_ops={"MatMul": 2, "Split": 1}, expect_fired=True)
    assert any("right operand" in r for r in _declined(model))


def test_different_k_is_declined():
    # Not a runnable model (x cannot have two last dims): the pass is applied to the IR directly.
    model = _graph([dict(weight=_w(K, 4, 0)), dict(weight=_w(K, 4, 1)), dict(weight=_w(K + 2, 4, 2))])
    ir_model = ir.serde.deserialize_model(model)
    p = MergeQKVPass()
    result = p(ir_model)
    assert result.modified and p.fired == 1
    assert [d.reason for d in p.declined] == ["weight K=10 (float32) differs from the other projections' K=8 (float32)"]
    assert sum(1 for n in ir_model.graph if n.op_type == "MatMul") == 2


def test_single_projection_is_left_alone():
    model = _graph([dict(weight=_w(K, 4, 0), bias=_b(4, 0))])
    assert_rewrite("merge_qkv", model, _feeds(model), expect_ops={"MatMul": 1, "Split": 0}, expect_fired=False)
