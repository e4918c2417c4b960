"""Numpy references of the GELU-family kernels onnxopt emits (the test oracle for them).

    gelu(x)              = 0.5 * x * (1 + erf(x / sqrt(2)))                       exact GELU
    bias_gelu(a, b)      = gelu(a + b)                                            b over the last axis
    fast_gelu(x, bias)   = 0.5 * h * (1 + tanh(sqrt(2/pi) * (h + 0.044715 * h^3))),  h = x + bias
    quick_gelu(x, alpha) = x * sigmoid(alpha * x)                                 alpha = 1.702 default

Arithmetic is in float64; outputs come back in the input's dtype. numpy has no erf, so the exact
GELU evaluates the standard library's math.erf element by element (slow, but exact to float64).
"""

from __future__ import annotations

import math

import numpy as np

SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715
QUICK_GELU_ALPHA = 1.702

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.asarray(_erf(x), dtype=np.float64).reshape(x.shape)


def gelu(x) -> np.ndarray:
    """com.microsoft Gelu / ONNX Gelu(approximate="none")."""
    h = np.asarray(x, np.float64)
    return (0.5 * h * (1.0 + erf(h / SQRT_2))).astype(np.asarray(x).dtype)


def bias_gelu(a, b) -> np.ndarray:
    """com.microsoft BiasGelu: gelu(a + b), b 1-D over the last axis."""
    h = np.asarray(a, np.float64) + np.asarray(b, np.float64)
    return gelu(h).astype(np.asarray(a).dtype)


def gelu_tanh(x) -> np.ndarray:
    """ONNX Gelu(approximate="tanh"): the tanh approximation."""
    h = np.asarray(x, np.float64)
    y = 0.5 * h * (1.0 + np.tanh(SQRT_2_OVER_PI * (h + TANH_CUBIC * h**3)))
    return y.astype(np.asarray(x).dtype)


def fast_gelu(x, bias=None) -> np.ndarray:
    """com.microsoft FastGelu: the tanh approximation of gelu(x + bias)."""
    h = np.asarray(x, np.float64)
    if bias is not None:
        h = h + np.asarray(bias, np.float64)
    return gelu_tanh(h).astype(np.asarray(x).dtype)


def quick_gelu(x, alpha: float = QUICK_GELU_ALPHA) -> np.ndarray:
    """com.microsoft QuickGelu: x * sigmoid(alpha * x)."""
    h = np.asarray(x, np.float64)
    # sigmoid(t) = (1 + tanh(t / 2)) / 2, which cannot overflow.
    return (h * 0.5 * (1.0 + np.tanh(0.5 * alpha * h))).astype(np.asarray(x).dtype)
