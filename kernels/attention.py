"""Numpy references for onnxruntime's com.microsoft attention kernels and FusedMatMul.

Each function computes what onnxruntime's CPU kernel computes (float32 in, float32 out), written
from the kernels' contracts:

Attention(input[B,S,Nin], weights[Nin, Nq+Nk+Nv], bias?[Nq+Nk+Nv], mask_index?) -> [B,S,Nv]
    Q, K, V = split(input @ weights + bias), each cut into num_heads heads of size Nq/H, Nk/H, Nv/H
    out = merge_heads(softmax(scale * Q K^T + mask) V), scale defaulting to 1/sqrt(Nq/H)

MultiHeadAttention(query[B,S,Nq], key[B,L,Nk], value[B,L,Nv], bias?, key_padding_mask?,
                   attention_bias?) -> [B,S,Nv]
    the same core on already projected Q, K, V (bias, if given, is added to each first).

The additive mask follows onnxruntime's PrepareMask: a 2-D 0/1 mask [B, T] (or 3-D [B, S, T])
contributes 0 where the mask is > 0 and `mask_filter_value` (default -10000) elsewhere;
unidirectional=1 adds `mask_filter_value` again to every key after the query's position (so a
key both padded and in the future gets 2 * mask_filter_value); attention_bias [B|1, H|1, S, T]
is added as is. Rows where every key is masked are therefore not special-cased: they come out as
whatever softmax makes of the filtered scores.

QAttention(input, weight, bias, input_scale, weight_scale, mask_index?, input_zero_point?,
           weight_zero_point?) -> [B,S,N]
    Attention whose projection is MatMulIntegerToFloat's integer product (kernels/quantize.py);
    Q, K and V of equal width N.

FusedMatMul(A, B) -> alpha * op(A) @ op(B), op transposing the last two axes when transA/transB,
and (transBatchA/B) moving the first batch axis to just before the last two.

Pure numpy; scores and softmax in float32 as the kernels do.
"""

from __future__ import annotations

import numpy as np

from onnxopt.kernels.quantize import matmul_integer_to_float

DEFAULT_MASK_FILTER_VALUE = -10000.0


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def _split_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    b, s, n = x.shape
    if n % num_heads:
        raise ValueError(f"hidden size {n} is not a multiple of num_heads {num_heads}")
    return x.reshape(b, s, num_heads, n // num_heads).transpose(0, 2, 1, 3)


def additive_mask(
    mask_index: np.ndarray | None,
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    unidirectional: int = 0,
    mask_filter_value: float = DEFAULT_MASK_FILTER_VALUE,
) -> np.ndarray:
    """The [B, S, T] float32 mask onnxruntime adds to the scaled scores."""
    f = np.float32(mask_filter_value)
    mask = np.zeros((batch, q_len, kv_len), dtype=np.float32)
    if mask_index is not None:
        m = np.asarray(mask_index)
        if m.ndim == 2:
            if m.shape != (batch, kv_len):
                raise ValueError(f"2-D mask_index must be {(batch, kv_len)}, got {m.shape}")
            mask[:] = np.where(m[:, None, :] > 0, np.float32(0), f)
        elif m.ndim == 3:
            if m.shape != (batch, q_len, kv_len):
                raise ValueError(f"3-D mask_index must be {(batch, q_len, kv_len)}, got {m.shape}")
            mask[:] = np.where(m > 0, np.float32(0), f)
        else:
            raise ValueError(f"mask_index of rank {m.ndim} is not supported by the reference")
    if unidirectional:
        past = kv_len - q_len
        future = np.arange(kv_len)[None, :] > (past + np.arange(q_len))[:, None]
        with np.errstate(over="ignore"):
            mask = mask + np.where(future, f, np.float32(0))[None]
    return mask.astype(np.float32)


def _core(q, k, v, num_heads, scale, mask, attention_bias, heads_kv=None):
    """q [B,S,Nq], k [B,L,Nk], v [B,L,Nv] -> [B,S,Nv]."""
    qh, kh, vh = (_split_heads(t, num_heads) for t in (q, k, v))
    head_size = qh.shape[-1]
    if scale is None or scale == 0.0:
        scale = 1.0 / np.sqrt(head_size)
    scores = np.float32(scale) * np.matmul(qh, kh.transpose(0, 1, 3, 2)).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        scores = scores + mask[:, None, :, :]
        if attention_bias is not None:
            scores = scores + np.asarray(attention_bias, dtype=np.float32)
        probs = _softmax(scores.astype(np.float32))
    out = np.matmul(probs, vh)  # [B, H, S, Dv]
    b, h, s, dv = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, s, h * dv).astype(np.float32)


