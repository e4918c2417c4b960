"""Attention unpacking (with --int8): a com.microsoft Attention takes its projection back out, so
the projection can be quantized. The inverse of `attention_qkv` (packed.py):

    com.microsoft.Attention(X, W, b, mask_index=M)
        = MultiHeadAttention(q, k, v, key_padding_mask=M),  [q, k, v] = Split(X W + b, [Nq, Nk, Nv], axis=-1)

with the same num_heads, scale, unidirectional and mask_filter_value; [Nq, Nk, Nv] from
qkv_hidden_sizes, else W's width in thirds. This is the form -O3 --int8 emits from an unfused
export (MatMul, bias Add, Split, MultiHeadAttention), so a model that was compiled with -O3 first,
or pruned first and then quantized, is quantized like one compiled with -O3 --int8 at once: the
Attention kernel would keep three quarters of the block's FLOPs in float (on BERT-base, pruned by
40 %, the fused fp32 Attention took 17 % of the int8 model's time).

Exact: Attention computes X W + b, splits it into Q, K, V and runs the same attention core.

Preconditions, each declined with its reason (the Attention then stays float, and quantize_int8
says so too): W a constant 2-D float32 matrix (not an overridable graph input: there would be
nothing to quantize), b absent or a constant vector of W's width; no past state, attention bias or
other inputs, no present output, no attribute beyond the four above and qkv_hidden_sizes; the mask
absent or 2-D int32 [batch, kv length], which MultiHeadAttention's key_padding_mask reads the same
way (other mask_index forms differ between the two kernels).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import catalogue
from onnxopt.passes._lib import graph as lib
from onnxopt.passes._lib.graph import new_initializer
from onnxopt.passes._lib.symbolic_shapes import SymbolicShapes
from onnxopt.passes.attention.projections import KEPT_ATTRIBUTES
from onnxopt.passes.base import Decline, OptPass, need
from onnxopt.passes.registry import register


# order 8: after prune (5), which slices the packed weight per head, before quantize_int8 (10).
@register("unpack_attention", level=0, stage="lossy", flag="int8", order=8,
          targets=catalogue.kernel("MultiHeadAttention").emit_targets)
class UnpackAttentionPass(OptPass):
    """com.microsoft Attention -> MatMul + Add + Split + MultiHeadAttention, so --int8 quantizes the projection."""

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        shapes = SymbolicShapes(graph)
        return self.rewrite_each([n for n in graph if n.domain == lib.MS and n.op_type == "Attention"],
                                 lambda node: self._match(node, shapes),
                                 lambda node, found: self._rewrite(graph, node, *found))

    def _match(self, node: ir.Node, shapes: SymbolicShapes):
        inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
        x, w_value, b_value, mask = inputs[:4]
        need(x is not None and w_value is not None, "the input or the packed weight is missing")
        need(all(v is None for v in inputs[4:]), "the node has a past state, an attention bias or more inputs")
        need(len(node.outputs) == 1 or all(not o.uses() and not o.is_graph_output() for o in node.outputs[1:]),
             "the node's present output is used")
        extra = set(node.attributes) - set(KEPT_ATTRIBUTES) - {"qkv_hidden_sizes"}
        if extra:
            raise Decline(f"attribute {sorted(extra)[0]!r} has no MultiHeadAttention counterpart here")
        need(not w_value.is_graph_input(), f"weight {w_value.name!r} is a graph input (overridable), nothing to quantize")
        weight = lib.constant_array(w_value, through_identity=True)
        need(weight is not None and weight.ndim == 2 and weight.dtype == np.float32,
             "the packed weight is not a constant 2-D float32 matrix")
        width = int(weight.shape[1])
        attr = node.attributes.get("qkv_hidden_sizes")
        widths = [int(n) for n in attr.as_ints()] if attr is not None else [width // 3] * 3
        need(len(widths) == 3 and sum(widths) == width and min(widths) > 0,
             f"qkv_hidden_sizes {widths} do not split the weight's {width} columns")
        need(widths[0] == widths[1], f"qkv_hidden_sizes {widths}: the query and key widths differ")
        if b_value is not None:
            bias = lib.constant_array(b_value, through_identity=True)
            need(bias is not None and bias.shape == (width,), "the packed bias is not a constant vector of the weight's width")
        if mask is not None:
            need(mask.dtype == ir.DataType.INT32 and shapes.rank(mask) == 2,
                 "the mask is not a 2-D int32 [batch, kv length] mask")
        need(x.dtype in (None, ir.DataType.FLOAT), f"the input is {x.dtype}, not float32")
        return x, w_value, b_value, mask, widths

    def _rewrite(self, graph: ir.Graph, node: ir.Node, x, w_value, b_value, mask, widths) -> None:
        base = node.name or "Attention"
        matmul = ir.Node("", "MatMul", [x, w_value], name=f"{base}.qkv", num_outputs=1)
        new_nodes = [matmul]
        packed = matmul.outputs[0]
        if b_value is not None:
            add = ir.Node("", "Add", [packed, b_value], name=f"{base}.qkv_bias", num_outputs=1)
            new_nodes.append(add)
            packed = add.outputs[0]
        # com.microsoft Attention exists from opset 1; Split takes its sizes as an input from 13 on.
        # Attention's input is always (batch, seq, hidden), so the last axis is 2.
        if graph.opset_imports.get("", 1) >= 13:
            sizes = new_initializer(graph, np.array(widths, np.int64), f"{base}.qkv_split")
            split = ir.Node("", "Split", [packed, sizes], attributes=[ir.AttrInt64("axis", 2)],
                            name=f"{base}.qkv_split", num_outputs=3)
        else:
            split = ir.Node("", "Split", [packed], attributes=[ir.AttrInt64("axis", 2), ir.AttrInt64s("split", widths)],
                            name=f"{base}.qkv_split", num_outputs=3)
        new_nodes.append(split)
        attrs = [node.attributes[name] for name in KEPT_ATTRIBUTES if name in node.attributes]
        q, k, v = split.outputs
        inputs = [q, k, v, None, mask] if mask is not None else [q, k, v]
        name = base.replace("Attention", "MultiHeadAttention") if "Attention" in base else f"{base}.mha"
        mha = ir.Node(lib.MS, "MultiHeadAttention", inputs, attributes=attrs, name=name, num_outputs=1)
        new_nodes.append(mha)
        lib.substitute(graph, node, new_nodes, mha.outputs[0])
