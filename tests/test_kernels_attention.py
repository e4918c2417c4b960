"""onnxopt.kernels.attention against onnxruntime's own com.microsoft kernels (CPU EP), on random
inputs: Attention and MultiHeadAttention with and without a 2-D 0/1 mask, unidirectional=1,
explicit scale and mask_filter_value, unequal V size; FusedMatMul with every transpose flag."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt.kernels import attention as K
from onnxopt.kernels import catalogue

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32}


def _run_contrib(op: str, feeds: dict, **attrs) -> np.ndarray:
    names = [k if v is not None else "" for k, v in feeds.items()]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node(op, names, ["y"], domain="com.microsoft", **attrs)
    inputs = [helper.make_tensor_value_info(k, _TYPES[v.dtype], list(v.shape)) for k, v in feeds.items() if v is not None]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {k: v for k, v in feeds.items() if v is not None})[0]


def _close(got, ref, rtol=1e-4):
    assert got.shape == ref.shape
    scale = max(float(np.max(np.abs(ref))), 1e-6)
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g}"


def _mask(rng, b, t):
    """A 0/1 mask where every row keeps its first position (no row is fully masked)."""
    m = (rng.random((b, t)) > 0.4).astype(np.int32)
    m[:, 0] = 1
    return m


def test_catalogue_names_these_references():
    assert catalogue.reference("Attention") is K.attention
    assert catalogue.reference("MultiHeadAttention") is K.multi_head_attention
    assert catalogue.reference("FusedMatMul") is K.fused_matmul


@SETTINGS
@given(
    b=st.integers(1, 3),
    s=st.integers(1, 7),
    heads=st.sampled_from([1, 2, 4]),
    head_size=st.sampled_from([2, 4, 8]),
    masked=st.booleans(),
    unidirectional=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_onnxruntime(b, s, heads, head_size, masked, unidirectional, seed):
    rng = np.random.default_rng(seed)
    n, n_in = heads * head_size, 6
    x = rng.standard_normal((b, s, n_in)).astype(np.float32)
    w = rng.standard_normal((n_in, 3 * n)).astype(np.float32)
    bias = rng.standard_normal(3 * n).astype(np.float32)
    mask = _mask(rng, b, s) if masked else None
    got = _run_contrib("Attention", {"x": x, "w": w, "b": bias, "m": mask}, num_heads=heads, unidirectional=unidirectional)
    ref = K.attention(x, w, bias, mask, num_heads=heads, unidirectional=unidirectional)
    _close(got, ref)


def test_attention_scale_filter_value_and_unequal_v_size():
    rng = np.random.default_rng(1)
    b, s, heads, n_in = 2, 5, 2, 8
    sizes = (8, 8, 12)
    x = rng.standard_normal((b, s, n_in)).astype(np.float32)
    w = rng.standard_normal((n_in, sum(sizes))).astype(np.float32)
    bias = rng.standard_normal(sum(sizes)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    attrs = dict(num_heads=heads, scale=0.3, qkv_hidden_sizes=list(sizes), mask_filter_value=-3.0e4)
    for uni in (0, 1):
        got = _run_contrib("Attention", {"x": x, "w": w, "b": bias, "m": mask}, unidirectional=uni, **attrs)
        ref = K.attention(x, w, bias, mask, unidirectional=uni, **{**attrs, "qkv_hidden_sizes": sizes})
        _close(got, ref)
        assert got.shape == (b, s, sizes[2])


def test_attention_mask_changes_the_result():
    # The reference must actually apply the mask (a test that could not tell would be vacuous).
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 4)).astype(np.float32)
    w = rng.standard_normal((4, 12)).astype(np.float32)
    full = K.attention(x, w, None, np.ones((1, 4), np.int32), num_heads=2)
    padded = K.attention(x, w, None, np.array([[1, 1, 0, 0]], np.int32), num_heads=2)
    causal = K.attention(x, w, None, None, num_heads=2, unidirectional=1)
    assert not np.allclose(full, padded) and not np.allclose(full, causal)
    # The first query of a causal block attends to itself only: its output is its own V.
    v0 = (x[0, 0] @ w[:, 8:])
    np.testing.assert_allclose(causal[0, 0], v0, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(
    b=st.integers(1, 3),
    s=st.integers(1, 6),
    length=st.integers(1, 6),
    heads=st.sampled_from([1, 2, 4]),
    head_size=st.sampled_from([2, 4]),
    masked=st.booleans(),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_multi_head_attention_matches_onnxruntime(b, s, length, heads, head_size, masked, with_bias, seed):
    rng = np.random.default_rng(seed)
    n = heads * head_size
    q = rng.standard_normal((b, s, n)).astype(np.float32)
    k = rng.standard_normal((b, length, n)).astype(np.float32)
    v = rng.standard_normal((b, length, n)).astype(np.float32)
    bias = rng.standard_normal(3 * n).astype(np.float32) if with_bias else None
    mask = _mask(rng, b, length) if masked else None
    feeds = {"q": q, "k": k, "v": v, "bias": bias, "kpm": mask}
    got = _run_contrib("MultiHeadAttention", feeds, num_heads=heads)
    ref = K.multi_head_attention(q, k, v, bias, mask, num_heads=heads)
    _close(got, ref)


def test_multi_head_attention_unidirectional_and_scale():
    rng = np.random.default_rng(3)
    b, s, heads, n = 2, 5, 2, 8
    q, k, v = (rng.standard_normal((b, s, n)).astype(np.float32) for _ in range(3))
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32)
    got = _run_contrib("MultiHeadAttention", {"q": q, "k": k, "v": v, "bias": None, "kpm": mask},
                       num_heads=heads, unidirectional=1, scale=0.4)
    ref = K.multi_head_attention(q, k, v, None, mask, num_heads=heads, unidirectional=1, scale=0.4)
    _close(got, ref)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("batch_a", [0, 1])
@pytest.mark.parametrize("batch_b", [0, 1])
def test_fused_matmul_matches_onnxruntime(trans_a, trans_b, batch_a, batch_b):
    rng = np.random.default_rng(4)
    # Logical shapes [2, 3, 4, 5] @ [2, 3, 5, 6]; stored as the flags ask.
    a = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    b = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    if trans_a:
        a = np.swapaxes(a, -1, -2)
    if trans_b:
        b = np.swapaxes(b, -1, -2)
    if batch_a:
        a = np.moveaxis(a, -2, 0)
    if batch_b:
        b = np.moveaxis(b, -2, 0)
    attrs = dict(alpha=0.7, transA=trans_a, transB=trans_b, transBatchA=batch_a, transBatchB=batch_b)
    got = _run_contrib("FusedMatMul", {"a": np.ascontiguousarray(a), "b": np.ascontiguousarray(b)}, **attrs)
    ref = K.fused_matmul(a, b, **attrs)
    _close(got, ref, rtol=1e-5)
    assert got.shape == (2, 3, 4, 6)
