"""Attention fusion (-O3, cpu/cuda): real zoo exports fuse to com.microsoft Attention, through the
oracle (unpadded and padded batches); -O2 and standard-only targets get merged QKV instead; every
precondition has a hand-written block where it fails, the pass does not fire, the report carries
the reason and the merged-QKV fallback takes the projections."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.bench import zoo
from oracle import assert_rewrite, declined, op_counts, padded_feeds, run_ort

ATT = "com.microsoft.Attention"
MHA = "com.microsoft.MultiHeadAttention"

# (zoo.build kwargs, attention blocks, expected unidirectional)
ZOO = [
    (dict(name="bert", opset=13), 2, 0),
    (dict(name="bert", opset=14), 2, 0),
    (dict(name="bert", opset=17), 2, 0),
    (dict(name="bert", opset=13, attention="sdpa"), 2, 0),
    (dict(name="bert", opset=14, attention="sdpa"), 2, 0),
    (dict(name="bert", opset=17, attention="sdpa"), 2, 0),
    (dict(name="bert", exporter="dynamo"), 2, 0),
    (dict(name="bert", exporter="dynamo", attention="sdpa"), 2, 0),
    (dict(name="vit", opset=14), 2, None),
    (dict(name="vit", exporter="dynamo"), 2, None),
    (dict(name="gpt2", opset=14), 2, 1),
    (dict(name="gpt2", exporter="dynamo"), 2, 1),
    (dict(name="minilm", opset=14), 6, 0),
    (dict(name="minilm", opset=14, attention="sdpa"), 6, 0),
]


def _id(case) -> str:
    kw = case[0]
    return "-".join(str(kw[k]) for k in ("name", "exporter", "opset", "attention") if k in kw)


def _attention_nodes(proto: onnx.ModelProto):
    return [n for n in proto.graph.node if n.domain == "com.microsoft" and n.op_type in ("Attention", "MultiHeadAttention")]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("case", ZOO, ids=_id)
def test_zoo_exports_fuse_to_attention(case):
    kw, blocks, unidirectional = case
    path = zoo.build(**kw)
    model = onnx.load(str(path))
    compiled = assert_rewrite(
        3, model, zoo.sample_feeds(kw["name"], path), expect_ops={ATT: blocks, MHA: 0}, absent_ops=("Softmax",)
    )
    nodes = _attention_nodes(compiled)
    graph_inputs = {i.name for i in compiled.graph.input}
    for node in nodes:
        attrs = _attrs(node)
        head_size = 16 if kw["name"] != "minilm" else 32
        assert attrs["num_heads"] == (4 if kw["name"] != "minilm" else 12)
        assert math.isclose(attrs["scale"], 1 / math.sqrt(head_size), rel_tol=1e-6)
        if unidirectional is None:  # ViT: no mask at all
            assert len(node.input) <= 3 and "unidirectional" not in attrs
        else:
            assert attrs["unidirectional"] == unidirectional
            # mask_index is attention_mask cast to int32
            cast = next(n for n in compiled.graph.node if node.input[3] in n.output)
            assert cast.op_type == "Cast" and cast.input[0] == "attention_mask" and "attention_mask" in graph_inputs
    if "attention_mask" in graph_inputs:
        assert_rewrite(3, model, padded_feeds(kw["name"], path), expect_ops={ATT: blocks})


@pytest.mark.parametrize(
    "kw",
    [dict(name="bert", opset=14), dict(name="bert", opset=13, attention="sdpa"), dict(name="gpt2", opset=14),
     dict(name="vit", exporter="dynamo")],
    ids=["bert-14", "bert-13-sdpa", "gpt2-14", "vit-dynamo"],
)
def test_fuses_on_the_raw_export_without_other_passes(kw):
    # The pass alone at -O0: no cleanup, no LayerNorm/GELU fusion before it (Constant and Identity
    # nodes as the exporter left them).
    path = zoo.build(**kw)
    assert_rewrite("attention", onnx.load(str(path)), zoo.sample_feeds(kw["name"], path), expect_ops={ATT: 2},
                   expect_fired=True, enable=["attention", "attention_qkv"])


def test_stages_core_then_packed_projection():
    """Stage 1 alone leaves the projections outside a MultiHeadAttention; stage 2 packs them into
    Attention; with --int8 the second stage is not selected (the projection stays quantizable)."""
    from onnxopt.passes import registry

    model = _block()
    core_only = assert_rewrite("attention", model, _feeds(model), expect_ops={MHA: 1, ATT: 0, "MatMul": 4})
    assert_rewrite("attention_qkv", core_only, _feeds(model), expect_ops={ATT: 1, MHA: 0, "MatMul": 1})
    names = lambda flags: [i.name for i in registry.select(3, "cpu", flags=flags)]  # noqa: E731
    assert "attention_qkv" in names(set()) and "attention_qkv" not in names({"int8"})


def test_padding_matters_in_thepadded_feeds():
    # The padded-batch checks above are only meaningful if the mask changes the outputs.
    path = zoo.build("bert", opset=14)
    sess_feeds = padded_feeds("bert", path)
    padded = run_ort(onnx.load(str(path)), sess_feeds)["last_hidden_state"]
    sess_feeds["attention_mask"] = np.ones_like(sess_feeds["attention_mask"])
    full = run_ort(onnx.load(str(path)), sess_feeds)["last_hidden_state"]
    assert float(np.abs(padded[1] - full[1]).max()) > 1e-3 * float(np.abs(full).max())


@pytest.mark.parametrize(
    "kw",
    [dict(name="bert", opset=14), dict(name="bert", exporter="dynamo", attention="sdpa"), dict(name="gpt2", opset=14)],
    ids=["bert-legacy14", "bert-dynamo-sdpa", "gpt2-legacy14"],
)
@pytest.mark.parametrize("level,target", [(2, "cpu"), (3, "tensorrt"), (3, "generic")])
def test_no_contrib_ops_below_o3_or_off_onnxruntime(kw, level, target):
    path = zoo.build(**kw)
    compiled = assert_rewrite(level, onnx.load(str(path)), zoo.sample_feeds(kw["name"], path), target=target)
    counts = op_counts(compiled)
    assert not [op for op in counts if op.startswith("com.microsoft.")], counts
    assert counts["Softmax"] == 2
    if kw["name"] == "bert":  # three projections per layer merged into one (GPT-2's come packed)
        assert counts["MatMul"] == 12 and counts["Split"] == 2


# -- hand-written blocks for the preconditions ---------------------------------------------------

B, S, N, H = 2, 5, 32, 4
D = N // H


def _block(
    *,
    scale: float | None = None,
    scale_op: str = "Div",
    softmax_axis: int = -1,
    mask: str = "int",
    kv_heads: int = H,
    scale_after_mask: bool = False,
    weights_as_inputs: bool = False,
    cross: bool = False,
    opset: int = 14,
    causal: str | None = None,
    swap_reshape: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """A BERT-eager-style attention block y = Attn(x) @ Wo with random weights that matter."""
    rng = np.random.default_rng(seed)
    nk = kv_heads * D
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def w(name, shape):
        return init(name, (rng.standard_normal(shape) * 1.5 / math.sqrt(shape[0])).astype(np.float32))

    def node(op, inputs, **attrs):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", N])]
    kv_source = "x"
    if cross:
        inputs.append(helper.make_tensor_value_info("enc", TensorProto.FLOAT, ["batch", "enc_seq", N]))
        kv_source = "enc"
    src = "x"
    if mask == "token_ids":
        # A padding mask computed from the token ids themselves (ids != 0), which also index an embedding.
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
        src = node("Add", ["x", node("Gather", [init("table", rng.standard_normal((4, N)).astype(np.float32)), "input_ids"])])
        if not cross:
            kv_source = src
    weights = {"wq": (N, N), "wk": (N, nk), "wv": (N, nk)}
    names = {}
    for key, shape in weights.items():
        if weights_as_inputs and key == "wk":
            inputs.append(helper.make_tensor_value_info(key, TensorProto.FLOAT, list(shape)))
            names[key] = key
        else:
            names[key] = w(key, shape)
    q = node("Add", [node("MatMul", [src, names["wq"]]), init("bq", rng.standard_normal(N).astype(np.float32))])
    k = node("Add", [node("MatMul", [kv_source, names["wk"]]), init("bk", rng.standard_normal(nk).astype(np.float32))])
    v = node("Add", [node("MatMul", [kv_source, names["wv"]]), init("bv", rng.standard_normal(nk).astype(np.float32))])
    if swap_reshape:
        # Runs (B * S elements either way) but puts the sequence where the batch belongs: the block
        # then attends across the batch, which the fused kernel cannot express.
        dims = node("Shape", ["x"])
        one = init("swap_one", np.array([1], np.int64))
        shape_q = node("Concat", [node("Slice", [dims, one, init("swap_two", np.array([2], np.int64))]),
                                  node("Slice", [dims, init("swap_zero", np.array([0], np.int64)), one]),
                                  init("hd", np.array([H, D], np.int64))], axis=0)
    else:
        shape_q = init("shape_q", np.array([0, 0, H, D], np.int64))
    q4 = node("Transpose", [node("Reshape", [q, shape_q])], perm=[0, 2, 1, 3])
    kv_shape = shape_q if swap_reshape else init("shape_kv", np.array([0, 0, kv_heads, D], np.int64))
    kt = node("Transpose", [node("Reshape", [k, kv_shape])], perm=[0, 2, 3, 1])
    v4 = node("Transpose", [node("Reshape", [v, kv_shape])], perm=[0, 2, 1, 3])
    scores = node("MatMul", [q4, kt])
    factor = init("scale", np.array(math.sqrt(D) if scale is None else 1 / scale, np.float32))
    if scale_op == "Mul":
        factor = init("scale_mul", np.array(1 / math.sqrt(D) if scale is None else scale, np.float32))

    def scaled(t):
        return node(scale_op, [t, factor])

    if not scale_after_mask:
        scores = scaled(scores)
    kv_dims = ["batch", "enc_seq" if cross else "seq"]
    if mask == "int":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, kv_dims))
        m = node("Cast", [node("Unsqueeze", ["attention_mask", init("axes12", np.array([1, 2], np.int64))])], to=1)
        add = node("Mul", [node("Sub", [init("one", np.array(1.0, np.float32)), m]), init("big", np.array(-10000.0, np.float32))])
    elif mask == "inverted":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, kv_dims))
        m = node("Cast", [node("Unsqueeze", ["attention_mask", init("axes12", np.array([1, 2], np.int64))])], to=1)
        add = node("Mul", [m, init("big", np.array(-10000.0, np.float32))])
    elif mask == "float":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, kv_dims))
        m = node("Unsqueeze", ["attention_mask", init("axes12", np.array([1, 2], np.int64))])
        add = node("Mul", [node("Sub", [init("one", np.array(1.0, np.float32)), m]), init("big", np.array(-10000.0, np.float32))])
    elif mask == "two_inputs":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, kv_dims))
        inputs.append(helper.make_tensor_value_info("other_mask", TensorProto.INT64, kv_dims))
        both = node("Mul", ["attention_mask", "other_mask"])
        m = node("Cast", [node("Unsqueeze", [both, init("axes12", np.array([1, 2], np.int64))])], to=1)
        add = node("Mul", [node("Sub", [init("one", np.array(1.0, np.float32)), m]), init("big", np.array(-10000.0, np.float32))])
    elif mask == "token_ids":
        keep = node("Not", [node("Equal", ["input_ids", init("zero_i", np.array(0, np.int64))])])
        m = node("Cast", [node("Unsqueeze", [keep, init("axes12", np.array([1, 2], np.int64))])], to=1)
        add = node("Mul", [node("Sub", [init("one", np.array(1.0, np.float32)), m]), init("big", np.array(-10000.0, np.float32))])
    elif mask == "none":
        add = None
    else:
        raise ValueError(mask)
    if causal == "trilu":
        # Trilu over a (seq, seq) block of ones, as decoders export a causal mask of dynamic size.
        seq = node("Slice", [node("Shape", ["x"]), init("one_i", np.array([1], np.int64)), init("two_i", np.array([2], np.int64))])
        ones = node("ConstantOfShape", [node("Concat", [seq, seq], axis=0)], value=numpy_helper.from_array(np.array([1], np.int64)))
        keep = node("Cast", [node("Trilu", [ones], upper=0)], to=TensorProto.BOOL)
        scores = node("Where", [keep, scores, init("lowest", np.array(np.finfo(np.float32).min, np.float32))])
    elif causal == "buffer":
        # GPT-2 (transformers 4) style: a stored lower-triangular buffer sliced to the length.
        seq = node("Slice", [node("Shape", ["x"]), init("one_i", np.array([1], np.int64)), init("two_i", np.array([2], np.int64))])
        buffer = init("causal_buffer", np.tril(np.ones((1, 1, 16, 16), bool)))
        keep = node("Slice", [buffer, init("zeros_i", np.array([0, 0], np.int64)), node("Concat", [seq, seq], axis=0),
                              init("axes23", np.array([2, 3], np.int64))])
        scores = node("Where", [keep, scores, init("lowest", np.array(-1e9, np.float32))])
    if add is not None:
        scores = node("Add", [scores, add])
    if scale_after_mask:
        scores = scaled(scores)
    probs = node("Softmax", [scores], axis=softmax_axis)
    ctx = node("Transpose", [node("MatMul", [probs, v4])], perm=[0, 2, 1, 3])
    out = node("Reshape", [ctx, init("shape_out", np.array([0, 0, N], np.int64))])
    nodes.append(helper.make_node("MatMul", [out, w("wo", (N, N))], ["y"]))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])
    graph = helper.make_graph(nodes, "block", inputs, [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        t = i.type.tensor_type
        dims = [d.dim_value or {"batch": B, "seq": S, "enc_seq": S + 2}[d.dim_param] for d in t.shape.dim]
        if t.elem_type == TensorProto.INT64:
            m = np.ones(dims, np.int64)
            m[1, -2:] = 0
            feeds[i.name] = m
        elif i.name == "attention_mask":
            m = np.ones(dims, np.float32)
            m[1, -2:] = 0.25  # a float "mask" need not be 0/1
            feeds[i.name] = m
        else:
            feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _report(model, level=3, target="cpu"):
    return onnxopt.compile(model, opt_level=level, target=target, verify_outputs=False).report


def _pass(report, name):
    return next(p for p in report["passes"] if p["name"] == name)


@pytest.mark.parametrize("scale_op", ["Div", "Mul"])
@pytest.mark.parametrize("opset", [13, 17])
def test_hand_written_block_fuses_with_padding(scale_op, opset):
    model = _block(scale_op=scale_op, opset=opset)
    compiled = assert_rewrite(3, model, _feeds(model), expect_ops={ATT: 1, "MatMul": 1}, absent_ops=("Softmax",))
    (node,) = _attention_nodes(compiled)
    assert _attrs(node)["num_heads"] == H and math.isclose(_attrs(node)["scale"], 1 / math.sqrt(D), rel_tol=1e-6)
    # The fused block must be worth checking: the padded row differs from an unpadded one.
    assert_rewrite("attention", model, _feeds(model), expect_fired=True)


def test_mask_from_int_input_is_the_one_the_kernel_applies():
    # Mutation check: dropping the mask (mask_index removed) must be caught by the oracle's comparison.
    model = _block()
    compiled = onnxopt.compile(model, opt_level=3, verify_outputs=False).model
    (node,) = _attention_nodes(compiled)
    del node.input[3:]
    ref, got = run_ort(model, _feeds(model)), run_ort(compiled, _feeds(model))
    assert float(np.abs(ref["y"] - got["y"]).max()) > 1e-3 * float(np.abs(ref["y"]).max())


@pytest.mark.parametrize("causal", ["trilu", "buffer"])
@pytest.mark.parametrize("mask", ["int", "none"])
def test_causal_masks_become_unidirectional(causal, mask):
    model = _block(causal=causal, mask=mask)
    compiled = assert_rewrite(3, model, _feeds(model), expect_ops={ATT: 1}, absent_ops=("Softmax", "Where"))
    (node,) = _attention_nodes(compiled)
    assert _attrs(node)["unidirectional"] == 1
    assert (len(node.input) == 4) == (mask == "int")


def test_projection_weight_input_falls_back_to_multi_head_attention():
    model = _block(weights_as_inputs=True)
    assert_rewrite(3, model, _feeds(model), expect_ops={MHA: 1, ATT: 0}, absent_ops=("Softmax",))
    report = onnxopt.compile(model, opt_level=3, verify_outputs=False).report
    assert declined(report, "attention_qkv") == ["a projection weight is not a constant"] * 1


def test_cross_attention_becomes_multi_head_attention():
    model = _block(cross=True)
    compiled = assert_rewrite(3, model, _feeds(model), expect_ops={MHA: 1, ATT: 0}, absent_ops=("Softmax",))
    (node,) = _attention_nodes(compiled)
    assert node.input[0] != node.input[1]  # query from x, key from enc


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(scale=0.2), "scale 0.2 != 1/sqrt(8)"),
        (dict(scale=0.2, scale_op="Mul"), "scale 0.2 != 1/sqrt(8)"),
        (dict(softmax_axis=2), "softmax over axis 2, not the last axis"),
        (dict(mask="float"), "not a 2-D integer/bool 0/1 attention_mask"),
        (dict(mask="inverted"), "inverted mask"),
        (dict(mask="two_inputs"), "several graph inputs"),
        (dict(mask="token_ids"), "also used as gather indices"),
        (dict(kv_heads=1), "heads inconsistent: query 4, key 1, value 1"),
        (dict(swap_reshape=True, mask="none"), "query: reshape to ["),
        (dict(scale_after_mask=True), "mask is added before the scores are scaled"),
    ],
    ids=["scale-div", "scale-mul", "softmax-axis", "float-mask", "inverted-mask", "two-mask-inputs", "token-id-mask", "mqa-heads", "swapped-reshape",
         "scale-after-mask"],
)
def test_declined_with_reason_and_merged_qkv_instead(kwargs, reason):
    model = _block(**kwargs)
    report = _report(model)
    rec = _pass(report, "attention")
    assert rec["fired"] == 0
    reasons = [d["reason"] for d in rec["declined"]]
    assert any(reason in r for r in reasons), reasons
    assert all(d["op"] == "Softmax" for d in rec["declined"])
    counts = report["ops_after"]
    assert not [op for op in counts if op.startswith("com.microsoft.")], counts
    # The fallback: the -O2 merged-QKV pass takes the projections of the declined block.
    assert _pass(report, "merge_qkv")["fired"] == 1
    assert_rewrite(3, model, _feeds(model), expect_ops={ATT: 0, MHA: 0, "Softmax": 1})


def test_graph_output_inside_the_block_is_declined():
    model = _block()
    # Expose the softmax probabilities: they must survive, so the block cannot be fused.
    probs = next(n for n in model.graph.node if n.op_type == "Softmax").output[0]
    model.graph.output.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, ["batch", H, "seq", "seq"]))
    report = _report(model)
    assert _pass(report, "attention")["fired"] == 0
    assert any("graph output" in d["reason"] for d in _pass(report, "attention")["declined"])
    assert_rewrite(3, model, _feeds(model), expect_ops={ATT: 0})


def test_no_mask_block_fuses_without_mask_index():
    model = _block(mask="none")
    compiled = assert_rewrite(3, model, _feeds(model), expect_ops={ATT: 1})
    (node,) = _attention_nodes(compiled)
    assert len(node.input) == 3 and "unidirectional" not in _attrs(node)


def test_block_output_that_is_a_graph_output_keeps_name_and_shape():
    model = _block()
    context = next(n for n in model.graph.node if n.op_type == "Reshape" and n.input[1] == "shape_out").output[0]
    model.graph.output.append(helper.make_tensor_value_info(context, TensorProto.FLOAT, ["batch", "seq", N]))
    compiled = assert_rewrite(3, model, _feeds(model), expect_ops={ATT: 1})
    (node,) = _attention_nodes(compiled)
    assert node.output[0] == context


def _to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in list(model.graph.input) + list(model.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    return model


def test_float16_block_is_declined():
    report = _report(_to_float16(_block()))
    rec = _pass(report, "attention")
    assert rec["fired"] == 0
    assert [d["reason"] for d in rec["declined"]] == ["the scores are FLOAT16, not float32"]


@pytest.mark.parametrize("case", ZOO, ids=_id)
def test_zoo_exports_fuse_without_value_info(case):
    """The same exports with graph.value_info cleared: the matcher infers the shapes it needs
    (dynamo exports index the mask with GatherND, whose shape only the exporter had declared)."""
    kw, blocks, _ = case
    path = zoo.build(**kw, strip_value_info=True)
    model = onnx.load(str(path))
    assert not model.graph.value_info
    assert_rewrite(3, model, zoo.sample_feeds(kw["name"], path), expect_ops={ATT: blocks, MHA: 0},
                   absent_ops=("Softmax",))
