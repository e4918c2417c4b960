"""fold_bias through the oracle: per-channel Add/Mul after Conv/ConvTranspose fold into the
weights and bias; 2-D MatMul + Add becomes Gemm; each precondition, when it fails, stops the
rewrite; N-D MatMul + Add and computed operands are left alone without flooding the report."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.bench import zoo
from oracle import assert_rewrite, op_counts, run_ort

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
W_4x3 = "float[4, 3, 1, 1] w = {1.0, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0, 2.0, -2.0, 0.1, 0.2, 0.3}"
B_4 = "float[4] b = {0.5, -0.5, 1.0, 2.0}"
X_FEED = {"x": np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)}


def parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(HEADER + text)


def conv_model(consumer: str, const: str, *, bias: bool = False, extra_inputs: str = "", extra_outputs: str = "",
               extra_nodes: str = "", x_shape: str = "[2, 3, 5, 5]", y_shape: str = "[2, 4, 5, 5]") -> onnx.ModelProto:
    conv = "Conv(x, w, b)" if bias else "Conv(x, w)"
    return parse(f"""
    g (float{x_shape} x{extra_inputs}) => (float{y_shape} y{extra_outputs}) <{W_4x3}, {B_4}, {const}> {{
        t = {conv}
        y = {consumer}
        {extra_nodes}
    }}""")


def fold_bias_report(model, **options) -> dict:
    opts = {"opt_level": 0, "enable": ["fold_bias"], **options}
    result = onnxopt.compile(model, verify_outputs=False, **opts)
    return next(p for p in result.report["passes"] if p["name"] == "fold_bias")


def reasons(model, **options) -> list[str]:
    return [d["reason"] for d in fold_bias_report(model, **options)["declined"]]


def conv_inputs(proto) -> list[list[str]]:
    return [list(n.input) for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")]


# ---- Conv + Add ------------------------------------------------------------------------------


@pytest.mark.parametrize("const", [
    "float[1, 4, 1, 1] c = {1.0, 2.0, 3.0, 4.0}",
    "float[4, 1, 1] c = {1.0, 2.0, 3.0, 4.0}",
    "float[1] c = {0.25}",
    "float[1, 1, 1, 1] c = {0.25}",
])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_add_folds_into_bias(const, bias):
    m = conv_model("Add(t, c)", const, bias=bias)
    out = assert_rewrite("fold_bias", m, X_FEED, expect_ops={"Conv": 1, "Add": 0}, expect_fired=True)
    assert conv_inputs(out) == [["x", "w", "b.biasfold" if bias else "c.biasfold"]]


def test_conv_add_commuted_operands():
    m = conv_model("Add(c, t)", "float[4, 1, 1] c = {1.0, 2.0, 3.0, 4.0}", bias=True)
    assert_rewrite("fold_bias", m, X_FEED, expect_ops={"Conv": 1, "Add": 0}, expect_fired=True)


def test_conv_add_with_shared_weights_folds():
    # Only the bias changes, so the weights may be shared.
    m = conv_model("Add(t, c)", "float[4, 1, 1] c = {1.0, 2.0, 3.0, 4.0}",
                   extra_outputs=", float[2, 4, 5, 5] z", extra_nodes="z = Conv(x, w)")
    out = assert_rewrite("fold_bias", m, X_FEED, expect_ops={"Conv": 2, "Add": 0}, expect_fired=True)
    assert sorted(conv_inputs(out)) == [["x", "w"], ["x", "w", "c.biasfold"]]


# ---- Conv + Mul ------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_conv_mul_folds_into_weights(bias):
    m = conv_model("Mul(t, s)", "float[4, 1, 1] s = {2.0, -1.0, 0.5, 3.0}", bias=bias)
    out = assert_rewrite("fold_bias", m, X_FEED, expect_ops={"Conv": 1, "Mul": 0}, expect_fired=True)
    assert conv_inputs(out) == [["x", "w.mulfold"] + (["b.mulfold"] if bias else [])]


def test_conv_mul_add_chain_folds_completely():
    m = parse(f"""
    g (float[2, 3, 5, 5] x) => (float[2, 4, 5, 5] y) <{W_4x3}, {B_4}, float[1, 4, 1, 1] s = {{2.0, -1.0, 0.5, 3.0}},
                                                      float[4, 1, 1] c = {{1.0, 2.0, 3.0, 4.0}}> {{
        t = Conv(x, w, b)
        u = Mul(s, t)
        y = Add(u, c)
    }}""")
    assert_rewrite("fold_bias", m, X_FEED, expect_ops={"Conv": 1, "Mul": 0, "Add": 0}, expect_fired=True)


def test_conv_transpose_groups_mul_add():
    m = parse("""
    g (float[1, 4, 3, 3] x) => (float[1, 6, 7, 7] y) <float[4, 3, 3, 3] w = {%s}, float[6] b = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0},
                                                    float[6, 1, 1] s = {1.0, -2.0, 0.5, 3.0, 0.25, -1.0},
                                                    float[1, 6, 1, 1] c = {0.5, 0.5, -0.5, 1.0, 2.0, 0.0}> {
        t = ConvTranspose <group = 2, strides = [2, 2]> (x, w, b)
        u = Mul(t, s)
        y = Add(u, c)
    }""" % ", ".join(str(float(v % 7 - 3)) for v in range(108)))
    feeds = {"x": np.random.default_rng(1).normal(size=(1, 4, 3, 3)).astype(np.float32)}
    assert_rewrite("fold_bias", m, feeds, expect_ops={"ConvTranspose": 1, "Mul": 0, "Add": 0}, expect_fired=True)


# ---- Conv preconditions ----------------------------------------------------------------------


def test_computed_operand_is_quietly_left_alone():
    # A residual add is not a bias: no fold, and nothing in the report.
    m = conv_model("Add(t, r)", "float[1] unused = {0.0}", extra_inputs=", float[2, 4, 5, 5] r")
    feeds = {**X_FEED, "r": np.ones((2, 4, 5, 5), np.float32)}
    assert_rewrite("fold_bias", m, feeds, expect_ops={"Add": 1}, expect_fired=False)
    assert reasons(m) == []


def test_overridable_bias_is_not_folded():
    m = conv_model("Add(t, c)", "float[4, 1, 1] c = {1.0, 2.0, 3.0, 4.0}", extra_inputs=", float[4, 1, 1] c")
    assert_rewrite("fold_bias", m, expect_ops={"Add": 1}, expect_fired=False)
    assert any("'c' is a graph input" in r for r in reasons(m))


@pytest.mark.parametrize("const, x_shape, y_shape, why", [
    # [C] broadcasts along the last (width) axis of a 4-D output: not a per-channel bias.
    ("float[4] c = {1.0, 2.0, 3.0, 4.0}", [2, 3, 5, 4], [2, 4, 5, 4], "varies along axis 3"),
    ("float[2, 1, 1, 1] c = {1.0, 2.0}", [2, 3, 5, 5], [2, 4, 5, 5], "varies along axis 0"),
    ("float[1, 1, 5, 1] c = {1.0, 2.0, 3.0, 4.0, 5.0}", [2, 3, 5, 5], [2, 4, 5, 5], "varies along axis 2"),
    ("float[1, 1, 1, 1, 1] c = {1.0}", [2, 3, 5, 5], [1, 2, 4, 5, 5], "higher rank"),
])
@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_non_channel_broadcast_is_not_folded(const, x_shape, y_shape, why, op):
    m = conv_model(f"{op}(t, c)", const, x_shape=str(x_shape), y_shape=str(y_shape))
    feeds = {"x": np.random.default_rng(0).normal(size=x_shape).astype(np.float32)}
    assert_rewrite("fold_bias", m, feeds, expect_ops={op: 1}, expect_fired=False)
    assert any(why in r for r in reasons(m))


def test_conv_output_used_elsewhere_is_not_folded():
    m = conv_model("Add(t, c)", "float[4, 1, 1] c = {1.0, 2.0, 3.0, 4.0}", bias=True,
                   extra_outputs=", float[2, 4, 5, 5] z", extra_nodes="z = Relu(t)")
    out = assert_rewrite("fold_bias", m, X_FEED, expect_ops={"Add": 1}, expect_fired=False)
    assert conv_inputs(out) == [["x", "w", "b"]]
    assert any("has 2 users" in r for r in reasons(m))


def test_mul_with_shared_weights_is_not_folded():
    m = conv_model("Mul(t, s)", "float[4, 1, 1] s = {2.0, -1.0, 0.5, 3.0}",
                   extra_outputs=", float[2, 4, 5, 5] z", extra_nodes="z = Conv(x, w)")
    out = assert_rewrite("fold_bias", m, X_FEED, expect_ops={"Mul": 1}, expect_fired=False)
    assert conv_inputs(out) == [["x", "w"], ["x", "w"]]
    assert any("weights 'w' is shared" in r for r in reasons(m))


def test_add_with_shared_conv_bias_is_not_folded():
    m = conv_model("Add(t, c)", "float[4, 1, 1] c = {1.0, 2.0, 3.0, 4.0}", bias=True,
                   extra_outputs=", float[2, 4, 5, 5] z", extra_nodes="z = Conv(x, w, b)")
    assert_rewrite("fold_bias", m, X_FEED, expect_ops={"Add": 1, "Conv": 2}, expect_fired=False)
    assert any("bias 'b' is shared" in r for r in reasons(m))


def test_mul_with_non_constant_weights_is_not_folded():
    m = parse("""
    g (float[2, 3, 5, 5] x, float[4, 3, 1, 1] w) => (float[2, 4, 5, 5] y) <float[4, 1, 1] s = {2.0, -1.0, 0.5, 3.0}> {
        t = Conv(x, w)
        y = Mul(t, s)
    }""")
    assert_rewrite("fold_bias", m, expect_ops={"Mul": 1}, expect_fired=False)
    assert any("weights 'w' is a graph input" in r for r in reasons(m))


# ---- MatMul + Add -> Gemm --------------------------------------------------------------------

W_3x4 = "float[3, 4] w = {1.0, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0, 2.0, -2.0, 0.1, 0.2, 0.3}"


def matmul_model(a_type: str, add: str, const: str, out_type: str, elem: str = "float", w: str = W_3x4):
    return parse(f"""
    g ({elem}{a_type} x) => ({elem}{out_type} y) <{w}, {const}> {{
        t = MatMul(x, w)
        y = {add}
    }}""")


@pytest.mark.parametrize("const", ["float[4] c = {1.0, 2.0, 3.0, 4.0}", "float[1, 4] c = {1.0, 2.0, 3.0, 4.0}",
                                   "float[1] c = {0.5}"])
@pytest.mark.parametrize("add", ["Add(t, c)", "Add(c, t)"])
def test_matmul_2d_add_becomes_gemm(const, add):
    m = matmul_model("[N, 3]", add, const, "[N, 4]")
    feeds = {"x": np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)}
    out = assert_rewrite("fold_bias", m, feeds, expect_ops={"Gemm": 1, "MatMul": 0, "Add": 0}, expect_fired=True)
    assert [list(n.input) for n in out.graph.node] == [["x", "w", "c"]]


def test_matmul_nd_add_is_left_alone_quietly():
    m = matmul_model("[2, 5, 3]", "Add(t, c)", "float[4] c = {1.0, 2.0, 3.0, 4.0}", "[2, 5, 4]")
    assert_rewrite("fold_bias", m, expect_ops={"MatMul": 1, "Add": 1}, expect_fired=False)
    rec = fold_bias_report(m)
    assert [d["node"] for d in rec["declined"]] == [""]  # one summary line, no per-node entries
    assert rec["declined"][0]["reason"].startswith("1 MatMul + constant Add left as they are")


def test_matmul_int_is_not_made_gemm():
    m = matmul_model("[N, 3]", "Add(t, c)", "int32[4] c = {1, 2, 3, 4}", "[N, 4]", elem="int32",
                     w="int32[3, 4] w = {1, 2, 3, -1, 5, 0, 2, 2, -2, 1, 2, 3}")
    feeds = {"x": np.arange(6, dtype=np.int32).reshape(2, 3)}
    assert_rewrite("fold_bias", m, feeds, expect_ops={"MatMul": 1, "Add": 1, "Gemm": 0}, expect_fired=False)
    assert any("no Gemm kernel" in r for r in reasons(m))


def test_matmul_batch_varying_bias_is_not_made_gemm():
    m = matmul_model("[2, 3]", "Add(t, c)", "float[2, 4] c = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}", "[2, 4]")
    assert_rewrite("fold_bias", m, expect_ops={"MatMul": 1, "Add": 1}, expect_fired=False)
    assert any("does not broadcast to [4] or [1, 4]" in r for r in reasons(m))


def test_matmul_non_constant_weights_are_not_made_gemm():
    m = parse("""
    g (float[N, 3] x, float[3, 4] w) => (float[N, 4] y) <float[4] c = {1.0, 2.0, 3.0, 4.0}> {
        t = MatMul(x, w)
        y = Add(t, c)
    }""")
    assert_rewrite("fold_bias", m, expect_ops={"MatMul": 1, "Add": 1}, expect_fired=False)
    assert any("MatMul's B 'w' is a graph input" in r for r in reasons(m))


def test_matmul_non_constant_bias_is_quietly_left_alone():
    m = parse(f"""
    g (float[N, 3] x, float[4] c) => (float[N, 4] y) <{W_3x4}> {{
        t = MatMul(x, w)
        y = Add(t, c)
    }}""")
    assert_rewrite("fold_bias", m, expect_ops={"MatMul": 1, "Add": 1}, expect_fired=False)
    assert reasons(m) == []


# ---- real exporters --------------------------------------------------------------------------


def _frozen_bn_module():
    """Conv -> x * scale + shift with [1, C, 1, 1] parameters (torchvision's FrozenBatchNorm2d
    style), then a Linear on a 2-D tensor written as x @ W + b."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.scale = nn.Parameter(torch.rand(1, 6, 1, 1, generator=g) + 0.5)
            self.shift = nn.Parameter(torch.randn(1, 6, 1, 1, generator=g))
            self.w = nn.Parameter(torch.randn(6, 4, generator=g))
            self.b = nn.Parameter(torch.randn(4, generator=g))

        def forward(self, x):
            y = torch.relu(self.conv(x) * self.scale + self.shift)
            return y.mean(dim=(2, 3)) @ self.w + self.b

    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_torch_export_folds(exporter):
    import torch

    module = _frozen_bn_module()
    x = torch.randn(2, 3, 8, 8)
    if exporter == "legacy":
        buf = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=13, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        model = onnx.load_model_from_string(buf.getvalue())
    else:
        model = torch.onnx.export(module, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
                                  optimize=True, verify=False, report=False).model_proto
    before = op_counts(model)
    assert before["Mul"] == 1 and before["MatMul"] + before["Gemm"] == 1
    compiled = assert_rewrite(2, model, {"x": x.numpy()}, expect_ops={"Conv": 1, "Mul": 0, "Gemm": 1, "MatMul": 0})
    assert op_counts(compiled)["Add"] == 0
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(compiled, {"x": x.numpy()})["y"], module(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(name="bert", opset=13), dict(name="bert", exporter="dynamo")],
                         ids=["bert-legacy13", "bert-dynamo"])
def test_transformer_matmuls_are_not_touched(variant):
    # [batch, seq, hidden] projections keep MatMul + Add for the -O3 fusions, and the report has
    # at most one summary line about them.
    # -O1 cleanups plus fold_bias alone, so that other -O2 passes do not change the counts.
    path = zoo.build(**variant)
    result = onnxopt.compile(path, opt_level=1, enable=["fold_bias"], verify_outputs=False)
    rec = next(p for p in result.report["passes"] if p["name"] == "fold_bias")
    assert rec["fired"] == 0 and rec["declined_count"] <= 1
    before, after = result.report["ops_before"], result.report["ops_after"]
    assert after.get("MatMul") == before.get("MatMul") and after.get("Gemm") == before.get("Gemm")
