"""onnxopt.kernels.folding against known answers and against onnxruntime's own kernels:
P(x; W', b') computed by onnxruntime must equal BN(P(x; W, b)) (or P * s, P + t) computed by
onnxruntime, for Conv (groups, 1-D/2-D), ConvTranspose (groups), Gemm (transB, beta, C shapes)
and MatMul."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxopt.kernels import folding

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _run(nodes, inits: dict, x: np.ndarray, opset: int = 17) -> np.ndarray:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def _bn_params(rng, c):
    return dict(
        gamma=rng.uniform(0.5, 2.0, c).astype(np.float32) * rng.choice([-1, 1], c),
        beta=rng.normal(size=c).astype(np.float32),
        mean=rng.normal(size=c).astype(np.float32),
        var=rng.uniform(0.1, 2.0, c).astype(np.float32),
    )


def _close(got, ref):
    scale = max(float(np.max(np.abs(ref))), 1e-6)
    assert float(np.max(np.abs(got - ref))) <= 1e-5 * scale


def test_known_answer():
    # s = 3 / sqrt(3 + 1) = 1.5; W' = 2 * 1.5 = 3; b' = (1 - 1) * 1.5 + 0.5 = 0.5
    w, b = folding.fold_batchnorm(np.array([[[[2.0]]]], np.float32), np.array([1.0], np.float32),
                                  [3.0], [0.5], [1.0], [3.0], 1.0, layout="conv")
    assert w.dtype == np.float32 and w.shape == (1, 1, 1, 1) and w.item() == 3.0
    assert b.dtype == np.float32 and b.tolist() == [0.5]
    # No bias: b' = -mean * s + beta = -1 * 1.5 + 0.5
    _, b = folding.fold_batchnorm(np.ones((1, 1, 1, 1), np.float32), None, [3.0], [0.5], [1.0], [3.0], 1.0,
                                  layout="conv")
    assert b.tolist() == [-1.0]


def test_conv_transpose_groups_known_answer():
    # W[C=4, M/g=1, 1, 1] with group=2 computes M=2 channels: channel 0 from W[0:2, 0], 1 from W[2:4, 0].
    w = np.arange(1, 5, dtype=np.float32).reshape(4, 1, 1, 1)
    out = folding.scale_output_channels(w, [10.0, 100.0], "conv_transpose", group=2)
    assert out.reshape(-1).tolist() == [10.0, 20.0, 300.0, 400.0]
    # Axis 1 alone (ignoring groups) would have needed one scale per M/g = 1 column: refused.
    with pytest.raises(ValueError):
        folding.scale_output_channels(w, [10.0, 100.0, 1.0], "conv_transpose", group=2)


def test_dtype_is_kept_and_math_in_float64():
    w = np.full((2, 1, 1, 1), 1.0009765625, np.float16)  # 1 + 2**-10
    new_w, new_b = folding.fold_batchnorm(w, None, [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0], 0.0,
                                          layout="conv")
    assert new_w.dtype == np.float16 and new_b.dtype == np.float16
    np.testing.assert_array_equal(new_w, w)


@pytest.mark.parametrize("shape, rank, expected", [
    ((4,), 4, None),            # broadcasts along the last (width) axis, not channels
    ((4, 1, 1), 4, [1, 2, 3, 4]),
    ((1, 4, 1, 1), 4, [1, 2, 3, 4]),
    ((4, 1), 3, [1, 2, 3, 4]),
    ((1,), 4, [7, 7, 7, 7]),
    ((), 4, [7, 7, 7, 7]),
    ((1, 1, 1, 4), 4, None),
    ((2, 4, 1, 1), 4, None),    # varies along the batch axis
    ((1, 1, 4, 1, 1), 4, None),  # would raise the output's rank
    ((4,), 2, [1, 2, 3, 4]),    # [N, C]: the last axis is the channel axis
    ((3, 1, 1), 4, None),       # wrong channel count
])
def test_channel_vector(shape, rank, expected):
    size = int(np.prod(shape))
    c = np.arange(1, size + 1, dtype=np.float32).reshape(shape) if size > 1 else np.full(shape, 7.0, np.float32)
    got = folding.channel_vector(c, rank, 4)
    assert (got is None) == (expected is None)
    if expected is not None:
        assert got.tolist() == expected


def test_channel_affine_broadcasts_on_axis_1():
    s, t = folding.channel_affine(np.array([1.0, 2.0]), np.array([3.0, 4.0]), 4)
    assert s.shape == (2, 1, 1) and t.shape == (2, 1, 1)
    x = np.ones((1, 2, 3, 5))
    y = x * s + t
    assert np.all(y[0, 0] == 4.0) and np.all(y[0, 1] == 6.0)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([1, 2, 4]), dims=st.sampled_from([1, 2]),
       with_bias=st.booleans(), eps=st.sampled_from([1e-5, 1e-3, 0.1]))
def test_conv_batchnorm_matches_onnxruntime(seed, group, dims, with_bias, eps):
    rng = np.random.default_rng(seed)
    c_in, m, k = 4, 8, 3
    w = rng.normal(size=(m, c_in // group) + (k,) * dims).astype(np.float32)
    b = rng.normal(size=m).astype(np.float32) if with_bias else None
    p = _bn_params(rng, m)
    x = rng.normal(size=(2, c_in) + (6,) * dims).astype(np.float32)
    conv_in = ["x", "w", "b"] if with_bias else ["x", "w"]
    inits = dict(w=w, **({"b": b} if with_bias else {}), **p)
    ref = _run([helper.make_node("Conv", conv_in, ["c"], group=group),
                helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=eps)],
               inits, x)
    new_w, new_b = folding.fold_batchnorm(w, b, **p, epsilon=eps, layout="conv", group=group)
    got = _run([helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group)], dict(w=new_w, b=new_b), x)
    _close(got, ref)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([1, 2, 3]), with_bias=st.booleans())
def test_conv_transpose_batchnorm_matches_onnxruntime(seed, group, with_bias):
    rng = np.random.default_rng(seed)
    c_in, m_per_group = 6, 2
    m = m_per_group * group
    w = rng.normal(size=(c_in, m_per_group, 3, 3)).astype(np.float32)
    b = rng.normal(size=m).astype(np.float32) if with_bias else None
    p = _bn_params(rng, m)
    x = rng.normal(size=(1, c_in, 4, 5)).astype(np.float32)
    attrs = dict(group=group, strides=[2, 2])
    conv_in = ["x", "w", "b"] if with_bias else ["x", "w"]
    ref = _run([helper.make_node("ConvTranspose", conv_in, ["c"], **attrs),
                helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])],
               dict(w=w, **({"b": b} if with_bias else {}), **p), x)
    new_w, new_b = folding.fold_batchnorm(w, b, **p, layout="conv_transpose", group=group)
    got = _run([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)], dict(w=new_w, b=new_b), x)
    _close(got, ref)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), trans_b=st.booleans(), c_shape=st.sampled_from([None, (5,), (1, 5), (3, 5), (3, 1), ()]),
       alpha=st.sampled_from([1.0, 0.5]), beta=st.sampled_from([1.0, 2.0]))
def test_gemm_batchnorm_matches_onnxruntime(seed, trans_b, c_shape, alpha, beta):
    rng = np.random.default_rng(seed)
    k, n = 4, 5
    w = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    c = None if c_shape is None else rng.normal(size=c_shape).astype(np.float32)
    p = _bn_params(rng, n)
    x = rng.normal(size=(3, k)).astype(np.float32)
    attrs = dict(transB=int(trans_b), alpha=alpha, beta=beta)
    gemm_in = ["x", "w"] + ([] if c is None else ["c"])
    ref = _run([helper.make_node("Gemm", gemm_in, ["g"], **attrs),
                helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"])],
               dict(w=w, **({} if c is None else {"c": c}), **p), x)
    new_w, new_c = folding.fold_batchnorm(w, c, **p, layout="matmul_t" if trans_b else "matmul", bias_scale=beta)
    got = _run([helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=int(trans_b), alpha=alpha)],
               dict(w=new_w, c=new_c), x)
    _close(got, ref)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_matmul_batchnorm_matches_onnxruntime(seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    p = _bn_params(rng, 6)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    ref = _run([helper.make_node("MatMul", ["x", "w"], ["g"]),
                helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"])],
               dict(w=w, **p), x)
    new_w, new_b = folding.fold_batchnorm(w, None, **p, layout="matmul")
    got = _run([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], dict(w=new_w, b=new_b), x)
    _close(got, ref)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), op=st.sampled_from(["Conv", "ConvTranspose"]),
       group=st.sampled_from([1, 2]), with_bias=st.booleans())
def test_scale_and_bias_match_onnxruntime(seed, op, group, with_bias):
    rng = np.random.default_rng(seed)
    c_in, m = 4, 6
    w_shape = (m, c_in // group, 3, 3) if op == "Conv" else (c_in, m // group, 3, 3)
    layout = "conv" if op == "Conv" else "conv_transpose"
    w = rng.normal(size=w_shape).astype(np.float32)
    b = rng.normal(size=m).astype(np.float32) if with_bias else None
    s = rng.normal(size=(m, 1, 1)).astype(np.float32)
    t = rng.normal(size=(1, m, 1, 1)).astype(np.float32)
    x = rng.normal(size=(2, c_in, 5, 5)).astype(np.float32)
    conv_in = ["x", "w", "b"] if with_bias else ["x", "w"]
    ref = _run([helper.make_node(op, conv_in, ["c"], group=group), helper.make_node("Mul", ["c", "s"], ["d"]),
                helper.make_node("Add", ["d", "t"], ["y"])],
               dict(w=w, s=s, t=t, **({"b": b} if with_bias else {})), x)
    new_w, new_b = folding.fold_scale(w, b, folding.channel_vector(s, 4, m), layout, group)
    new_b = folding.fold_bias(new_b, folding.channel_vector(t, 4, m), m, w)
    got = _run([helper.make_node(op, ["x", "w", "b"], ["y"], group=group)], dict(w=new_w, b=new_b), x)
    _close(got, ref)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), rank=st.sampled_from([2, 3, 4]))
def test_channel_affine_matches_batchnorm(seed, rank):
    rng = np.random.default_rng(seed)
    c = 5
    p = _bn_params(rng, c)
    x = rng.normal(size=(2, c) + (3,) * (rank - 2)).astype(np.float32)
    ref = _run([helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"])], p, x)
    s, t = folding.channel_affine(*folding.batchnorm_scale_shift(**p), rank)
    got = _run([helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])],
               dict(s=s, t=t), x)
    _close(got, ref)
