"""layernorm / layernorm_ort through the oracle: every recognized spelling of LayerNorm and RMSNorm
fuses (standard ops where the opset has them, the onnxruntime self-skip kernel below at -O3), every
checked constant and shape, when wrong, stops the rewrite with a reason; zoo exports fuse per layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.bench import zoo
from oracle import assert_rewrite, op_counts, options_for

D = 8
RNG = np.random.default_rng(0)
GAMMA = RNG.standard_normal(D).astype(np.float32)
BETA = RNG.standard_normal(D).astype(np.float32)


class Builder:
    """A tiny graph builder: each op() returns its output name; constants become initializers."""

    def __init__(self, opset: int):
        self.opset, self.nodes, self.inits, self.inputs, self._n = opset, [], [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def const(self, value, hint="c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def input(self, name: str, shape, elem=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def reduce_mean(self, x: str, axes=(-1,), keepdims=1) -> str:
        if self.opset >= 18:
            ax = self.name("axes")
            self.inits.append(numpy_helper.from_array(np.asarray(axes, np.int64), ax))
            return self.op("ReduceMean", x, ax, keepdims=keepdims)
        return self.op("ReduceMean", x, axes=list(axes), keepdims=keepdims)

    def model(self, y: str, shape, extra_outputs=()) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [y], ["y"]))
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
        outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in extra_outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=8)


def norm_model(form="torch", *, square="pow", inverse="div", opset=17, exponent=2.0, axes=(-1,), keepdims=1,
               eps=1e-5, eps_input=False, gamma=GAMMA, beta=BETA, shape=(2, 4, D), one=1.0, rsqrt_exponent=-0.5,
               leak=None, moments=False) -> onnx.ModelProto:
    """form: torch | moments | tf | keras | rms; square: pow | mul; inverse: div | reciprocal | div_one | pow;
    moments: the tf / keras forms with E[x^2] - E[x]^2 as variance.
    `leak` names an intermediate ("mean", "centred", "variance") that also becomes a graph output."""
    b = Builder(opset)
    x = b.input("x", list(shape))

    def sq(v):
        return b.op("Pow", v, b.const(exponent)) if square == "pow" else b.op("Mul", v, v)

    mean = centred = None
    if form == "rms":
        variance = b.reduce_mean(sq(x), axes, keepdims)
    else:
        mean = b.reduce_mean(x, axes, keepdims)
        if form == "moments" or moments:
            variance = b.op("Sub", b.reduce_mean(sq(x), axes, keepdims), sq(mean))
        else:
            centred = b.op("Sub", x, mean)
            variance = b.reduce_mean(sq(centred), axes, keepdims)
    e = b.input("eps", []) if eps_input else b.const(eps)
    ve = b.op("Add", variance, e)
    numerator = x if form == "rms" else (b.op("Sub", x, mean) if form == "moments" else centred)
    inv = None
    if inverse == "div":
        normalized = b.op("Div", numerator, b.op("Sqrt", ve))
    else:
        if inverse == "reciprocal":
            inv = b.op("Reciprocal", b.op("Sqrt", ve))
        elif inverse == "div_one":
            inv = b.op("Div", b.const(one), b.op("Sqrt", ve))
        else:
            inv = b.op("Pow", ve, b.const(rsqrt_exponent))
        normalized = b.op("Mul", inv, numerator) if form not in ("tf", "keras") else None
    g = b.const(gamma, "gamma")
    if form in ("tf", "keras"):
        scale = b.op("Mul", inv, g) if form == "tf" else b.op("Mul", g, inv)
        if form == "tf":
            y = b.op("Add", b.op("Mul", x, scale), b.op("Sub", b.const(beta, "beta"), b.op("Mul", mean, scale)))
        else:
            shift = b.op("Add", b.op("Mul", b.op("Neg", mean), scale), b.const(beta, "beta"))
            y = b.op("Add", shift, b.op("Mul", scale, x))
    else:
        y = b.op("Mul", g, normalized)
        if beta is not None and form != "rms":
            y = b.op("Add", b.const(beta, "beta"), y)
    extra = []
    if leak:
        value = {"mean": mean, "centred": centred, "variance": variance}[leak]
        b.nodes.append(helper.make_node("Identity", [value], ["leak"]))
        extra = [("leak", list(shape) if leak == "centred" else list(shape[:-1]) + [1])]
    return b.model(y, list(shape), extra)


def feeds(model, eps=1e-5):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    out = {"x": (RNG.standard_normal(shape) * 2 + 0.5).astype(np.float32)}
    if any(i.name == "eps" for i in model.graph.input):
        out["eps"] = np.array(eps, np.float32)
    return out


def report(model, pass_name, **options) -> dict:
    result = onnxopt.compile(model, verify_outputs=False, **{**options_for(pass_name), **options})
    return next(p for p in result.report["passes"] if p["name"] == pass_name)


def reasons(model, pass_name="layernorm", **options) -> list[str]:
    return [d["reason"] for d in report(model, pass_name, **options)["declined"]]


# ---- every spelling fuses ----------------------------------------------------------------------

LAYER_FORMS = [
    ("torch", "pow", "div"),
    ("torch", "mul", "reciprocal"),
    ("torch", "pow", "div_one"),
    ("torch", "mul", "pow"),
    ("moments", "pow", "div"),
    ("moments", "mul", "reciprocal"),
    ("tf", "mul", "reciprocal"),
    ("tf", "pow", "div_one"),
    ("keras", "mul", "pow"),
    ("keras-moments", "mul", "pow"),
    ("tf-moments", "pow", "reciprocal"),
]


@pytest.mark.parametrize("form, square, inverse", LAYER_FORMS, ids=lambda v: str(v))
def test_layernorm_forms_fuse_to_layernormalization(form, square, inverse):
    form, _, variance = form.partition("-")
    m = norm_model(form, square=square, inverse=inverse, moments=variance == "moments")
    out = assert_rewrite("layernorm", m, feeds(m), expect_ops={"LayerNormalization": 1}, absent_ops=(
        "ReduceMean", "Sqrt", "Sub", "Pow", "Reciprocal", "Div", "Mul", "Add", "Neg"), expect_fired=True)
    node = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1 and attrs["epsilon"] == pytest.approx(1e-5) and attrs["stash_type"] == 1
    assert len(node.input) == 3  # beta folded in


def test_layernorm_without_beta_and_opset18_axes_input():
    m = norm_model(beta=None, opset=18)
    out = assert_rewrite("layernorm", m, feeds(m), expect_ops={"LayerNormalization": 1, "ReduceMean": 0})
    assert len(next(n for n in out.graph.node if n.op_type == "LayerNormalization").input) == 2


def test_add_after_the_scale_that_is_not_a_beta_stays():
    m = norm_model(beta=np.stack([BETA, BETA]), shape=(2, 2, D))
    out = assert_rewrite("layernorm", m, feeds(m), expect_ops={"LayerNormalization": 1, "Add": 1, "ReduceMean": 0})
    assert len(next(n for n in out.graph.node if n.op_type == "LayerNormalization").input) == 2


def test_positive_last_axis_is_the_last_axis():
    m = norm_model(axes=(2,))
    assert_rewrite("layernorm", m, feeds(m), expect_ops={"LayerNormalization": 1})


@pytest.mark.parametrize("square, inverse", [("pow", "div"), ("mul", "reciprocal"), ("pow", "pow")])
def test_rmsnorm_fuses_to_rmsnormalization_at_opset_23(square, inverse):
    m = norm_model("rms", square=square, inverse=inverse, opset=23)
    assert_rewrite("layernorm", m, feeds(m), expect_ops={"RMSNormalization": 1}, absent_ops=("ReduceMean", "Sqrt"))


def test_rmsnorm_below_opset_23_is_declined_at_O2_and_self_skip_at_O3():
    m = norm_model("rms", opset=17)
    assert_rewrite("layernorm", m, feeds(m), expect_fired=False, expect_ops={"ReduceMean": 1})
    assert "opset 17 has no RMSNormalization" in reasons(m)[0]
    out = assert_rewrite("layernorm_ort", m, feeds(m), expect_ops={
        "com.microsoft.SkipSimplifiedLayerNormalization": 1, "ReduceMean": 0})
    node = next(n for n in out.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    assert node.input[0] == node.input[1] == "x"
    assert helper.get_attribute_value(node.attribute[0]) == pytest.approx(4e-5)


@pytest.mark.parametrize("opset", [13, 14])
def test_below_opset_17_layernorm_is_declined_at_O2_and_self_skip_at_O3(opset):
    m = norm_model(opset=opset)
    assert_rewrite("layernorm", m, feeds(m), expect_fired=False, expect_ops={"ReduceMean": 2})
    assert f"opset {opset} has no LayerNormalization" in reasons(m)[0]
    out = assert_rewrite("layernorm_ort", m, feeds(m), expect_ops={
        "com.microsoft.SkipLayerNormalization": 1, "ReduceMean": 0})
    node = next(n for n in out.graph.node if n.op_type == "SkipLayerNormalization")
    assert node.input[0] == node.input[1] == "x" and len(node.input) == 4
    # At opset >= 17 layernorm_ort leaves the work to the standard op.
    assert report(norm_model(opset=17), "layernorm_ort")["fired"] == 1
    assert op_counts(onnxopt.compile(norm_model(opset=17), **options_for("layernorm_ort"),
                                     verify_outputs=False).model)["LayerNormalization"] == 1


def test_self_skip_refuses_rank_4():
    m = norm_model(opset=14, shape=(2, 3, 4, D))
    assert_rewrite("layernorm_ort", m, feeds(m), expect_fired=False)
    assert "rank-2 or rank-3" in reasons(m, "layernorm_ort")[0]


# ---- every checked constant, wrong, stops the rewrite --------------------------------------------

NEGATIVE = {
    "exponent 4": (dict(exponent=4.0), "exponent 4 is not 2"),
    "exponent 4 (moments)": (dict(form="moments", exponent=4.0), "exponent 4 is not 2"),
    "first reduction over axis 1": (dict(axes=(1,)), "not the last axis"),
    "reduction over two axes": (dict(axes=(-2, -1)), "not the last axis"),
    "keepdims 0": (dict(keepdims=0, shape=(D, D, D)), "keepdims=0"),
    "epsilon zero": (dict(eps=0.0), "not a small positive"),
    "epsilon negative": (dict(eps=-1e-5), "not a small positive"),
    "epsilon large": (dict(eps=0.5), "not a small positive"),
    "epsilon a vector": (dict(eps=np.full(D, 1e-5)), "epsilon is not a constant scalar"),
    "gamma [1]": (dict(gamma=np.array([1.5])), "gamma has shape [1]"),
    "gamma [1, D]": (dict(gamma=GAMMA.reshape(1, D)), "gamma has shape [1, 8]"),
    "tf: beta [2, D]": (dict(form="tf", inverse="reciprocal", beta=np.stack([BETA, BETA]), shape=(2, 2, D)),
                        "beta has shape [2, 8]"),
    "Div(2, sqrt)": (dict(inverse="div_one", one=2.0), "is not 1 / sqrt"),
    "Pow(v, -0.25)": (dict(inverse="pow", rsqrt_exponent=-0.25), "not an inverse square root"),
    "mean used elsewhere": (dict(leak="mean"), "also used outside the pattern"),
    "variance used elsewhere": (dict(leak="variance"), "also used outside the pattern"),
}


@pytest.mark.parametrize("case", list(NEGATIVE), ids=list(NEGATIVE))
def test_wrong_constants_and_shapes_are_declined(case):
    kwargs, why = NEGATIVE[case]
    m = norm_model(**kwargs)
    assert_rewrite("layernorm", m, feeds(m), expect_fired=False, expect_ops={"LayerNormalization": 0})
    got = reasons(m)
    assert len(got) == 1 and why in got[0], got


def test_epsilon_graph_input_is_declined():
    m = norm_model(eps_input=True)
    assert_rewrite("layernorm", m, feeds(m), expect_fired=False, expect_ops={"LayerNormalization": 0})
    assert "epsilon is not a constant scalar" in reasons(m)[0]


def test_gamma_graph_input_is_declined():
    m = norm_model()
    init = next(i for i in m.graph.initializer if i.name.startswith("gamma"))
    m.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, [D]))
    # An initializer listed as a graph input is a default a caller may override.
    f = feeds(m)
    f[init.name] = GAMMA
    assert_rewrite("layernorm", m, f, expect_fired=False)
    assert "gamma" in reasons(m)[0] and "graph input" in reasons(m)[0]


def test_rms_of_a_centred_value_is_not_a_layernorm_with_wrong_mean():
    """A LayerNorm whose mean reduces the wrong axis is declined, not half-fused as an RMSNorm."""
    m = norm_model(axes=(1,), opset=23)
    assert_rewrite("layernorm", m, feeds(m), expect_fired=False, expect_ops={"RMSNormalization": 0})


# ---- zoo exports -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(exporter="legacy", opset=14), dict(exporter="legacy", opset=13, attention="sdpa")],
                         ids=["legacy14", "legacy13-sdpa"])
def test_bert_upgraded_to_opset_17_has_layernormalization_per_layer(kw):
    """BERT: 2 LayerNorms per layer + the embedding LayerNorm; --opset 17 makes them standard ops."""
    path = zoo.build("bert", size="tiny", **kw)
    layers = 2
    out = assert_rewrite(2, path, zoo.sample_feeds("bert", path), opset=17,
                         expect_ops={"LayerNormalization": 2 * layers + 1}, absent_ops=("ReduceMean", "Sqrt"),
                         disable=["merge_qkv"])
    assert not [k for k in op_counts(out) if "." in k], "-O2 emitted a contrib op"


def test_opset_upgrade_keeps_symbolic_output_dims():
    """ViT's legacy export declares its output (batch, dim_1, dim_2); onnx's version converter
    infers (batch, 17, 64). The interface is the user's: the declared symbols stay."""
    path = zoo.build("vit", size="tiny", exporter="legacy", opset=14)
    out = assert_rewrite(2, path, zoo.sample_feeds("vit", path), opset=17, expect_ops={"LayerNormalization": 5})
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][1:] == [d.dim_param for d in onnx.load(str(path)).graph.output[0]
                                                               .type.tensor_type.shape.dim][1:]


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_O2_below_opset_17_changes_no_norm_and_emits_standard_ops_only(name):
    path = zoo.build(name, size="tiny", exporter="legacy", opset=14)
    result = onnxopt.compile(path, opt_level=2)
    counts = result.report["ops_after"]
    assert counts.get("ReduceMean") == 10 and not [k for k in counts if "." in k]
    rec = next(p for p in result.report["passes"] if p["name"] == "layernorm")
    assert rec["fired"] == 0 and rec["declined_count"] == 5
