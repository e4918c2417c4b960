"""Before/Expected: each pass, alone, turns a small graph into exactly the expected graph (compared as
canonical onnx.printer text, see oracle.canonical_text), besides passing the numeric oracle.

Pins what the rewrite produces (attributes, folded values, input order), which op counts cannot."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import assert_rewrites_to


def _model(body: str, opset: int = 17, inits: str = "", sig: str = "(float[2] x) => (float[2] y)") -> str:
    inits = f" <{inits}>" if inits else ""
    return f'<ir_version: 8, opset_import: ["" : {opset}]>\nagraph {sig}{inits} {{\n{body}\n}}'


def _values(a: np.ndarray) -> str:
    return "{" + ", ".join(repr(float(v)) for v in np.asarray(a, np.float32).ravel()) + "}"


GELU_ERF = """
    d = Div(h, sq)
    e = Erf(d)
    a = Add(e, one)
    m = Mul(h, a)
    y = Mul(m, half)"""
GELU_CONSTS = "float sq = {1.4142135}, float one = {1.0}, float half = {0.5}"
LN_INITS = "float[4] g = {1, 2, 3, 4}, float[4] bt = {0.5, 0.5, 0.5, 0.5}"
LN_BODY = """
    m = ReduceMean <axes = [-1]> (x)
    d = Sub(x, m)
    p = Pow(d, two)
    v = ReduceMean <axes = [-1]> (p)
    e = Add(v, eps)
    s = Sqrt(e)
    n = Div(d, s)
    t = Mul(n, g)
    y = Add(t, bt)"""
SIG_24 = "(float[2, 4] x) => (float[2, 4] y)"

CASES = {
    "canonicalize": (
        _model("    t = Neg(x)\n    y = Relu(t)"),
        _model("    a = Neg(x)\n    y = Relu(a)"), {}),
    "fold_constants": (
        _model("""    a = Constant <value = float[2] {1.0, 2.0}> ()
    b = Constant <value = float[2] {3.0, 4.0}> ()
    c = Add(a, b)
    y = Mul(x, c)"""),
        # The sum is folded; the Constants it read are dead code, dead_code's job.
        _model("""    a = Constant <value = float[2] {1.0, 2.0}> ()
    b = Constant <value = float[2] {3.0, 4.0}> ()
    y = Mul(x, c)""", inits="float[2] c = {4.0, 6.0}"), {}),
    "remove_noops": (
        _model("""    a = Identity(x)
    b = Transpose <perm = [0, 1]> (a)
    c = Reshape(b, s)
    y = Relu(c)""", inits="int64[2] s = {2, 3}", sig="(float[2, 3] x) => (float[2, 3] y)"),
        _model("    y = Relu(x)", sig="(float[2, 3] x) => (float[2, 3] y)"), {}),
    "cse": (
        _model("    a = Relu(x)\n    b = Relu(x)\n    y = Add(a, b)"),
        _model("    a = Relu(x)\n    y = Add(a, a)"), {}),
    "deduplicate_initializers": (
        _model("    t = Add(x, a)\n    y = Mul(t, b)", inits="float[2] a = {1.0, 2.0}, float[2] b = {1.0, 2.0}"),
        _model("    t = Add(x, a)\n    y = Mul(t, a)", inits="float[2] a = {1.0, 2.0}"), {}),
    "lift_constants": (
        _model("    a = Constant <value = float[2] {1.0, 2.0}> ()\n    y = Add(x, a)"),
        _model("    y = Add(x, a)", inits="float[2] a = {1.0, 2.0}"), {}),
    "fold_pad": (
        _model("    t = Pad(x, p)\n    y = Conv(t, w)", sig="(float[1, 1, 4, 4] x) => (float[1, 1, 4, 4] y)",
               inits="float[1, 1, 3, 3] w = {1, 1, 1, 1, 1, 1, 1, 1, 1}, int64[8] p = {0, 0, 1, 1, 0, 0, 1, 1}"),
        _model("    y = Conv <pads = [1, 1, 1, 1]> (x, w)", sig="(float[1, 1, 4, 4] x) => (float[1, 1, 4, 4] y)",
               inits="float[1, 1, 3, 3] w = {1, 1, 1, 1, 1, 1, 1, 1, 1}"), {}),
    "fold_batchnorm": (
        _model("    c = Conv(x, w)\n    y = BatchNormalization <epsilon = 0.0> (c, s, b, m, v)",
               sig="(float[1, 2, 3, 3] x) => (float[1, 2, 3, 3] y)",
               inits="float[2, 2, 1, 1] w = {1, 2, 3, 4}, float[2] s = {2, 4}, float[2] b = {1, -1}, "
                     "float[2] m = {0.5, 1.5}, float[2] v = {1, 3}"),
        # W * gamma / sqrt(var + eps) per output channel; bias (0 - mean) * that + beta.
        _model("    y = Conv(x, w, b)", sig="(float[1, 2, 3, 3] x) => (float[1, 2, 3, 3] y)",
               inits=f"float[2, 2, 1, 1] w = {_values([2, 4, 3 * 4 / np.sqrt(3), 4 * 4 / np.sqrt(3)])}, "
                     f"float[2] b = {_values([0.0, -1.5 * 4 / np.sqrt(3) - 1])}"), {}),
    "fold_bias": (
        _model("    c = Conv(x, w)\n    y = Add(c, b)", sig="(float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y)",
               inits="float[4, 3, 1, 1] w = {1,2,3,4,5,6,7,8,9,10,11,12}, float[1, 4, 1, 1] b = {1, 2, 3, 4}"),
        _model("    y = Conv(x, w, b)", sig="(float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y)",
               inits="float[4, 3, 1, 1] w = {1,2,3,4,5,6,7,8,9,10,11,12}, float[4] b = {1, 2, 3, 4}"), {}),
    "layernorm": (
        _model(LN_BODY, sig=SIG_24, inits=f"{LN_INITS}, float two = {{2.0}}, float eps = {{1e-5}}"),
        _model("    y = LayerNormalization <axis = -1, epsilon = 1e-5, stash_type = 1> (x, g, bt)", sig=SIG_24,
               inits=LN_INITS), {}),
    "layernorm_ort": (
        # Below opset 17 the fused kernel is SkipLayerNormalization(x, x): LayerNorm(2x, 4 eps) = LayerNorm(x, eps).
        _model(LN_BODY, opset=14, sig=SIG_24, inits=f"{LN_INITS}, float two = {{2.0}}, float eps = {{1e-5}}"),
        _model('    y = com.microsoft.SkipLayerNormalization <epsilon = 4e-5> (x, x, g, bt)', opset=14, sig=SIG_24,
               inits=LN_INITS).replace('["" : 14]', '["" : 14, "com.microsoft" : 1]'), {"target": "cuda"}),
    "skip_layernorm": (
        _model("    s = Add(x, r)\n    y = LayerNormalization <axis = -1, epsilon = 1e-5> (s, g, bt)",
               sig="(float[2, 4] x, float[2, 4] r) => (float[2, 4] y)", inits=LN_INITS),
        _model("    y = com.microsoft.SkipLayerNormalization <epsilon = 1e-5> (x, r, g, bt)",
               sig="(float[2, 4] x, float[2, 4] r) => (float[2, 4] y)",
               inits=LN_INITS).replace('["" : 17]', '["" : 17, "com.microsoft" : 1]'), {"target": "cuda"}),
    "gelu": (
        _model("    h = Identity(x)" + GELU_ERF, opset=20, sig=SIG_24, inits=GELU_CONSTS),
        _model("    h = Identity(x)\n    y = Gelu(h)", opset=20, sig=SIG_24), {}),
    "gelu_ort": (
        # A MatMul's constant bias before the GELU is absorbed: BiasGelu(MatMul(x, w), bias).
        _model("    mm = MatMul(x, w)\n    h = Add(mm, bias)" + GELU_ERF, sig=SIG_24,
               inits=f"float[4, 4] w = {_values(np.eye(4))}, float[4] bias = {{0.1, 0.2, 0.3, 0.4}}, {GELU_CONSTS}"),
        _model("    mm = MatMul(x, w)\n    y = com.microsoft.BiasGelu(mm, bias)", sig=SIG_24,
               inits=f"float[4, 4] w = {_values(np.eye(4))}, float[4] bias = {{0.1, 0.2, 0.3, 0.4}}"
               ).replace('["" : 17]', '["" : 17, "com.microsoft" : 1]'), {}),
    "merge_qkv": (
        _model("    q = MatMul(x, wq)\n    k = MatMul(x, wk)", sig="(float[2, 4] x) => (float[2, 2] q, float[2, 2] k)",
               inits="float[4, 2] wq = {1,2,3,4,5,6,7,8}, float[4, 2] wk = {8,7,6,5,4,3,2,1}"),
        _model("    qk = MatMul(x, w)\n    q, k = Split <axis = -1> (qk, sizes)",
               sig="(float[2, 4] x) => (float[2, 2] q, float[2, 2] k)",
               inits="float[4, 4] w = {1,2,8,7,3,4,6,5,5,6,4,3,7,8,2,1}, int64[2] sizes = {2, 2}"), {}),
    "dead_code": (
        _model("    a = Neg(x)\n    y = Relu(x)", inits="float[2] unused = {1, 2}"),
        _model("    y = Relu(x)"), {}),
    "canonicalize_final": (
        _model("    t = Neg(x)\n    y = Relu(t)"),
        _model("    a = Neg(x)\n    y = Relu(a)"), {}),
    "fp16": (
        # float16 where the target has the kernel (cuda: MatMul, Relu); the interface stays float32.
        _model("    mm = MatMul(x, w)\n    y = Relu(mm)", sig=SIG_24, inits=f"float[4, 4] w = {_values(np.eye(4))}"),
        _model("""    x16 = Cast <to = 10> (x)
    mm = MatMul(x16, w)
    r = Relu(mm)
    y = Cast <to = 1> (r)""", sig=SIG_24, inits=f"float16[4, 4] w = {{{', '.join(str(v) for v in np.eye(4, dtype=np.float16).view(np.uint16).ravel())}}}"),
        {"fp16": True, "target": "cuda", "rtol": 1e-2}),
}


def _attention_cases():
    """One self-attention block (2 heads of 4): stage 1 makes its core a com.microsoft
    MultiHeadAttention over the projections; stage 2 packs those into com.microsoft.Attention;
    unpack_attention (--int8) turns that back into one projection MatMul before MultiHeadAttention."""
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal((8, 8)).astype(np.float32) for n in "qkv"}
    b = {n: rng.standard_normal(8).astype(np.float32) for n in "qkv"}
    consts = ", ".join([f"float[8, 8] w{n} = {_values(w[n])}" for n in "qkv"] +
                       [f"float[8] b{n} = {_values(b[n])}" for n in "qkv"])
    sig = "(float[1, 4, 8] x) => (float[1, 4, 8] y)"
    proj = "\n".join(f"    {n}0 = MatMul(x, w{n})\n    {n}1 = Add({n}0, b{n})" for n in "qkv")
    heads = "\n".join(f"""    {n}2 = Reshape({n}1, split_heads)
    {n} = Transpose <perm = {'[0, 2, 3, 1]' if n == 'k' else '[0, 2, 1, 3]'}> ({n}2)""" for n in "qkv")
    before = _model(proj + "\n" + heads + """
    s0 = MatMul(q, k)
    s1 = Div(s0, scale)
    p = Softmax <axis = -1> (s1)
    c0 = MatMul(p, v)
    c1 = Transpose <perm = [0, 2, 1, 3]> (c0)
    y = Reshape(c1, merge_heads)""", sig=sig, inits=consts + ", int64[4] split_heads = {0, 0, 2, 4}, "
                    "int64[3] merge_heads = {0, 0, 8}, float scale = {2.0}")
    ms = lambda text: text.replace('["" : 17]', '["" : 17, "com.microsoft" : 1]')  # noqa: E731
    core = ms(_model(proj + "\n    y = com.microsoft.MultiHeadAttention <num_heads = 2, scale = 0.5> (q1, k1, v1)",
                     sig=sig, inits=consts))
    packed_w = np.concatenate([w["q"], w["k"], w["v"]], axis=1)
    packed_b = np.concatenate([b["q"], b["k"], b["v"]])
    packed = ms(_model("    y = com.microsoft.Attention <num_heads = 2, scale = 0.5> (x, w, b)", sig=sig,
                       inits=f"float[8, 24] w = {_values(packed_w)}, float[24] b = {_values(packed_b)}"))
    # With --int8, unpack_attention takes the packed projection back out (its split, not the three MatMuls).
    unpacked = ms(_model("""    p0 = MatMul(x, w)
    p1 = Add(p0, b)
    q, k, v = Split <axis = 2> (p1, sizes)
    y = com.microsoft.MultiHeadAttention <num_heads = 2, scale = 0.5> (q, k, v)""", sig=sig,
                         inits=f"float[8, 24] w = {_values(packed_w)}, float[24] b = {_values(packed_b)}, "
                               "int64[3] sizes = {8, 8, 8}"))
    return {"attention": (before, core, {}), "attention_qkv": (core, packed, {}),
            "unpack_attention": (packed, unpacked, {})}


CASES.update(_attention_cases())


@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_rewrites_to_expected_graph(name):
    before, expected, options = CASES[name]
    assert_rewrites_to(name, before, expected, **options)


def test_every_exact_pass_has_an_expected_graph():
    """A new exact pass comes with a Before/Expected case: here, or in its own test file as
    `assert_rewrites_to("name", ...)` (the lossy int8 and prune passes, whose results are data-dependent, and
    the interface-changing fold_initializer_inputs are pinned by their own tests)."""
    from pathlib import Path

    from onnxopt.passes import all_passes

    exempt = {"quantize_int8", "prune", "fold_initializer_inputs"}
    sources = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    missing = [p.name for p in all_passes()
               if p.name not in CASES | dict.fromkeys(exempt) and f'assert_rewrites_to("{p.name}"' not in sources]
    assert not missing, f"passes without a Before/Expected case: {missing}"
