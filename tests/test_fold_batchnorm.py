"""fold_batchnorm through the oracle: zoo CNNs lose every BatchNormalization with unchanged numbers;
ConvTranspose / Gemm / MatMul producers fold; each precondition, when it fails, stops the fold (and
says why in the report), leaving a BN that becomes Mul + Add or stays."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.bench import zoo
from oracle import assert_rewrite, op_counts, run_ort

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
_PARAMS = {"g": "1.5, -0.5, 2.0, 0.75", "be": "0.1, -0.2, 0.3, 0.0", "mu": "0.5, -1.0, 0.25, 2.0", "va": "0.5, 2.0, 1.0, 0.1"}


def bn_params(*skip: str) -> str:
    return ", ".join(f"float[4] {k} = {{{v}}}" for k, v in _PARAMS.items() if k not in skip)


BN_PARAMS = bn_params()
W_4x3 = "float[4, 3, 1, 1] w = {1.0, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0, 2.0, -2.0, 0.1, 0.2, 0.3}"


def parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(HEADER + text)


def report(model, pass_name="fold_batchnorm", **options) -> dict:
    opts = {"opt_level": 0, "enable": [pass_name], **options}
    result = onnxopt.compile(model, verify_outputs=False, **opts)
    return next(p for p in result.report["passes"] if p["name"] == pass_name)


def reasons(model, **options) -> list[str]:
    return [d["reason"] for d in report(model, **options)["declined"]]


# ---- zoo models ------------------------------------------------------------------------------

ZOO = [
    dict(name="resnet", opset=13),
    dict(name="resnet", opset=17),
    dict(name="resnet", exporter="dynamo"),
    dict(name="mobilenetv2", opset=14),
    dict(name="cnn", opset=13),
    dict(name="cnn", exporter="dynamo"),
    dict(name="digits_cnn", opset=13),
    dict(name="efficientnet_lite0", opset=13),
]


@pytest.mark.parametrize("variant", ZOO, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_zoo_cnn_loses_every_batchnorm(variant):
    path = zoo.build(**variant)
    original = onnx.load(str(path))
    before = op_counts(original)
    assert before["BatchNormalization"] > 0
    compiled = assert_rewrite(2, path, zoo.sample_feeds(variant["name"], path), absent_ops=("BatchNormalization",))
    assert op_counts(compiled)["Conv"] == before["Conv"]
    # Every BN folded into its Conv rather than becoming Mul + Add (-O1 cleanups plus this pass
    # alone, so that other -O2 passes do not change the counts).
    result = onnxopt.compile(path, opt_level=1, enable=["fold_batchnorm"], verify_outputs=False)
    rec = next(p for p in result.report["passes"] if p["name"] == "fold_batchnorm")
    assert rec["fired"] == before["BatchNormalization"] and rec["declined"] == []
    ops_o1 = onnxopt.compile(path, opt_level=1, verify_outputs=False).report["ops_after"]
    ops = result.report["ops_after"]
    assert ops.get("Mul", 0) == ops_o1.get("Mul", 0) and ops.get("Add", 0) == ops_o1.get("Add", 0)
    assert ops.get("Conv") == ops_o1.get("Conv") and "BatchNormalization" not in ops


def test_pass_alone_on_dynamo_export():
    path = zoo.build("resnet", exporter="dynamo")
    assert_rewrite("fold_batchnorm", path, zoo.sample_feeds("resnet", path),
                   expect_ops={"BatchNormalization": 0, "Conv": 9, "Mul": 0}, expect_fired=True)


# ---- small torch exports ---------------------------------------------------------------------


def _torch_export(module, x) -> onnx.ModelProto:
    """Legacy export keeping BN as a node, as the zoo does for CNNs."""
    import torch
    from torch.onnx import TrainingMode

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), (x,), buf, dynamo=False, opset_version=13, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                          do_constant_folding=False, training=TrainingMode.PRESERVE)
    return onnx.load_model_from_string(buf.getvalue())


def _torch_cases():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return {
        "conv_transpose_groups": (nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)),
                                  torch.randn(2, 4, 5, 5), "ConvTranspose"),
        "conv1d": (nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), torch.randn(2, 3, 7), "Conv"),
        "grouped_conv": (nn.Sequential(nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8)),
                         torch.randn(2, 4, 6, 6), "Conv"),
        "linear_gemm": (nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(5)), torch.randn(3, 8), "Gemm"),
        # Without a bias the legacy exporter writes Transpose + MatMul; -O1 folds the Transpose.
        "linear_matmul": (nn.Sequential(nn.Linear(8, 5, bias=False), nn.BatchNorm1d(5)), torch.randn(3, 8), "Gemm"),
    }


@pytest.mark.parametrize("case", ["conv_transpose_groups", "conv1d", "grouped_conv", "linear_gemm", "linear_matmul"])
def test_torch_exports_fold(case):
    module, x, producer = _torch_cases()[case]
    model = _torch_export(module, x)
    feeds = {"x": x.numpy()}
    compiled = assert_rewrite(2, model, feeds, expect_ops={"BatchNormalization": 0, producer: 1, "Mul": 0, "Add": 0})
    # The export itself must agree with torch (so the oracle compares against the right numbers).
    import torch

    with torch.no_grad():
        np.testing.assert_allclose(run_ort(compiled, feeds)["y"], module(x).numpy(), rtol=1e-4, atol=1e-5)


# ---- hand-written producers ------------------------------------------------------------------


def test_gemm_trans_b_beta_folds():
    m = parse(f"""
    g (float[N, 3] x) => (float[N, 4] y) <float[4, 3] w = {{1.0, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0, 2.0, -2.0, 0.1, 0.2, 0.3}},
                                          float[1, 4] c = {{0.5, 1.0, -1.0, 2.0}}, {BN_PARAMS}> {{
        t = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, c)
        y = BatchNormalization <epsilon = 0.01> (t, g, be, mu, va)
    }}""")
    out = assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "Gemm": 1}, expect_fired=True)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert {a.name for a in gemm.attribute} == {"transB", "alpha"}  # beta folded into C
    assert list(gemm.input) == ["x", "w.bnfold", "c.bnfold"]


def test_matmul_2d_becomes_gemm():
    m = parse(f"""
    g (float[N, 3] x) => (float[N, 4] y) <float[3, 4] w = {{1.0, 2.0, 3.0, -1.0, 0.5, 0.0, 2.0, 2.0, -2.0, 0.1, 0.2, 0.3}}, {BN_PARAMS}> {{
        t = MatMul(x, w)
        y = BatchNormalization(t, g, be, mu, va)
    }}""")
    assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "MatMul": 0, "Gemm": 1}, expect_fired=True)


def test_conv_without_bias_gets_one():
    m = parse(f"""
    g (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y) <{W_4x3}, {BN_PARAMS}> {{
        t = Conv(x, w)
        y = BatchNormalization(t, g, be, mu, va)
    }}""")
    out = assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "Conv": 1}, expect_fired=True)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert list(conv.input) == ["x", "w.bnfold", "w.bnfold_bias"]


def test_fresh_names_do_not_clash():
    # The name the fold would give the new bias is taken already.
    m = parse(f"""
    g (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y) <{W_4x3}, float[4, 1, 1] taken = {{9.0, 9.0, 9.0, 9.0}}, {BN_PARAMS}> {{
        t = Conv(x, w)
        u = BatchNormalization(t, g, be, mu, va)
        y = Add(u, taken)
    }}""")
    m.graph.initializer[1].name = "w.bnfold_bias"
    m.graph.node[-1].input[1] = "w.bnfold_bias"
    out = assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "Add": 1}, expect_fired=True)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert list(conv.input) == ["x", "w.bnfold", "w.bnfold_bias.1"]


# ---- fallback: a BN with nothing to fold into -----------------------------------------------


@pytest.mark.parametrize("shape", ["[2, 4, 3, 3]", "[2, 4]", "[2, 4, 5]"])
def test_lone_batchnorm_becomes_mul_add(shape):
    m = parse(f"""
    g (float{shape} x) => (float{shape} y) <{BN_PARAMS}> {{
        r = Relu(x)
        y = BatchNormalization <epsilon = 0.001> (r, g, be, mu, va)
    }}""")
    out = assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "Mul": 1, "Add": 1}, expect_fired=True)
    scale = next(i for i in out.graph.initializer if i.name == "g.bn_scale")
    assert list(scale.dims) == [4] + [1] * (shape.count(",") - 1)


# ---- preconditions: each must stop the fold --------------------------------------------------


def test_parameters_that_are_graph_inputs_block_everything():
    m = parse(f"""
    g (float[1, 3, 5, 5] x, float[4] g) => (float[1, 4, 5, 5] y) <{W_4x3}, {bn_params("g")}> {{
        t = Conv(x, w)
        y = BatchNormalization(t, g, be, mu, va)
    }}""")
    feeds = {"x": np.random.default_rng(0).normal(size=(1, 3, 5, 5)).astype(np.float32),
             "g": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
    assert_rewrite("fold_batchnorm", m, feeds, expect_ops={"BatchNormalization": 1}, expect_fired=False)
    assert any("scale (gamma) 'g' is a graph input" in r for r in reasons(m))


def test_overridable_initializer_parameters_are_not_folded():
    m = parse(f"""
    g (float[1, 3, 5, 5] x, float[4] va) => (float[1, 4, 5, 5] y) <{W_4x3}, {BN_PARAMS}> {{
        t = Conv(x, w)
        y = BatchNormalization(t, g, be, mu, va)
    }}""")
    assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 1}, expect_fired=False)
    assert any("'va' is a graph input" in r for r in reasons(m))


def test_training_mode_is_not_folded():
    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 15]>' + f"""
    g (float[2, 3, 5, 5] x) => (float[2, 4, 5, 5] y) <{W_4x3}, {BN_PARAMS}> {{
        t = Conv(x, w)
        y, rm, rv = BatchNormalization <training_mode = 1> (t, g, be, mu, va)
    }}""")
    assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 1, "Mul": 0}, expect_fired=False)
    assert any("training mode" in r for r in reasons(m))


def test_shared_weights_are_not_folded():
    m = parse(f"""
    g (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y, float[1, 4, 5, 5] z) <{W_4x3}, {BN_PARAMS}> {{
        t = Conv(x, w)
        y = BatchNormalization(t, g, be, mu, va)
        u = Conv <pads = [0, 0, 0, 0]> (x, w)
        z = Relu(u)
    }}""")
    out = assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "Conv": 2, "Mul": 1, "Add": 1})
    assert all(list(n.input) == ["x", "w"] for n in out.graph.node if n.op_type == "Conv")
    assert any("'w' is shared (2 uses)" in r for r in reasons(m))


def test_shared_bias_is_not_folded():
    m = parse(f"""
    g (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y, float[1, 4] z) <{W_4x3}, float[4] b = {{1.0, 2.0, 3.0, 4.0}}, {BN_PARAMS}> {{
        t = Conv(x, w, b)
        y = BatchNormalization(t, g, be, mu, va)
        s = Unsqueeze(b, zero)
        z = Relu(s)
    }}""".replace("<" + W_4x3, "<int64[1] zero = {0}, " + W_4x3))
    assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "Mul": 1, "Add": 1})
    assert any("bias 'b' is shared" in r for r in reasons(m))


def test_non_constant_weights_are_not_folded():
    m = parse(f"""
    g (float[1, 3, 5, 5] x, float[4, 3, 1, 1] w) => (float[1, 4, 5, 5] y) <{BN_PARAMS}> {{
        t = Conv(x, w)
        y = BatchNormalization(t, g, be, mu, va)
    }}""")
    assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "Conv": 1, "Mul": 1, "Add": 1})
    assert any("Conv weights 'w' is a graph input" in r for r in reasons(m))


def test_conv_output_used_elsewhere_is_not_folded():
    m = parse(f"""
    g (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y, float[1, 4, 5, 5] z) <{W_4x3}, {BN_PARAMS}> {{
        t = Conv(x, w)
        y = BatchNormalization(t, g, be, mu, va)
        z = Relu(t)
    }}""")
    out = assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "Conv": 1, "Mul": 1, "Add": 1})
    assert [list(n.input) for n in out.graph.node if n.op_type == "Conv"] == [["x", "w"]]
    assert any("has 2 users" in r for r in reasons(m))


def test_matmul_nd_is_not_folded():
    # BN's channel axis 1 is the MatMul's sequence axis here, not its output (last) axis.
    m = parse(f"""
    g (float[2, 4, 3] x) => (float[2, 4, 5] y) <float[3, 5] w = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0}},
                                               {BN_PARAMS}> {{
        t = MatMul(x, w)
        y = BatchNormalization(t, g, be, mu, va)
    }}""")
    assert_rewrite("fold_batchnorm", m, expect_ops={"BatchNormalization": 0, "MatMul": 1, "Gemm": 0, "Mul": 1, "Add": 1})
    assert any("MatMul output has rank 3" in r for r in reasons(m))


def test_unknown_rank_is_left_alone():
    m = parse(f"""
    g (float[24] x, int64[3] s) => (float[N, M] y) <{BN_PARAMS}> {{
        r = Reshape(x, s)
        b = BatchNormalization(r, g, be, mu, va)
        y = Flatten(b)
    }}""")
    feeds = {"x": np.random.default_rng(0).normal(size=24).astype(np.float32), "s": np.array([2, 4, 3])}
    assert_rewrite("fold_batchnorm", m, feeds, expect_ops={"BatchNormalization": 1}, expect_fired=False)
    assert any("rank is unknown" in r for r in reasons(m))
