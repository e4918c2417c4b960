"""Numpy references of the normalization kernels onnxopt emits (the test oracle for them).

All normalize over the last axis. With h the normalized input, D its last dimension:

    layer_normalization:        (h - mean(h)) / sqrt(var(h) + epsilon) * gamma + beta
    simplified_layer_normalization (RMSNorm):  h / sqrt(mean(h^2) + epsilon) * gamma
    skip_layer_normalization:   the above with h = input + skip (+ bias)
    skip_simplified_layer_normalization: RMSNorm with h = input + skip (+ bias)

var is the population variance (divide by D). The skip variants return onnxruntime's four outputs
(output, mean, inv_std_var, input_skip_bias_sum); mean and inv_std_var keep the last axis as 1.
Arithmetic is in float64; outputs come back in the input's dtype. Pure numpy.
"""

from __future__ import annotations

import numpy as np


def _stats(h: np.ndarray, epsilon: float, centred: bool):
    mean = h.mean(axis=-1, keepdims=True) if centred else np.zeros(h.shape[:-1] + (1,))
    centred_h = h - mean
    inv_std = 1.0 / np.sqrt((centred_h * centred_h).mean(axis=-1, keepdims=True) + epsilon)
    return centred_h, mean, inv_std


def layer_normalization(x, gamma, beta=None, epsilon: float = 1e-5) -> np.ndarray:
    """ONNX LayerNormalization with axis=-1 (output 0 only)."""
    h = np.asarray(x, np.float64)
    centred, _, inv_std = _stats(h, epsilon, centred=True)
    y = centred * inv_std * np.asarray(gamma, np.float64)
    if beta is not None:
        y = y + np.asarray(beta, np.float64)
    return y.astype(np.asarray(x).dtype)


def simplified_layer_normalization(x, gamma, epsilon: float = 1e-5) -> np.ndarray:
    """RMSNorm: onnxruntime's SimplifiedLayerNormalization / ONNX RMSNormalization, axis=-1."""
    h = np.asarray(x, np.float64)
    _, _, inv_rms = _stats(h, epsilon, centred=False)
    return (h * inv_rms * np.asarray(gamma, np.float64)).astype(np.asarray(x).dtype)


def _skip_sum(input, skip, bias) -> np.ndarray:
    h = np.asarray(input, np.float64) + np.asarray(skip, np.float64)
    if bias is not None:
        h = h + np.asarray(bias, np.float64)
    return h


def skip_layer_normalization(input, skip, gamma, beta=None, bias=None, epsilon: float = 1e-12):
    """com.microsoft SkipLayerNormalization -> (output, mean, inv_std_var, input_skip_bias_sum)."""
    dtype = np.asarray(input).dtype
    h = _skip_sum(input, skip, bias)
    centred, mean, inv_std = _stats(h, epsilon, centred=True)
    y = centred * inv_std * np.asarray(gamma, np.float64)
    if beta is not None:
        y = y + np.asarray(beta, np.float64)
    return y.astype(dtype), mean.astype(np.float32), inv_std.astype(np.float32), h.astype(dtype)


def skip_simplified_layer_normalization(input, skip, gamma, bias=None, epsilon: float = 1e-12):
    """com.microsoft SkipSimplifiedLayerNormalization -> (output, mean, inv_std_var, sum).

    RMSNorm computes no mean; onnxruntime leaves that optional output unspecified, so the
    reference returns None for it.
    """
    dtype = np.asarray(input).dtype
    h = _skip_sum(input, skip, bias)
    _, _, inv_rms = _stats(h, epsilon, centred=False)
    y = h * inv_rms * np.asarray(gamma, np.float64)
    return y.astype(dtype), None, inv_rms.astype(np.float32), h.astype(dtype)
