"""The Q, K, V projections of an attention block: X @ W (+ b) with constant weights, in the forms
exporters write (MatMul + Add, transformers' Reshape-Gemm-Reshape, one packed MatMul + Split), and
the packed [Wq|Wk|Wv] weight that com.microsoft.Attention takes."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._lib import graph as lib
from onnxopt.passes._lib.graph import new_initializer
from onnxopt.passes._lib.symbolic_shapes import Dim, SymbolicShapes
from onnxopt.passes.base import Decline


# The attributes MultiHeadAttention and Attention share (attention_qkv and unpack_attention carry them over).
KEPT_ATTRIBUTES = ("num_heads", "scale", "unidirectional", "mask_filter_value")


def _const(value: ir.Value | None) -> np.ndarray | None:
    # The legacy exporter shares weights through Identity nodes.
    return lib.constant_array(value, through_identity=True)


@dataclasses.dataclass
class Projection:
    x: ir.Value
    weight: np.ndarray  # [Nin, N]
    bias: np.ndarray | None  # [N]
    weight_value: ir.Value
    bias_value: ir.Value | None
    nodes: list[ir.Node]
    # For a slice of one packed projection: (split node, offset, width, the stored weight and bias
    # values when they hold exactly the packed [Nin, total] matrix and [total] vector, else None).
    packed: tuple | None = None
    exact: tuple | None = None  # (weight value, bias value) when they store weight/bias exactly


def find(q, k, v, shapes, batch, q_len) -> tuple[Projection, Projection, Projection]:
    """The three projections of one input that Attention's packed weight can hold; raises Decline."""
    found = [projection(value, shapes) for value in (q, k, v)]
    if not (found[0].x is found[1].x is found[2].x):
        raise Decline("query, key and value are projections of different inputs (cross-attention)")
    x_dims = shapes.dims(found[0].x)
    if x_dims is None or len(x_dims) != 3 or x_dims[0] != batch or x_dims[1] != q_len:
        raise Decline("the projected input is not proven to be (batch, seq, hidden) of the query")
    return tuple(found)

def projection(value: ir.Value, shapes: SymbolicShapes) -> Projection:
    node = value.producer()
    if lib.standard(node, "Split"):
        return _split_projection(node, value, shapes)
    return _dense(value, shapes)

def _dense(value: ir.Value, shapes: SymbolicShapes) -> Projection:
    """X @ W (+ b) with W a constant 2-D float32 matrix; also the Reshape-Gemm-Reshape form."""
    node = value.producer()
    bias = bias_value = None
    nodes = []
    if lib.standard(node, "Add"):
        consts = [_const(v) for v in node.inputs]
        idx = 0 if consts[0] is not None else 1
        if consts[idx] is None or consts[1 - idx] is not None:
            raise Decline("the projection's Add has no constant bias")
        bias, bias_value = consts[idx], node.inputs[idx]
        if bias.ndim < 1 or any(d != 1 for d in bias.shape[:-1]):
            raise Decline("the projection bias is not a vector over the hidden axis")
        bias = bias.reshape(-1)
        nodes.append(node)
        value = node.inputs[1 - idx]
        node = value.producer()
        if len(value.uses()) != 1:
            raise Decline("the projection MatMul has other uses")
    if lib.standard(node, "MatMul"):
        x, w_value = node.inputs
        weight = _const(w_value)
        if weight is None:
            raise Decline("a projection weight is not a constant")
        nodes.append(node)
        stored = True
    elif lib.standard(node, "Reshape") and lib.standard(node.inputs[0].producer(), "Gemm"):
        x, weight, w_value, gemm_bias, gemm_bias_value, more = _gemm(node, shapes)
        stored = w_value is not None
        nodes.extend(more)
        if gemm_bias is not None:
            if bias is not None:
                gemm_bias = gemm_bias + bias
                bias_value = None
            else:
                bias_value = gemm_bias_value
            bias = gemm_bias
    else:
        raise Decline("a projection is not a MatMul with constant weights")
    # Reuse only initializers themselves (not Identity outputs) and only when they hold exactly
    # the packed matrix and vector.
    stored = stored and w_value.producer() is None
    if stored and (bias is None or (bias_value is not None and bias_value.producer() is None
                                     and _const(bias_value).shape == bias.shape)):
        exact = (w_value, bias_value)
    else:
        exact = None
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise Decline(f"a projection weight is {weight.ndim}-D {weight.dtype}, not 2-D float32")
    if bias is not None and (bias.shape[0] != weight.shape[1] or bias.dtype != np.float32):
        raise Decline("a projection bias does not match its weight")
    return Projection(x, weight, bias, w_value, bias_value, nodes[::-1], exact=exact)

