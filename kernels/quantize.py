"""Linear int8 quantization math (numpy only), matching ONNX QuantizeLinear / DequantizeLinear.

QuantizeLinear: q = saturate(round_half_even(x / scale) + zero_point); DequantizeLinear:
x' = (q - zero_point) * scale.

* Weights: per-channel symmetric int8, q in [-127, 127] (the -128 code is left unused so the range is
  symmetric), or in [-63, 63] with `reduce_range` (7 bits). x86 CPUs without VNNI multiply u8
  activations by s8 weights with `vpmaddubsw`, which adds two adjacent products into a saturating
  int16: 2 * 255 * 127 = 64770 overflows 32767, and the integer kernels silently differ from what
  QDQ means. With 7-bit weights, 2 * 255 * 63 = 32130 fits (what onnxruntime calls reduce_range).
* Activations: an affine range [lo, hi], always widened to contain 0 (so zero padding and ReLU
  zeros are exact), as u8 with a zero point (x86 CPU: u8 activations x s8 weights) or as s8
  symmetric (zero point 0; GPU / TensorRT).
* Bias of Conv / Gemm: int32 with scale = scale_x * scale_w (per channel), zero point 0, which is
  what integer Conv kernels accumulate in. A channel whose weights are (nearly) all zero but whose
  bias is not (dead channels after BatchNorm folding) would need more than 31 bits; its weight
  scale is raised until the bias fits (`bias_scale_floor`), which only coarsens weights that
  quantize to zero anyway.
* Bias correction: rounding the weights shifts each output channel's mean by (W' - W) E[x]; that
  expected shift is subtracted from the bias (`weight_bias_correction`, Nagel et al. 2019, "Data-Free
  Quantization", empirical variant with E[x] from the calibration data).
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127
# Largest weight code with reduce_range: pair sums of u8 x s7 products fit in int16.
INT7_MAX = 63
INT32_MAX = 2**31 - 1


_TINY = np.finfo(np.float32).tiny  # smallest normal float32


# Bias codes stay within 2**30 so the int32 accumulator keeps headroom for the products.
BIAS_LIMIT = 2**30


def per_channel_weight(w: np.ndarray, axis: int, min_scale: np.ndarray | None = None,
                       reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along `axis`: (q int8 same shape as w, scale float32 [w.shape[axis]]).

    `min_scale` (per channel) is a lower bound on the scale (see `bias_scale_floor`); `reduce_range`
    keeps q in [-63, 63] (see the module docstring)."""
    qmax = INT7_MAX if reduce_range else INT8_MAX
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    others = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.max(np.abs(w), axis=others) if others else np.abs(w)
    # An all-zero channel quantizes to zeros with any scale; 1 keeps DequantizeLinear well defined.
    # So does a channel so small that its scale would not be a normal float32 (x / scale would be
    # 0/0 or inf): its values are below 127 * 1.2e-38 and dequantize to 0 either way.
    scale = (amax / qmax).astype(np.float32)
    if min_scale is not None:
        scale = np.maximum(scale, np.asarray(min_scale, dtype=np.float32))
    scale = np.where(scale >= _TINY, scale, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def activation_params(lo: float, hi: float, dtype: str = "uint8") -> tuple[np.float32, np.integer]:
    """Scale and zero point for the float range [lo, hi] (widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == "uint8":
        scale = (hi - lo) / 255.0
        if np.float32(scale) < _TINY:  # empty or subnormal range: nothing to represent
            return np.float32(1.0), np.uint8(0)
        zp = int(np.clip(np.rint(-lo / scale), 0, 255))
        return np.float32(scale), np.uint8(zp)
    if dtype == "int8":
        amax = max(-lo, hi)
        if np.float32(amax / INT8_MAX) < _TINY:
            return np.float32(1.0), np.int8(0)
        return np.float32(amax / INT8_MAX), np.int8(0)
    raise ValueError(f"unsupported activation type {dtype!r}")


def quantize(x: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear (round half to even, saturate to the zero point's type)."""
    zp = np.asarray(zero_point)
    info = np.iinfo(zp.dtype)
    s = np.asarray(scale, dtype=np.float32)
    z = zp.astype(np.int64)
    if axis is not None and s.ndim == 1:
        shape = [1] * np.ndim(x)
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    q = np.rint(np.asarray(x, dtype=np.float32) / s).astype(np.int64) + z
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def dequantize(q: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear."""
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point).astype(np.int64)
    if axis is not None and s.ndim == 1:
        shape = [1] * np.ndim(q)
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return ((np.asarray(q).astype(np.int64) - z) * s).astype(np.float32)


def bias_scale_floor(b: np.ndarray, scale_x: float) -> np.ndarray:
    """The per-channel weight scale below which bias `b` would not fit in BIAS_LIMIT codes of scale_x * scale_w."""
    # A hair above the exact floor so float32 rounding of scale_x * scale_w cannot cross the limit.
    return (np.abs(np.asarray(b, dtype=np.float64)) / (float(scale_x) * BIAS_LIMIT) * (1 + 1e-5)).astype(np.float32)


def weight_bias_correction(w: np.ndarray, w_deq: np.ndarray, x_mean: np.ndarray, axis: int, group: int = 1) -> np.ndarray:
    """E[y' - y] per output channel when W becomes its dequantized W' and x has per-channel mean x_mean.

    2-D (MatMul / Gemm) weights: `axis` is the output axis, the other one meets x's last axis, so the
    shift is (W' - W) x_mean. Conv weights [C_out, C_in / group, k...] (axis 0): each output channel
    sums its kernel over space against the mean of its group's input channels. Zero padding makes
    border outputs see fewer inputs; the correction is the interior one.
    """
    dw = np.asarray(w_deq, dtype=np.float64) - np.asarray(w, dtype=np.float64)
    x_mean = np.asarray(x_mean, dtype=np.float64)
    if dw.ndim == 2:
        return (np.moveaxis(dw, axis, 0) @ x_mean).astype(np.float32)
    if axis != 0:
        raise ValueError("conv weights take their output channels on axis 0")
    per_input = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2)  # [C_out, C_in / group]
    groups_of_out = np.arange(dw.shape[0]) // (dw.shape[0] // group)
    return (per_input * x_mean.reshape(group, dw.shape[1])[groups_of_out]).sum(axis=1).astype(np.float32)


def bias_int32(b: np.ndarray, scale_x: float, scale_w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(q int32, scale float32) with scale = scale_x * scale_w; None if a value would overflow int32."""
    scale = (np.float32(scale_x) * np.asarray(scale_w, dtype=np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, np.shape(b)).astype(np.float32)
    q = np.rint(np.asarray(b, dtype=np.float64) / scale.astype(np.float64))
    if not np.all(np.isfinite(q)) or np.any(np.abs(q) > INT32_MAX):
        return None
    return q.astype(np.int32), scale


def matmul_integer_to_float(a: np.ndarray, b: np.ndarray, a_scale, b_scale, a_zero_point=None, b_zero_point=None,
                            bias: np.ndarray | None = None) -> np.ndarray:
    """com.microsoft.MatMulIntegerToFloat: (A - a_zp) @ (B - b_zp) summed exactly in integers, times
    a_scale * b_scale (b's per column [N] or one scalar), plus bias [N]."""
    a_zp = np.zeros((), np.int64) if a_zero_point is None else np.asarray(a_zero_point).astype(np.int64)
    b_zp = np.zeros((), np.int64) if b_zero_point is None else np.asarray(b_zero_point).astype(np.int64)
    acc = np.matmul(np.asarray(a).astype(np.int64) - a_zp, np.asarray(b).astype(np.int64) - b_zp)
    scale = np.float32(a_scale) * np.asarray(b_scale, dtype=np.float32)
    out = acc.astype(np.float32) * scale
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float32)
    return out.astype(np.float32)
