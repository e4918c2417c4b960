"""gelu / gelu_ort through the oracle: every recognized spelling of the erf, tanh and sigmoid GELUs
fuses (standard Gelu at opset >= 20, com.microsoft kernels at -O3 with a MatMul bias folded in),
and every checked constant, when wrong, stops the rewrite with a reason."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.bench import zoo
from oracle import assert_rewrite, op_counts

N, K = 8, 6
RNG = np.random.default_rng(1)
W = (RNG.standard_normal((K, N)) / 2).astype(np.float32)
BIAS = RNG.standard_normal(N).astype(np.float32)


class Builder:
    def __init__(self, opset: int, dtype=np.float32):
        self.opset, self.dtype, self.nodes, self.inits, self.inputs, self._n = opset, dtype, [], [], [], 0

    def name(self, hint):
        self._n += 1
        return f"{hint}{self._n}"

    def const(self, value, hint="c"):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, self.dtype), name))
        return name

    def op(self, op_type, *inputs, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def model(self, y, shape, extra=()):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        self.nodes.append(helper.make_node("Identity", [y], ["y"]))
        outputs = [helper.make_tensor_value_info("y", elem, shape)]
        outputs += [helper.make_tensor_value_info(o, elem, shape) for o in extra]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=8)


def gelu_model(form="erf", *, arrangement="last", scale="div", cube="pow", bias=None, opset=17, half=0.5, one=1.0,
               sqrt2=math.sqrt(2.0), c1=0.044715, c2=math.sqrt(2 / math.pi), cube_exponent=3.0, alpha=1.702,
               leak=False, dtype=np.float32, bias_value=BIAS) -> onnx.ModelProto:
    """form: erf | tanh | sigmoid; arrangement of the 0.5: last | bracket | first;
    bias: None (x is the input) | "matmul" (x = MatMul(a, W) + b) | "matmul_shared" (the sum also an output)."""
    b = Builder(opset, dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if bias:
        b.inputs.append(helper.make_tensor_value_info("a", elem, [2, 4, K]))
        x = b.op("Add", b.const(bias_value, "bias"), b.op("MatMul", "a", b.const(W, "w")))
    else:
        b.inputs.append(helper.make_tensor_value_info("x", elem, [2, 4, N]))
        x = "x"
    if form == "sigmoid":
        y = b.op("Mul", b.op("Sigmoid", b.op("Mul", x, b.const(alpha))), x)
    else:
        if form == "erf":
            inner = b.op("Div", x, b.const(sqrt2)) if scale == "div" else b.op("Mul", b.const(1 / sqrt2), x)
            t = b.op("Erf", inner)
        else:
            if cube == "pow":
                x3 = b.op("Pow", x, b.const(cube_exponent))
            elif cube == "mul_left":
                x3 = b.op("Mul", b.op("Mul", x, x), x)
            else:
                x3 = b.op("Mul", x, b.op("Mul", x, x))
            t = b.op("Tanh", b.op("Mul", b.const(c2), b.op("Add", x, b.op("Mul", x3, b.const(c1)))))
        p = b.op("Add", b.const(one), t)
        if arrangement == "last":
            y = b.op("Mul", b.op("Mul", x, p), b.const(half))
        elif arrangement == "bracket":
            y = b.op("Mul", x, b.op("Mul", b.const(half), p))
        else:
            y = b.op("Mul", p, b.op("Mul", b.const(half), x))
    extra = []
    if leak or bias == "matmul_shared":
        b.nodes.append(helper.make_node("Identity", [x if bias == "matmul_shared" else t], ["leak"]))
        extra = ["leak"]
    return b.model(y, [2, 4, N], extra)


def feeds(model):
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    return {inp.name: (RNG.standard_normal(shape) * 2).astype(dtype)}


def reasons(model, pass_name="gelu", **options):
    result = onnxopt.compile(model, opt_level=0, enable=[pass_name], verify_outputs=False, **options)
    return [d["reason"] for d in next(p for p in result.report["passes"] if p["name"] == pass_name)["declined"]]


def attr(proto, op, name):
    node = next(n for n in proto.graph.node if n.op_type == op)
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


ARRANGEMENTS = ["last", "bracket", "first"]
DECOMPOSED = ("Erf", "Tanh", "Pow", "Div", "Mul", "Add", "Sigmoid")


# ---- -O2: standard Gelu where the opset has it -------------------------------------------------------


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
@pytest.mark.parametrize("scale", ["div", "mul"])
def test_erf_gelu_becomes_standard_gelu_at_opset_20(arrangement, scale):
    m = gelu_model("erf", arrangement=arrangement, scale=scale, opset=20)
    out = assert_rewrite("gelu", m, feeds(m), expect_ops={"Gelu": 1}, absent_ops=DECOMPOSED, expect_fired=True)
    assert attr(out, "Gelu", "approximate") in (None, b"none", "none")


@pytest.mark.parametrize("cube, arrangement", [("pow", "first"), ("mul_left", "last"), ("mul_right", "bracket")])
def test_tanh_gelu_becomes_standard_gelu_tanh_at_opset_20(cube, arrangement):
    m = gelu_model("tanh", cube=cube, arrangement=arrangement, opset=20)
    out = assert_rewrite("gelu", m, feeds(m), expect_ops={"Gelu": 1}, absent_ops=DECOMPOSED)
    assert attr(out, "Gelu", "approximate") in (b"tanh", "tanh")


def test_below_opset_20_O2_leaves_gelu_and_says_why():
    m = gelu_model("erf", opset=18)
    assert_rewrite("gelu", m, feeds(m), expect_fired=False, expect_ops={"Erf": 1})
    assert "opset 18 has no Gelu" in reasons(m)[0]


def test_O2_leaves_the_sigmoid_form_alone():
    m = gelu_model("sigmoid", opset=20)
    assert_rewrite("gelu", m, feeds(m), expect_fired=False, expect_ops={"Sigmoid": 1})
    assert reasons(m) == []


# ---- -O3 onnxruntime: contrib kernels, bias folded ---------------------------------------------------


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_erf_gelu_becomes_ms_gelu_and_with_matmul_bias_biasgelu(arrangement):
    m = gelu_model("erf", arrangement=arrangement)
    assert_rewrite("gelu_ort", m, feeds(m), expect_ops={"com.microsoft.Gelu": 1}, absent_ops=DECOMPOSED)
    m = gelu_model("erf", arrangement=arrangement, scale="mul", bias="matmul")
    out = assert_rewrite("gelu_ort", m, feeds(m), expect_ops={"com.microsoft.BiasGelu": 1, "MatMul": 1, "Add": 0},
                         absent_ops=DECOMPOSED)
    node = next(n for n in out.graph.node if n.op_type == "BiasGelu")
    assert next(n for n in out.graph.node if n.op_type == "MatMul").output[0] == node.input[0]


@pytest.mark.parametrize("cube", ["pow", "mul_left", "mul_right"])
def test_tanh_gelu_becomes_fastgelu_with_and_without_bias(cube):
    m = gelu_model("tanh", cube=cube)
    assert_rewrite("gelu_ort", m, feeds(m), expect_ops={"com.microsoft.FastGelu": 1}, absent_ops=DECOMPOSED)
    m = gelu_model("tanh", cube=cube, bias="matmul", arrangement="bracket")
    out = assert_rewrite("gelu_ort", m, feeds(m), expect_ops={"com.microsoft.FastGelu": 1, "Add": 0})
    assert len(next(n for n in out.graph.node if n.op_type == "FastGelu").input) == 2


@pytest.mark.parametrize("alpha", [1.702, 1.0])
def test_sigmoid_form_becomes_quickgelu_with_its_alpha(alpha):
    m = gelu_model("sigmoid", alpha=alpha)
    out = assert_rewrite("gelu_ort", m, feeds(m), expect_ops={"com.microsoft.QuickGelu": 1},
                         absent_ops=("Sigmoid", "Mul"))
    assert attr(out, "QuickGelu", "alpha") == pytest.approx(alpha)


def test_standard_gelu_with_matmul_bias_becomes_biasgelu_at_O3():
    m = gelu_model("erf", bias="matmul", opset=20)
    assert_rewrite(3, m, feeds(m), expect_ops={"com.microsoft.BiasGelu": 1, "Gelu": 0, "Add": 0})
    m = gelu_model("tanh", bias="matmul", opset=20)
    assert_rewrite(3, m, feeds(m), expect_ops={"com.microsoft.FastGelu": 1, "Gelu": 0, "Add": 0})
    # -O2 keeps it portable: standard Gelu, bias Add left as is.
    assert_rewrite(2, m, feeds(m), expect_ops={"Gelu": 1, "Add": 1}, absent_ops=("com.microsoft.FastGelu",))


@pytest.mark.parametrize("target", ["tensorrt", "generic"])
def test_O3_for_standard_only_targets_adds_no_contrib_op(target):
    m = gelu_model("erf", bias="matmul", opset=17)
    out = assert_rewrite(3, m, feeds(m), target=target, expect_ops={"Erf": 1})
    assert not [k for k in op_counts(out) if "." in k]


def test_bias_that_is_not_a_feature_vector_is_not_folded():
    m = gelu_model("erf", bias="matmul", bias_value=BIAS.reshape(1, N))
    assert_rewrite("gelu_ort", m, feeds(m), expect_ops={"com.microsoft.Gelu": 1, "Add": 1, "com.microsoft.BiasGelu": 0})


def test_bias_sum_used_elsewhere_is_not_folded():
    m = gelu_model("erf", bias="matmul_shared")
    assert_rewrite("gelu_ort", m, feeds(m), expect_ops={"com.microsoft.Gelu": 1, "Add": 1, "com.microsoft.BiasGelu": 0})


def test_fused_kernels_need_float32():
    # (onnxruntime has no double Erf kernel, so the tanh form carries this test.)
    m = gelu_model("tanh", dtype=np.float64)
    assert_rewrite("gelu_ort", m, feeds(m), expect_fired=False)
    assert "float32" in reasons(m, "gelu_ort")[0]
    # The standard op takes double.
    m = gelu_model("tanh", dtype=np.float64, opset=20)
    assert_rewrite("gelu", m, feeds(m), expect_ops={"Gelu": 1})


# ---- every checked constant, wrong, stops the rewrite --------------------------------------------

NEGATIVE = {
    "0.6 instead of 0.5 (last)": (dict(half=0.6), "the 0.5 factor is 0.6"),
    "0.6 instead of 0.5 (bracket)": (dict(half=0.6, arrangement="bracket"), "the 0.5 factor is 0.6"),
    "0.6 instead of 0.5 (first)": (dict(half=0.6, arrangement="first"), "the 0.5 factor is 0.6"),
    "0.50001 instead of 0.5": (dict(half=0.50001), "the 0.5 factor"),
    "1 + erf with 2": (dict(one=2.0), "the 1 in 1 + (.) is 2"),
    "divisor 1.5": (dict(sqrt2=1.5), "the divisor sqrt(2) is 1.5"),
    "factor 1/1.5": (dict(sqrt2=1.5, scale="mul"), "the factor 1/sqrt(2) is 0.666"),
    "tanh: 0.04 cubic": (dict(form="tanh", c1=0.04), "cubic coefficient 0.044715 is 0.03999"),
    "tanh: 0.8 factor": (dict(form="tanh", c2=0.8), "the factor sqrt(2/pi) is 0.8"),
    "tanh: exponent 2": (dict(form="tanh", cube_exponent=2.0), "exponent is 2.0, not 3"),
    "tanh: 0.6 factor": (dict(form="tanh", half=0.6), "the 0.5 factor is 0.6"),
    "erf output used elsewhere": (dict(leak=True), "output is also used elsewhere"),
}


@pytest.mark.parametrize("case", list(NEGATIVE), ids=list(NEGATIVE))
@pytest.mark.parametrize("pass_name", ["gelu", "gelu_ort"])
def test_wrong_constants_are_declined(case, pass_name):
    kwargs, why = NEGATIVE[case]
    m = gelu_model(**{"opset": 20, **kwargs})
    assert_rewrite(pass_name, m, feeds(m), expect_fired=False, absent_ops=(
        "Gelu", "com.microsoft.Gelu", "com.microsoft.FastGelu", "com.microsoft.BiasGelu"))
    got = reasons(m, pass_name)
    assert len(got) == 1 and why in got[0], got


def test_sigmoid_with_computed_alpha_is_not_a_candidate():
    b = Builder(17)
    b.inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4, N]) for n in ("x", "k")]
    y = b.op("Mul", b.op("Sigmoid", b.op("Mul", "x", "k")), "x")
    m = b.model(y, [2, 4, N])
    f = {"x": RNG.standard_normal((2, 4, N)).astype(np.float32), "k": np.ones((2, 4, N), np.float32)}
    assert_rewrite("gelu_ort", m, f, expect_fired=False, expect_ops={"Sigmoid": 1})


# ---- zoo exports -----------------------------------------------------------------------------------


def test_zoo_upgraded_to_opset_20_gets_standard_gelu_at_O2():
    """BERT (erf GELU) and GPT-2 (tanh GELU), one GELU per layer, 2 layers (BERT's pooler keeps
    its plain Tanh)."""
    for name, opset, tanh in (("bert", 17, 1), ("gpt2", 14, 0)):
        path = zoo.build(name, size="tiny", exporter="legacy", opset=opset)
        out = assert_rewrite(2, path, zoo.sample_feeds(name, path), opset=20, expect_ops={"Gelu": 2, "Tanh": tanh},
                             absent_ops=("Erf",), disable=["merge_qkv"])
        assert not [k for k in op_counts(out) if "." in k]


def test_fused_kernel_dtypes_come_from_the_catalogue():
    """A float16 GELU: the cpu target has no float16 fused GELU (declined with the catalogue's types),
    cuda has one (fused; not run here, onnxruntime's CPU EP lacks the float16 kernel)."""
    import onnxopt
    from oracle import declined, op_counts

    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array(v, np.float16), n) for n, v in
              (("sq", 1.4142135), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("Div", ["x", "sq"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT16, [2, 4])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("y")], consts),
                              opset_imports=[helper.make_opsetid("", 17)])
    cpu = onnxopt.compile(model, opt_level=3, verify_outputs=False)
    assert declined(cpu.report, "gelu_ort") == ["Gelu on cpu takes float32, not float16"]
    cuda = onnxopt.compile(model, opt_level=3, target="cuda", verify_outputs=False)
    assert op_counts(cuda.model)["com.microsoft.Gelu"] == 1