def _gemm(outer: ir.Node, shapes: SymbolicShapes):
    """Reshape(Gemm(Reshape(X, [B*S, Nin]), W, C), [B, S, N]) as transformers' Conv1D exports it."""
    gemm = outer.inputs[0].producer()
    inner = gemm.inputs[0].producer()
    if not lib.standard(inner, "Reshape") or len(gemm.outputs[0].uses()) != 1 or len(inner.outputs[0].uses()) != 1:
        raise Decline("a projection Gemm is not between two reshapes")
    attrs = {k: a.value for k, a in gemm.attributes.items()}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise Decline("a projection Gemm has transA, alpha or beta")
    weight = _const(gemm.inputs[1])
    if weight is None or weight.ndim != 2:
        raise Decline("a projection weight is not a constant")
    if attrs.get("transB", 0):
        weight = weight.T
    bias = None
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        bias = _const(gemm.inputs[2])
        if bias is None or bias.size not in (1, weight.shape[1]):
            raise Decline("a projection Gemm bias is not a constant vector")
        bias = np.broadcast_to(bias.reshape(-1), (weight.shape[1],)).copy()
    x = inner.inputs[0]
    x_dims, flat, out_dims = shapes.dims(x), shapes.dims(inner.outputs[0]), shapes.dims(outer.outputs[0])
    if x_dims is None or len(x_dims) != 3 or flat is None or out_dims is None:
        raise Decline("the shapes around a projection Gemm are unknown")
    if flat != (x_dims[0] * x_dims[1], x_dims[2]) or out_dims != (x_dims[0], x_dims[1], Dim(weight.shape[1])):
        raise Decline("the reshapes around a projection Gemm do not flatten and restore (batch, seq)")
    bias_value = gemm.inputs[2] if bias is not None else None
    # A transposed weight is not the packed matrix as stored.
    w_value = None if attrs.get("transB", 0) else gemm.inputs[1]
    return x, weight, w_value, bias, bias_value, [outer, gemm, inner]

def _split_projection(split: ir.Node, value: ir.Value, shapes: SymbolicShapes) -> Projection:
    packed_value = split.inputs[0]
    rank = shapes.rank(packed_value)
    attr = split.attributes.get("axis")
    axis = attr.value if attr is not None else 0
    if rank is None or axis % rank != rank - 1:
        raise Decline("a packed projection is not split on its last axis")
    packed = _dense(packed_value, shapes)
    width = packed.weight.shape[1]
    sizes = lib.split_sizes(split, width)
    index = list(split.outputs).index(value)
    offset = sum(sizes[:index])
    bias = packed.bias[offset : offset + sizes[index]] if packed.bias is not None else None
    return Projection(
        packed.x,
        packed.weight[:, offset : offset + sizes[index]],
        bias,
        packed.weight_value,
        packed.bias_value,
        packed.nodes + [split],
        packed=(split, offset, sizes[index], width) + (packed.exact or (None, None)),
    )


def packed_weights(graph: ir.Graph, projections) -> tuple[ir.Value, ir.Value | None]:
    """The [Wq|Wk|Wv] and [bq|bk|bv] initializers (the stored ones when they already hold exactly that)."""
    q, k, v = projections
    # One packed projection already in q, k, v order: keep its initializers.
    if q.packed and k.packed and v.packed and q.packed[0] is k.packed[0] is v.packed[0]:
        split, _, _, total, w_value, b_value = q.packed
        offsets = [p.packed[1] for p in projections]
        widths = [p.packed[2] for p in projections]
        if w_value is not None and offsets == [0, widths[0], widths[0] + widths[1]] and sum(widths) == total:
            return w_value, b_value
    weight = np.concatenate([p.weight for p in projections], axis=1)
    w_value = new_initializer(graph, weight, f"{q.weight_value.name}.qkv")
    if all(p.bias is None for p in projections):
        return w_value, None
    bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.weight.shape[1], np.float32) for p in projections])
    base = q.bias_value.name if q.bias_value is not None else f"{q.weight_value.name}.bias"
    return w_value, new_initializer(graph, bias.astype(np.float32), f"{base}.qkv")
