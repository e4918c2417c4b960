"""Calibration statistics, thresholds and int8 quantization math (kernels/calibration.py, quantize.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from onnxopt.kernels import calibration, quantize

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, st.integers(1, 300), elements=finite)


def naive_kl(counts, nq):
    """Bin-by-bin KL(P_i || Q_i) straight from the definition (TensorRT's loop), Q smoothed to eps
    where it is empty and P is not."""
    eps = calibration.SMOOTH_EPS
    h = np.asarray(counts, float)
    last = np.flatnonzero(h)[-1] + 1
    h = h[:last]
    out = {}
    for i in range(nq, last + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        q = np.zeros(i)
        for g in range(nq):
            s, e = (g * i) // nq, ((g + 1) * i) // nq
            n = (p[s:e] > 0).sum()
            if n:
                q[s:e] = np.where(p[s:e] > 0, h[s:e].sum() / n, 0.0)
        pn = p / p.sum()
        m = pn > 0
        empty = m & (q <= 0)
        qn = q / q.sum() if q.sum() > 0 else q
        if empty.any():
            qn = qn * (1 - eps)
            qn[empty] = eps
        out[i] = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(arrays, min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_streaming_is_order_and_sharding_independent(chunks, rnd):
    one = calibration.AbsHistogram(256).update(np.concatenate(chunks))
    streamed = calibration.AbsHistogram(256)
    order = list(chunks)
    rnd.shuffle(order)
    for c in order:
        streamed.update(c)
    # Sharded: two histograms merged.
    half = len(order) // 2
    a, b = calibration.AbsHistogram(256), calibration.AbsHistogram(256)
    for c in order[:half]:
        a.update(c)
    for c in order[half:]:
        b.update(c)
    merged = a.merge(b)
    for h in (streamed, merged):
        assert h.edge == one.edge
        np.testing.assert_array_equal(h.counts, one.counts)
        assert (h.zeros, h.min, h.max, h.total) == (one.zeros, one.min, one.max, one.total)
        assert (h.min_count, h.max_count) == (one.min_count, one.max_count)
    all_ = np.concatenate(chunks)
    assert one.total == all_.size
    assert one.zeros == int(np.count_nonzero(all_ == 0))
    assert one.max_count == int(np.count_nonzero(all_ == all_.max()))
    assert one.min_count == int(np.count_nonzero(all_ == all_.min()))
    if one.edge:
        assert np.abs(all_).max() < one.edge <= 2 * np.abs(all_).max()


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.int64, st.integers(20, 120), elements=st.integers(0, 50)), st.sampled_from([4, 8, 16]))
def test_vectorized_kl_matches_definition(counts, nq):
    if counts.sum() == 0:
        counts[-1] = 1
    cands, kl = calibration.kl_divergence_all(counts, nq)
    last = np.flatnonzero(counts)[-1] + 1
    if last <= nq:
        assert list(cands) == [last]
        return
    ref = naive_kl(counts, nq)
    want = np.array([ref[i] for i in cands])
    assert list(cands) == list(range(nq, last + 1))
    np.testing.assert_allclose(kl, want, rtol=1e-9, atol=1e-12)


def test_entropy_known_answers():
    rng = np.random.default_rng(0)
    # Uniform data: nothing to clip, the threshold is (nearly) the maximum.
    u = rng.uniform(-3, 3, 200_000)
    t = calibration.entropy_threshold(calibration.AbsHistogram().update(u))
    assert 0.95 * 3 <= t <= 3.0 + 4.0 / 2048
    # Gaussian plus a single far outlier: the outlier is clipped, the bulk kept (the 2048 bins span
    # [0, 512): the first candidate, 128 bins, is 32; resolution limits how low it can go).
    g = np.concatenate([rng.standard_normal(200_000), [500.0]])
    h = calibration.AbsHistogram().update(g)
    t = calibration.entropy_threshold(h)
    assert 2.0 < t < 40.0, t
    assert calibration.minmax_threshold(h) == 500.0
    # A heavy-tailed (Laplace) distribution is clipped well below its maximum.
    lap = rng.laplace(size=200_000)
    t = calibration.entropy_threshold(calibration.AbsHistogram().update(lap))
    assert t < 0.9 * np.abs(lap).max()


def test_zero_spike_does_not_move_the_threshold():
    rng = np.random.default_rng(1)
    relu = np.maximum(rng.standard_normal(100_000), 0)
    positive = relu[relu > 0]
    with_zeros = calibration.AbsHistogram().update(np.concatenate([relu, np.zeros(900_000)]))
    without = calibration.AbsHistogram().update(positive)
    assert calibration.entropy_threshold(with_zeros) == calibration.entropy_threshold(without)
    assert with_zeros.zeros >= 900_000


def test_saturation_spike_keeps_the_clip_bound():
    # Real statistics: EfficientNet-Lite0's block-14 ReLU6 output over 52 photo crops
    # (tests/data/relu6_histogram.npz), 491 values (0.08 % of the non-zero ones) exactly at 6.
    # KL alone clips at about 3.1, moving that whole spike; the range must keep 6.
    data = np.load(Path(__file__).parent / "data" / "relu6_histogram.npz")
    h = calibration.AbsHistogram()
    h.counts, h.edge, h.zeros = data["counts"].astype(np.int64), float(data["edge"]), int(data["zeros"])
    h.min, h.max, h.max_count = 0.0, 6.0, int(data["max_count"])
    assert h.saturated() == (False, True)
    assert calibration.entropy_threshold(h) < 3.5
    for method in calibration.METHODS:
        assert calibration.activation_range(h, method, unsigned=True) == (0.0, 6.0)
    rng = np.random.default_rng(3)
    hardtanh = np.clip(rng.standard_normal(400_000), -1.5, 1.5)
    assert calibration.activation_range(calibration.AbsHistogram().update(hardtanh), "entropy") == (-1.5, 1.5)
    # A continuous heavy-tailed tensor holds its extremes once: still clipped.
    smooth = calibration.AbsHistogram().update(rng.laplace(size=400_000))
    assert smooth.saturated() == (False, False)
    lo, hi = calibration.activation_range(smooth, "entropy")
    assert hi < smooth.max and lo > smooth.min


def test_discrete_data_is_not_collapsed_to_one_bin():
    # Normalized 4-bit pixels: 17 levels in [-1, 1]. A candidate leaving one bin has KL 0 too.
    x = np.random.default_rng(2).integers(0, 17, 50_000) / 8.0 - 1.0
    assert calibration.entropy_threshold(calibration.AbsHistogram().update(x)) == pytest.approx(1.0, abs=2 / 2048)


def test_percentile_and_minmax():
    x = np.arange(1, 10_001, dtype=np.float64)
    h = calibration.AbsHistogram().update(x)
    assert calibration.minmax_threshold(h) == 10_000
    t = calibration.percentile_threshold(h, 99.0)
    assert abs(t - 9_900) <= h.bin_width + 1
    assert calibration.activation_range(h, "minmax") == (1.0, 10_000.0)
    lo, hi = calibration.activation_range(calibration.AbsHistogram().update(-x), "percentile", percentile=50.0)
    assert hi == -1.0 and abs(lo + 5_000) <= h.bin_width + 1
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibration.threshold(h, "mse")


def test_empty_and_all_zero():
    h = calibration.AbsHistogram().update(np.zeros(10))
    for m in calibration.METHODS:
        assert calibration.threshold(h, m) == 0.0
    assert calibration.activation_range(calibration.AbsHistogram(), "entropy") == (0.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        calibration.AbsHistogram().update(np.array([1.0, np.nan]))


def test_entropy_search_takes_milliseconds():
    h = calibration.AbsHistogram()
    h.update(np.random.default_rng(3).standard_t(3, 500_000))
    assert np.flatnonzero(h.counts)[-1] > 1000  # a wide search: > 900 candidates
    calibration.entropy_threshold(h)
    start = time.perf_counter()
    for _ in range(5):
        calibration.entropy_threshold(h)
    assert (time.perf_counter() - start) / 5 < 0.05


# ---- quantize.py against onnxruntime's QuantizeLinear / DequantizeLinear -------------------------


def _ort_qdq(x, scale, zp, axis):
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis)]
    zt = TensorProto.INT8 if zp.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", zt, list(x.shape)), helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor("s", TensorProto.FLOAT, list(np.shape(scale)), np.ravel(scale).tolist()),
         helper.make_tensor("z", zt, list(np.shape(zp)), np.ravel(zp).tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 4)),
                  elements=st.floats(-50, 50, width=32)), st.integers(0, 2))
# Found by CI: a subnormal weight made the scale underflow to 0 (x / scale = 0/0).
@example(w=np.array([[[1e-45, 0.0]]], np.float32), axis=0)
def test_per_channel_weight_matches_onnxruntime(w, axis):
    q, s = quantize.per_channel_weight(w, axis)
    assert q.dtype == np.int8 and s.shape == (w.shape[axis],)
    assert q.min() >= -127 and q.max() <= 127
    zp = np.zeros(s.shape, np.int8)
    q_ort, y_ort = _ort_qdq(w, s, zp, axis)
    np.testing.assert_array_equal(q, q_ort)
    y = quantize.dequantize(q, s, zp, axis)
    np.testing.assert_array_equal(y, y_ort)
    # Symmetric rounding error: at most half a step per channel.
    shape = [1] * w.ndim
    shape[axis] = -1
    assert np.all(np.abs(y - w) <= s.reshape(shape) / 2 * (1 + 1e-5) + 1e-30)


@settings(max_examples=40, deadline=None)
@given(st.floats(-100, 0), st.floats(0, 100), st.sampled_from(["uint8", "int8"]))
def test_activation_params_cover_range_and_zero(lo, hi, dtype):
    s, zp = quantize.activation_params(lo, hi, dtype)
    x = np.array([lo, 0.0, hi, (lo + hi) / 2], np.float32)
    q_ort, y_ort = _ort_qdq(x, np.float32(s), zp, 0)
    q = quantize.quantize(x, s, zp)
    np.testing.assert_array_equal(q, q_ort)
    assert y_ort[1] == 0.0  # zero exactly representable
    if hi - lo > 0:
        assert np.all(np.abs(y_ort - x) <= s * 0.5 * (1 + 1e-4) + 1e-6)


def test_bias_int32():
    b = np.array([0.5, -1.25, 0.0], np.float32)
    q, s = quantize.bias_int32(b, 0.01, np.array([0.1, 0.2, 0.3], np.float32))
    assert q.dtype == np.int32
    np.testing.assert_allclose(q * s, b, atol=np.max(s) / 2)
    assert quantize.bias_int32(np.array([1e9], np.float32), 1e-6, np.array([1e-6], np.float32)) is None


def test_dead_channel_bias_fits_after_the_scale_floor():
    """A folded BatchNorm can leave a channel with ~0 weights and a real bias (EfficientNet-Lite0 has
    such channels): the plain scale makes the bias overflow int32, the floored one fits."""
    w = np.array([[1e-10, -1e-10], [0.5, -0.25]], np.float32)  # rows: output channels (axis 0)
    b = np.array([0.8, 0.1], np.float32)
    s_x = 0.02
    _, plain = quantize.per_channel_weight(w, 0)
    assert quantize.bias_int32(b, s_x, plain) is None
    q, s = quantize.per_channel_weight(w, 0, min_scale=quantize.bias_scale_floor(b, s_x))
    assert s[1] == plain[1] and np.all(q[0] == 0)  # a live channel keeps its scale
    qb, sb = quantize.bias_int32(b, s_x, s)
    assert np.abs(qb).max() <= quantize.BIAS_LIMIT
    np.testing.assert_allclose(qb * sb, b, atol=float(sb.max()))


def _ort_conv(x, w, group):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=group)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "w": w})[0]


@pytest.mark.parametrize("group", [1, 2, 4])
def test_weight_bias_correction_is_the_mean_output_shift_of_a_conv(group):
    """A conv is linear in W, so on inputs constant over space (every output window sees the channel
    mean) E[conv(x, W') - conv(x, W)] per channel is exactly the correction from the channel means."""
    rng = np.random.default_rng(group)
    x = np.broadcast_to(rng.normal(0.7, 1.0, (8, 4, 1, 1)), (8, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((8, 4 // group, 3, 3)).astype(np.float32)
    q, s = quantize.per_channel_weight(w, 0)
    w_deq = quantize.dequantize(q, s, 0, axis=0)
    shift = (_ort_conv(x, w_deq, group) - _ort_conv(x, w, group)).mean(axis=(0, 2, 3))
    got = quantize.weight_bias_correction(w, w_deq, x.mean(axis=(0, 2, 3)), axis=0, group=group)
    np.testing.assert_allclose(got, shift, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1])
def test_weight_bias_correction_of_a_gemm(axis):
    rng = np.random.default_rng(axis)
    x = rng.normal(0.5, 1.0, (32, 5))
    w = rng.standard_normal((5, 3) if axis == 1 else (3, 5)).astype(np.float32)  # axis = output axis
    q, s = quantize.per_channel_weight(w, axis)
    w_deq = quantize.dequantize(q, s, 0, axis=axis)
    wx = (lambda m: x @ m) if axis == 1 else (lambda m: x @ m.T)
    shift = (wx(w_deq.astype(np.float64)) - wx(w.astype(np.float64))).mean(axis=0)
    np.testing.assert_allclose(quantize.weight_bias_correction(w, w_deq, x.mean(axis=0), axis=axis), shift, rtol=1e-5)
