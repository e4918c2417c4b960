"""Attention fusion, stage 2 (-O3, onnxruntime targets, not with --int8): a MultiHeadAttention
whose query, key and value are projections of one input takes the projections in.

    MultiHeadAttention(X Wq + bq, X Wk + bk, X Wv + bv, key_padding_mask=M)
        = com.microsoft.Attention(X, [Wq|Wk|Wv], [bq|bk|bv], mask_index=M)

with the same num_heads, scale, unidirectional and mask_filter_value (and qkv_hidden_sizes when V's
width differs). Preconditions, each declined with its reason: the three projections have constant
2-D float32 weights over one shared rank-3 input with the query's (batch, seq) dims
(attention/projections.py); every projection value is used by this node only; the node has no
attention bias, past state or other inputs, and its mask is absent or 2-D int32 [batch, kv length],
which Attention's mask_index reads the same way. With --int8 this stage does not run: Attention
would hide the projection (three quarters of the block's FLOPs) inside a float kernel, while the
MatMuls before MultiHeadAttention are quantized.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.kernels import catalogue
from onnxopt.passes._lib import graph as lib
from onnxopt.passes._lib.symbolic_shapes import SymbolicShapes
from onnxopt.passes.attention import projections
from onnxopt.passes.attention.projections import KEPT_ATTRIBUTES
from onnxopt.passes.base import Decline, OptPass, need
from onnxopt.passes.registry import register



@register("attention_qkv", level=3, stage="fusion", targets=catalogue.kernel("Attention").emit_targets,
          order=51, unless="int8")
class AttentionQKVPass(OptPass):
    """MultiHeadAttention over three projections of one input -> com.microsoft Attention (packed QKV)."""

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        shapes = SymbolicShapes(graph)
        return self.rewrite_each([n for n in graph if n.domain == lib.MS and n.op_type == "MultiHeadAttention"],
                                 lambda node: self._match(node, shapes),
                                 lambda node, found: self._rewrite(graph, node, found))

    def _match(self, node: ir.Node, shapes: SymbolicShapes):
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        q, k, v, bias, mask = inputs[:5]
        need(q is not None and k is not None and v is not None, "query, key or value is missing (packed input)")
        need(bias is None and all(x is None for x in inputs[5:]), "the node has an attention bias, past state or more")
        extra = set(node.attributes) - set(KEPT_ATTRIBUTES)
        if extra:
            raise Decline(f"attribute {sorted(extra)[0]!r} has no Attention counterpart here")
        if mask is not None:
            need(mask.dtype == ir.DataType.INT32 and shapes.rank(mask) == 2,
                 "the key padding mask is not a 2-D int32 [batch, kv length] mask")
        q_dims = shapes.dims(q)
        need(q_dims is not None and len(q_dims) == 3, "the query is not a (batch, seq, hidden) tensor")
        found = projections.find(q, k, v, shapes, q_dims[0], q_dims[1])
        inside = {n for p in found for n in p.nodes} | {node}
        for p in found:
            for n in p.nodes:
                for value in n.outputs:
                    need(not value.is_graph_output() and all(u.node in inside for u in value.uses()),
                         f"the projection value {value.name!r} is also used outside the attention block")
        return found, mask

    def _rewrite(self, graph: ir.Graph, node: ir.Node, found) -> None:
        projs, mask = found
        weight, bias = projections.packed_weights(graph, projs)
        attrs = [node.attributes[name] for name in KEPT_ATTRIBUTES if name in node.attributes]
        widths = [p.weight.shape[1] for p in projs]
        if widths[2] != widths[0]:
            attrs.append(ir.AttrInt64s("qkv_hidden_sizes", widths))
        inputs = [projs[0].x, weight, bias, mask]
        while inputs and inputs[-1] is None:
            inputs.pop()
        name = node.name.replace("MultiHeadAttention", "Attention") if node.name else "Attention"
        new = ir.Node(lib.MS, "Attention", inputs, attributes=attrs, name=name, num_outputs=1)
        lib.substitute(graph, node, [new], new.outputs[0])
