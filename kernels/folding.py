"""Weight folding: BatchNormalization, per-channel Mul and per-channel Add into a linear producer.

A producer P(x; W, b) is linear in x and its output channel o depends only on the slice of W that
feeds channel o. A per-channel affine map after it therefore folds into its weights:

    P(x; W, b) * s + t  =  P(x; W * s, b * s + t)          (s, t per output channel)

BatchNormalization at inference is such a map: BN(y) = y * s + t with
s = gamma / sqrt(var + epsilon) and t = beta - mean * s.

Where the output channels live in W (the `layout` argument):
    "conv"            Conv W[M, C/group, k...]                axis 0 (groups need nothing special)
    "conv_transpose"  ConvTranspose W[C, M/group, k...]       output channel g * M/group + j is
                                                              W[g * C/group : (g+1) * C/group, j]
    "matmul"          MatMul / Gemm (transB=0) B[K, N]        axis 1
    "matmul_t"        Gemm (transB=1) B[N, K]                 axis 0

All arithmetic is in float64; results come back in the weight's own dtype. Pure numpy.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("conv", "conv_transpose", "matmul", "matmul_t")

# ONNX BatchNormalization's default epsilon.
BN_DEFAULT_EPSILON = 1e-5


def batchnorm_scale_shift(gamma, beta, mean, var, epsilon: float = BN_DEFAULT_EPSILON):
    """BN(y) = y * scale + shift per channel; returns (scale, shift) as float64 vectors."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + float(epsilon))
    return scale, beta - mean * scale


def output_channels(w: np.ndarray, layout: str, group: int = 1) -> int:
    """How many output channels a producer with weights `w` (in `layout`) computes."""
    if layout == "conv":
        return int(w.shape[0])
    if layout == "conv_transpose":
        return int(w.shape[1]) * int(group)
    if layout == "matmul":
        return int(w.shape[-1])
    if layout == "matmul_t":
        return int(w.shape[0])
    raise ValueError(f"unknown layout {layout!r} (choose from {LAYOUTS})")


def scale_output_channels(w: np.ndarray, scale, layout: str, group: int = 1) -> np.ndarray:
    """W with every output channel o multiplied by scale[o] (float64)."""
    w = np.asarray(w, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    channels = output_channels(w, layout, group)
    if scale.size == 1:
        scale = np.broadcast_to(scale, (channels,))
    if scale.size != channels:
        raise ValueError(f"{scale.size} scales for {channels} output channels")
    if layout == "conv":
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if layout == "conv_transpose":
        c, m_per_group = w.shape[0], w.shape[1]
        if group < 1 or c % group:
            raise ValueError(f"{c} input channels do not split into {group} groups")
        kernel = w.shape[2:]
        grouped = w.reshape((group, c // group, m_per_group) + kernel)
        s = scale.reshape((group, 1, m_per_group) + (1,) * len(kernel))
        return (grouped * s).reshape(w.shape)
    if layout == "matmul":
        return w * scale
    # matmul_t
    return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))


def _cast_like(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=like.dtype)


def fold_affine(w, b, scale, shift, layout: str, group: int = 1, bias_scale: float = 1.0):
    """P(x; W, b) * scale + shift = P(x; W', b') per output channel; returns (W', b').

    `b` may be None (no bias: b' = shift) or any shape that broadcasts against the output
    channels (Gemm's C); `bias_scale` is Gemm's beta, which scales C. W' and b' have W's dtype.
    """
    w = np.asarray(w)
    new_w = scale_output_channels(w, scale, layout, group)
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    if b is None:
        new_b = np.broadcast_to(shift, np.broadcast_shapes(shift.shape, scale.shape))
    else:
        new_b = float(bias_scale) * np.asarray(b, dtype=np.float64) * scale + shift
    return _cast_like(new_w, w), _cast_like(new_b, w)


def fold_batchnorm(w, b, gamma, beta, mean, var, epsilon: float = BN_DEFAULT_EPSILON, *,
                   layout: str, group: int = 1, bias_scale: float = 1.0):
    """BN(P(x; W, b)) = P(x; W * s, (b - mean) * s + beta), s = gamma / sqrt(var + eps)."""
    scale, shift = batchnorm_scale_shift(gamma, beta, mean, var, epsilon)
    return fold_affine(w, b, scale, shift, layout, group, bias_scale)


def fold_scale(w, b, scale, layout: str, group: int = 1):
    """P(x; W, b) * s = P(x; W * s, b * s) for a per-output-channel s; returns (W', b' or None)."""
    w = np.asarray(w)
    new_w = _cast_like(scale_output_channels(w, scale, layout, group), w)
    if b is None:
        return new_w, None
    new_b = np.asarray(b, dtype=np.float64) * np.asarray(scale, dtype=np.float64).reshape(-1)
    return new_w, _cast_like(new_b, w)


def fold_bias(b, bias, channels: int, like: np.ndarray):
    """P(x; W, b) + t = P(x; W, b + t) for a per-output-channel t; returns the new 1-D bias."""
    t = np.broadcast_to(np.asarray(bias, dtype=np.float64).reshape(-1), (channels,))
    new_b = t if b is None else np.asarray(b, dtype=np.float64).reshape(-1) + t
    return _cast_like(new_b, np.asarray(like))


def channel_vector(c, rank: int, channels: int, axis: int = 1) -> np.ndarray | None:
    """`c` as a [channels] vector if, broadcast against a rank-`rank` tensor with `channels`
    channels on `axis`, it varies along that axis only; None otherwise (it would broadcast over
    another axis, or enlarge the output's rank)."""
    c = np.asarray(c)
    if c.ndim > rank:
        return None
    padded = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(padded) if i != axis) or padded[axis] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).copy()


def channel_affine(scale, shift, rank: int, axis: int = 1):
    """Per-channel (scale, shift) reshaped to broadcast over a rank-`rank` tensor along `axis`."""
    shape = (-1,) + (1,) * (rank - 1 - axis)
    return np.asarray(scale).reshape(shape), np.asarray(shift).reshape(shape)
