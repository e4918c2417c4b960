"""The one way int8 writes quantization nodes: a QuantizeLinear / DequantizeLinear pair after an
activation, or the DequantizeLinear of stored integer codes (weights per channel, biases in int32)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes.int8.layers import _new_initializer


def _dq(codes: ir.Value, scale: ir.Value, zero_point: ir.Value, like: ir.Value, name: str,
        axis: int | None = None) -> ir.Node:
    attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
    dq = ir.Node("", "DequantizeLinear", [codes, scale, zero_point], attributes=attrs,
                 name=f"{name}.DequantizeLinear", num_outputs=1)
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, like.shape
    return dq


def activation_pair(graph: ir.Graph, value: ir.Value, scale: ir.Value, zero_point: ir.Value) -> list[ir.Node]:
    """Q(value) -> DQ, placed right after `value`'s producer (first in the graph for an input)."""
    q = ir.Node("", "QuantizeLinear", [value, scale, zero_point], name=f"{value.name}.QuantizeLinear", num_outputs=1)
    q.outputs[0].name = f"{value.name}.int8"
    dq = _dq(q.outputs[0], scale, zero_point, value, value.name)
    dq.outputs[0].name = f"{value.name}.int8_dq"
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), [q, dq])
    else:
        graph.insert_after(producer, [q, dq])
    return [q, dq]


def constant_dq(graph: ir.Graph, codes: np.ndarray, scale: np.ndarray, like: ir.Value, base: str, suffix: str,
                axis: int, before: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value]:
    """DequantizeLinear of stored `codes` (per-channel `scale` on `axis`, zero points 0), placed before
    `before`; returns (node, codes value, scale value)."""
    codes_val = _new_initializer(graph, codes, f"{base}.{suffix}")
    scale_val = _new_initializer(graph, scale, f"{base}.{suffix}_scale")
    zp_val = _new_initializer(graph, np.zeros(scale.shape, dtype=codes.dtype), f"{base}.{suffix}_zero_point")
    dq = _dq(codes_val, scale_val, zp_val, like, base, axis)
    dq.outputs[0].name = f"{base}.{suffix}_dq"
    graph.insert_before(before, dq)
    return dq, codes_val, scale_val