def attention(
    input: np.ndarray,  # noqa: A002 - the contract's name
    weights: np.ndarray,
    bias: np.ndarray | None = None,
    mask_index: np.ndarray | None = None,
    *,
    num_heads: int,
    scale: float | None = None,
    unidirectional: int = 0,
    qkv_hidden_sizes: tuple[int, int, int] | None = None,
    mask_filter_value: float = DEFAULT_MASK_FILTER_VALUE,
    attention_bias: np.ndarray | None = None,
) -> np.ndarray:
    """com.microsoft.Attention (no past state): packed QKV projection + scaled dot-product attention."""
    x = np.asarray(input, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    if x.ndim != 3 or w.ndim != 2 or w.shape[0] != x.shape[2]:
        raise ValueError(f"input {x.shape} and weights {w.shape} do not fit")
    if qkv_hidden_sizes is None:
        if w.shape[1] % 3:
            raise ValueError(f"weights width {w.shape[1]} is not 3 * hidden")
        qkv_hidden_sizes = (w.shape[1] // 3,) * 3
    nq, nk, nv = (int(n) for n in qkv_hidden_sizes)
    if nq != nk or nq + nk + nv != w.shape[1]:
        raise ValueError(f"qkv_hidden_sizes {qkv_hidden_sizes} do not fit weights {w.shape}")
    qkv = np.matmul(x, w)
    if bias is not None:
        qkv = qkv + np.asarray(bias, dtype=np.float32)
    q, k, v = qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
    b, s, _ = x.shape
    mask = additive_mask(mask_index, b, s, s, unidirectional=unidirectional, mask_filter_value=mask_filter_value)
    return _core(q, k, v, num_heads, scale, mask, attention_bias)


def multi_head_attention(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    bias: np.ndarray | None = None,
    key_padding_mask: np.ndarray | None = None,
    attention_bias: np.ndarray | None = None,
    *,
    num_heads: int,
    scale: float | None = None,
    unidirectional: int = 0,
    mask_filter_value: float = DEFAULT_MASK_FILTER_VALUE,
) -> np.ndarray:
    """com.microsoft.MultiHeadAttention with separate 3-D query/key/value (no past state)."""
    q, k, v = (np.asarray(t, dtype=np.float32) for t in (query, key, value))
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError("the reference takes 3-D query, key and value")
    if bias is not None:
        nq, nk = q.shape[2], k.shape[2]
        bias = np.asarray(bias, dtype=np.float32)
        q, k, v = q + bias[:nq], k + bias[nq : nq + nk], v + bias[nq + nk :]
    b, s, _ = q.shape
    length = k.shape[1]
    mask = additive_mask(
        key_padding_mask, b, s, length, unidirectional=unidirectional, mask_filter_value=mask_filter_value
    )
    return _core(q, k, v, num_heads, scale, mask, attention_bias)


def fused_matmul(
    a: np.ndarray,
    b: np.ndarray,
    *,
    alpha: float = 1.0,
    transA: int = 0,  # noqa: N803 - the contract's attribute names
    transB: int = 0,  # noqa: N803
    transBatchA: int = 0,  # noqa: N803
    transBatchB: int = 0,  # noqa: N803
) -> np.ndarray:
    """com.microsoft.FusedMatMul: alpha * op(A) @ op(B)."""

    def prepare(x, trans, trans_batch):
        x = np.asarray(x, dtype=np.float32)
        if trans_batch and x.ndim > 2:
            # [b0, b1.., M, K] -> [b1.., M, b0, K]: the first batch axis moves next to the last.
            x = np.moveaxis(x, 0, -2)
        if trans and x.ndim >= 2:
            x = np.swapaxes(x, -1, -2)
        return x

    out = np.matmul(prepare(a, transA, transBatchA), prepare(b, transB, transBatchB))
    return (np.float32(alpha) * out).astype(np.float32)


def qattention(
    input: np.ndarray,  # noqa: A002 - the contract's name
    weight: np.ndarray,
    bias: np.ndarray,
    input_scale,
    weight_scale,
    mask_index: np.ndarray | None = None,
    input_zero_point=None,
    weight_zero_point=None,
    *,
    num_heads: int,
    scale: float | None = None,
    unidirectional: int = 0,
    mask_filter_value: float = DEFAULT_MASK_FILTER_VALUE,
) -> np.ndarray:
    """com.microsoft.QAttention (no past state): Attention whose packed projection is the integer
    product MatMulIntegerToFloat(input, weight, input_scale, weight_scale, zero points, bias)."""
    qkv = matmul_integer_to_float(input, weight, input_scale, weight_scale, input_zero_point, weight_zero_point, bias)
    n = qkv.shape[-1] // 3
    b, s, _ = qkv.shape
    mask = additive_mask(mask_index, b, s, s, unidirectional=unidirectional, mask_filter_value=mask_filter_value)
    return _core(qkv[..., :n], qkv[..., n:2 * n], qkv[..., 2 * n:], num_heads, scale, mask, None)
