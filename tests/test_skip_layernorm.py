"""skip_layernorm through the oracle: residual Add + LayerNorm/RMSNorm become onnxruntime's
SkipLayerNormalization / SkipSimplifiedLayerNormalization (MatMul bias folded, the sum exposed when
others read it); broadcasting skips and unsupported shapes are declined with a reason; zoo
transformers fuse once per residual connection, whether or not attention fuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.bench import zoo
from onnxopt.kernels import catalogue
from oracle import assert_rewrite, op_counts, options_for

D, K = 8, 6
RNG = np.random.default_rng(2)
MS = "com.microsoft."
SLN, SSLN = MS + "SkipLayerNormalization", MS + "SkipSimplifiedLayerNormalization"
# Fusions of the other helpers, disabled where the oracle's idempotence check should see ours only.
OTHERS = ["attention", "merge_qkv"]


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def residual_model(*, norm="ln", opset=17, a_shape=(2, 4, D), b_shape=(2, 4, D), bias="matmul",
                   bias_value=None, share_sum=False, dtype=np.float32, gamma_len=D, beta=True,
                   second_norm=False) -> onnx.ModelProto:
    """y = Norm(a + b); with bias="matmul", a = MatMul(h, W) + c. norm: ln | rms | decomposed_ln."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], [_init("gamma", RNG.standard_normal(gamma_len).astype(dtype)),
                        _init("beta", RNG.standard_normal(gamma_len).astype(dtype))]
    inputs = [helper.make_tensor_value_info("r", elem, list(b_shape))]
    if bias == "matmul":
        inputs.append(helper.make_tensor_value_info("h", elem, list(a_shape[:-1]) + [K]))
        inits += [_init("w", RNG.standard_normal((K, D)).astype(dtype)),
                  _init("c", (RNG.standard_normal(D) if bias_value is None else bias_value).astype(dtype))]
        nodes += [helper.make_node("MatMul", ["h", "w"], ["mm"]), helper.make_node("Add", ["mm", "c"], ["a"])]
    else:
        inputs.append(helper.make_tensor_value_info("a", elem, list(a_shape)))
    nodes.append(helper.make_node("Add", ["a", "r"], ["s"]))
    if norm == "ln":
        ln_inputs = ["s", "gamma", "beta"] if beta else ["s", "gamma"]
        nodes.append(helper.make_node("LayerNormalization", ln_inputs, ["y"], axis=-1, epsilon=1e-5))
    elif norm == "rms":
        nodes.append(helper.make_node("RMSNormalization", ["s", "gamma"], ["y"], axis=-1, epsilon=1e-6))
    else:  # the torch decomposition, for the full -O3 pipeline at opsets without LayerNormalization
        inits += [_init("two", np.float32(2.0)), _init("eps", np.float32(1e-5))]
        nodes += [
            helper.make_node("ReduceMean", ["s"], ["m"], axes=[-1]),
            helper.make_node("Sub", ["s", "m"], ["d"]),
            helper.make_node("Pow", ["d", "two"], ["d2"]),
            helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
            helper.make_node("Add", ["v", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["d", "sd"], ["n"]),
            helper.make_node("Mul", ["n", "gamma"], ["ng"]),
            helper.make_node("Add", ["ng", "beta"], ["y"]),
        ]
    out_shape = list(np.broadcast_shapes(a_shape, b_shape))
    outputs = [helper.make_tensor_value_info("y", elem, out_shape)]
    if share_sum:  # a pre-LN residual stream: the sum is used again after the norm
        nodes.append(helper.make_node("Add", ["s", "y"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", elem, out_shape))
    if second_norm:  # the same sum normalized twice
        nodes.append(helper.make_node("LayerNormalization", ["s", "gamma"], ["y2"], axis=-1, epsilon=1e-6))
        outputs.append(helper.make_tensor_value_info("y2", elem, out_shape))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def feeds(model):
    out = {}
    for inp in model.graph.input:
        t = inp.type.tensor_type
        shape = [d.dim_value for d in t.shape.dim]
        out[inp.name] = RNG.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(t.elem_type))
    return out


def declined(model, **options):
    result = onnxopt.compile(model, verify_outputs=False, **options_for("skip_layernorm"), **options)
    return [d["reason"] for d in next(p for p in result.report["passes"] if p["name"] == "skip_layernorm")["declined"]]


def node_of(proto, op):
    return next(n for n in proto.graph.node if n.op_type == op)


# ---- hand-written residual blocks ------------------------------------------------------------------


def test_residual_layernorm_with_matmul_bias():
    m = residual_model()
    out = assert_rewrite("skip_layernorm", m, feeds(m), expect_ops={SLN: 1, "LayerNormalization": 0, "Add": 0,
                                                                    "MatMul": 1}, expect_fired=True)
    node = node_of(out, "SkipLayerNormalization")
    assert list(node.input) == [node_of(out, "MatMul").output[0], "r", "gamma", "beta", "c"]
    assert len(node.output) == 1


def test_residual_layernorm_without_bias():
    m = residual_model(bias=None)
    out = assert_rewrite("skip_layernorm", m, feeds(m), expect_ops={SLN: 1, "Add": 0})
    assert list(node_of(out, "SkipLayerNormalization").input) == ["a", "r", "gamma", "beta"]


def test_bias_without_beta_leaves_beta_empty():
    m = residual_model(beta=False)
    out = assert_rewrite("skip_layernorm", m, feeds(m), expect_ops={SLN: 1, "Add": 0})
    assert list(node_of(out, "SkipLayerNormalization").input)[2:] == ["gamma", "", "c"]


def test_sum_normalized_twice_fuses_once():
    m = residual_model(second_norm=True)
    out = assert_rewrite("skip_layernorm", m, feeds(m), expect_ops={SLN: 1, "LayerNormalization": 1, "Add": 0})
    node = node_of(out, "SkipLayerNormalization")
    assert node_of(out, "LayerNormalization").input[0] == node.output[3]
    assert "also normalized by another LayerNorm" in declined(m)[0]


def test_sum_used_after_the_norm_comes_from_output_3():
    m = residual_model(share_sum=True)
    out = assert_rewrite("skip_layernorm", m, feeds(m), expect_ops={SLN: 1, "Add": 1})
    node = node_of(out, "SkipLayerNormalization")
    assert len(node.output) == 4
    assert node.output[3] in node_of(out, "Add").input


def test_residual_rmsnorm_becomes_skip_simplified():
    m = residual_model(norm="rms", opset=23)
    out = assert_rewrite("skip_layernorm", m, feeds(m), expect_ops={SSLN: 1, "RMSNormalization": 0, "Add": 0})
    assert len(node_of(out, "SkipSimplifiedLayerNormalization").input) == 4  # input, skip, gamma, bias


@pytest.mark.parametrize("opset", [14, 17])
def test_full_O3_pipeline_on_decomposed_layernorm(opset):
    """Below opset 17 layernorm_ort emits a self-skip kernel, which skip_layernorm then turns into
    the residual one; at 17 the standard LayerNormalization is the intermediate."""
    m = residual_model(norm="decomposed_ln", opset=opset)
    out = assert_rewrite(3, m, feeds(m), target="cuda", expect_ops={SLN: 1, "ReduceMean": 0, "Add": 0})
    node = node_of(out, "SkipLayerNormalization")
    assert node.input[0] != node.input[1] and len(node.input) == 5
    assert helper.get_attribute_value(node.attribute[0]) == pytest.approx(1e-5)


@pytest.mark.parametrize("opset, norm_ops", [(14, {"ReduceMean": 2}), (17, {"LayerNormalization": 1})])
def test_cpu_target_keeps_add_and_layernorm(opset, norm_ops):
    """onnxruntime's CPU Skip*LayerNormalization is slower than Add + LayerNormalization (measured,
    kernels/catalogue.py), so -O3 for the CPU EP emits neither it nor the self-skip form; below
    opset 17 the decomposed norm stays for the session to fuse into LayerNormalization."""
    m = residual_model(norm="decomposed_ln", opset=opset)
    assert_rewrite(3, m, feeds(m), target="cpu", expect_ops={SLN: 0, **norm_ops})
    assert "cpu" in catalogue.kernel("SkipLayerNormalization").avoid
    with pytest.raises(onnxopt.CompileError, match="does not run for target 'cpu'"):
        onnxopt.compile(m, opt_level=0, enable=["skip_layernorm"], target="cpu")


def test_bias_that_is_not_a_feature_vector_is_not_folded():
    m = residual_model(bias_value=RNG.standard_normal((1, D)))
    out = assert_rewrite("skip_layernorm", m, feeds(m), expect_ops={SLN: 1, "Add": 1})
    assert len(node_of(out, "SkipLayerNormalization").input) == 4


# ---- declined, with the reason -----------------------------------------------------------------------


def test_broadcasting_skip_is_declined():
    m = residual_model(bias=None, a_shape=(1, 4, D), b_shape=(2, 4, D))
    assert_rewrite("skip_layernorm", m, feeds(m), expect_fired=False, expect_ops={"LayerNormalization": 1})
    assert "would broadcast" in declined(m)[0]


def test_rank_4_is_declined():
    m = residual_model(bias=None, a_shape=(2, 3, 4, D), b_shape=(2, 3, 4, D))
    assert_rewrite("skip_layernorm", m, feeds(m), expect_fired=False)
    assert "rank-2 or rank-3" in declined(m)[0]


def test_unproven_equal_shapes_are_declined():
    m = residual_model(bias=None)
    for inp, dim in ((m.graph.input[0], "N"), (m.graph.input[1], "M")):
        inp.type.tensor_type.shape.dim[0].dim_param = dim
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert_rewrite("skip_layernorm", m, feeds_with(m, {"r": (2, 4, D), "a": (2, 4, D)}), expect_fired=False)
    assert "would broadcast" in declined(m)[0]


def feeds_with(model, shapes):
    return {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_element_types_come_from_the_catalogue():
    """cuda's SkipLayerNormalization takes float32 and float16 (kernels/catalogue.py): float16 fuses,
    float64 is declined with the types the target has."""
    m = residual_model(bias=None, dtype=np.float16)
    assert_rewrite("skip_layernorm", m, feeds(m), expect_fired=True, rtol=1e-2)
    m = residual_model(bias=None, dtype=np.float64)
    assert_rewrite("skip_layernorm", m, feeds(m), expect_fired=False)
    assert declined(m)[0] == "SkipLayerNormalization on cuda takes float32, float16, not float64"


def test_gamma_not_over_the_last_axis_is_declined():
    m = residual_model(bias=None, gamma_len=1)
    assert_rewrite("skip_layernorm", m, feeds(m), expect_fired=False)
    assert "gamma is not 1-D of length 8" in declined(m)[0]


# ---- zoo transformers ------------------------------------------------------------------------------

LAYERS = {"bert": 2, "vit": 2, "gpt2": 2, "minilm": 6}
GELU = {"bert": "BiasGelu", "vit": "BiasGelu", "minilm": "BiasGelu", "gpt2": "FastGelu"}
ZOO = [
    ("bert", dict(exporter="legacy", opset=13)),
    ("bert", dict(exporter="legacy", opset=13, attention="sdpa")),
    ("bert", dict(exporter="legacy", opset=14)),
    ("bert", dict(exporter="legacy", opset=14, attention="sdpa")),
    ("bert", dict(exporter="legacy", opset=17)),
    ("bert", dict(exporter="dynamo")),
    ("bert", dict(exporter="dynamo", attention="sdpa")),
    ("vit", dict(exporter="legacy", opset=14)),
    ("vit", dict(exporter="dynamo")),
    ("gpt2", dict(exporter="legacy", opset=14)),
    ("gpt2", dict(exporter="dynamo")),
    ("minilm", dict(exporter="legacy", opset=14)),
]


def expected(name: str, kw: dict) -> dict:
    """Two residual connections per layer (after attention, after the MLP), each feeding a
    LayerNorm; the one LayerNorm on the embeddings has a broadcasting position embedding, so it
    stays a plain LayerNorm: LayerNormalization at opset >= 17, the self-skip kernel below."""
    layers = LAYERS[name]
    opset = 18 if kw["exporter"] == "dynamo" else kw["opset"]
    standalone = opset >= 17
    return {
        SLN: 2 * layers + (0 if standalone else 1),
        "LayerNormalization": 1 if standalone else 0,
        MS + GELU[name]: layers,
        "ReduceMean": 0,
    }


def _id(item):
    name, kw = item
    return "-".join([name] + [str(v) for v in kw.values()])


@pytest.mark.parametrize("item", ZOO, ids=[_id(z) for z in ZOO])
def test_zoo_fuses_every_residual_layernorm(item):
    name, kw = item
    path = zoo.build(name, size="tiny", **kw)  # minilm: real weights, size ignored
    want = expected(name, kw)
    out = assert_rewrite(3, path, zoo.sample_feeds(name, path), target="cuda", expect_ops=want, disable=OTHERS)
    skips = [n for n in out.graph.node if n.op_type == "SkipLayerNormalization" and n.input[0] != n.input[1]]
    # Post-LN BERT: every residual branch is MatMul + bias; pre-LN GPT-2/ViT carry the sum on.
    with_bias = sum(len(n.input) == 5 for n in skips)
    exposed = sum(len(n.output) == 4 for n in skips)
    if name in ("bert", "minilm"):
        assert (with_bias, exposed) == (2 * LAYERS[name], 0)
    else:
        assert exposed == 2 * LAYERS[name] - 1  # the last sum feeds only the final LayerNorm
    # The full pipeline (attention fusion included) reaches the same counts, verified.
    full = onnxopt.compile(path, opt_level=3, target="cuda")
    counts = full.report["ops_after"]
    assert {k: counts.get(k, 0) for k in want} == want
    assert full.report["verification"]["ok"]


@pytest.mark.parametrize("target", ["tensorrt", "generic"])
def test_standard_only_targets_get_no_contrib_op_at_O3(target):
    path = zoo.build("bert", size="tiny", exporter="legacy", opset=17)
    result = onnxopt.compile(path, opt_level=3, target=target)
    assert not [k for k in result.report["ops_after"] if "." in k]
    assert result.report["ops_after"]["LayerNormalization"] == 5


def test_O2_on_zoo_emits_standard_ops_only():
    for name in ("bert", "gpt2"):
        path = zoo.build(name, size="tiny", exporter="dynamo")
        out = assert_rewrite(2, path, zoo.sample_feeds(name, path), expect_ops={"LayerNormalization": 5},
                             disable=OTHERS)
        assert not [k for k in op_counts(out) if "." in k]
