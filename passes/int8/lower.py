"""Integer kernels for the cpu target (with --int8): the QDQ graph quantize_int8 writes, lowered to
the onnxruntime CPU kernels it stands for, including the bias and the attention block that
onnxruntime's own QDQ fusion leaves as separate float kernels:

    MatMul(DQ(x_q, s_x, z_x), DQ(W_q, s_w, z_w)) [+ b]
        = com.microsoft.MatMulIntegerToFloat(x_q, W_q, s_x, s_w, z_x, z_w[, b])
    BiasGelu(MatMul(...), b) = com.microsoft.Gelu(MatMulIntegerToFloat(..., b))

    MultiHeadAttention(Split(MatMulIntegerToFloat(x_q, W_q, s_x, s_w, z_x, z_w, b), 3 equal), mask)
        = com.microsoft.QAttention(x_q, W_q, b, s_x, s_w, mask, z_x, z_w)

with MultiHeadAttention's num_heads, scale, unidirectional and mask_filter_value.

Why: onnxruntime turns DQ -> MatMul into MatMulIntegerToFloat itself, but leaves the bias Add
next to it (on BERT-base pruned by 40 % and quantized: 36 Adds, 6 % of the time; BiasGelu's bias
add costs more than the GELU itself) and runs the
packed projection, its bias, the Split and MultiHeadAttention as four kernels where QAttention is
one. Exact up to float rounding: the integer kernels sum the products of the codes exactly and
scale once, the QDQ graph (as float ops) sums dequantized products; onnxruntime runs the integer
kernel for the QDQ form anyway, and that is what quantize_int8's fidelity check measured.

Preconditions, each declined with its reason (the QDQ form then stays, for onnxruntime's fusion):
both MatMul inputs from DequantizeLinear with float32 scales and no block_size; the activation's
scale and zero point scalars; the weight's codes a constant 2-D matrix, its scale and zero point
scalars or per column (axis 1); (activation, weight) codes u8 x s8, u8 x u8 or s8 x s8, the pairs
the CPU kernel has. The bias is fused only from the MatMul's one consumer, an Add or a BiasGelu
of a constant float32 vector of the output's width. QAttention: the MultiHeadAttention's query, key and value are
a Split's three equal outputs, in order, of a MatMulIntegerToFloat with a u8 3-D input used by
nothing else; no attention bias or past state, a 2-D int32 key_padding_mask or none, no
attribute beyond the four above, at most one of a projection bias and a MultiHeadAttention bias.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._lib import graph as lib
from onnxopt.passes._lib.graph import constant_array, new_initializer
from onnxopt.passes._lib.symbolic_shapes import SymbolicShapes
from onnxopt.passes.base import Decline, OptPass, need
from onnxopt.passes.registry import register

U8, S8 = ir.DataType.UINT8, ir.DataType.INT8
# (activation, weight) code types of onnxruntime's CPU MatMulIntegerToFloat kernels.
KERNEL_PAIRS = {(U8, S8), (U8, U8), (S8, S8)}
MHA_ATTRIBUTES = ("num_heads", "scale", "unidirectional", "mask_filter_value")


def _code_type(codes: ir.Value | None, zero_point: ir.Value | None = None):
    """The element type of integer codes: the value's, else its zero point's, else (for a
    QuantizeLinear's output) its zero point's or the spec's default u8; onnx_ir does not always
    know the type of a QuantizeLinear output."""
    if codes is None:
        return None
    if codes.dtype is not None:
        return codes.dtype
    producer = codes.producer()
    if zero_point is None and lib.standard(producer, "QuantizeLinear"):
        zero_point = lib.optional_input(producer, 2)
        if zero_point is None:
            return U8
    zp = constant_array(zero_point)
    return ir.DataType.from_numpy(zp.dtype) if zp is not None else None


def _dq_code_type(dq: ir.Node):
    return _code_type(dq.inputs[0], lib.optional_input(dq, 2))


# order 12: after quantize_int8 (10), whose QDQ graph it lowers, and before fp16.
@register("lower_int8", level=0, stage="lossy", flag="int8", order=12, targets=("cpu",))
class LowerInt8Pass(OptPass):
    """QDQ MatMul (+ bias) -> MatMulIntegerToFloat; its packed projection + Split + MultiHeadAttention -> QAttention."""

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        # Candidates: MatMuls with a quantized input (the float ones, e.g. attention scores or
        # layers the fidelity control kept float, are not lowering's business).
        quantized = [n for n in graph if lib.standard(n, "MatMul")
                     and any(lib.produced_by(v, "DequantizeLinear") for v in n.inputs)]
        fired = self.rewrite_each(quantized,
                                  self._match_matmul, lambda node, found: self._lower_matmul(graph, node, *found))
        shapes = SymbolicShapes(graph)
        fired += self.rewrite_each([n for n in graph if n.domain == lib.MS and n.op_type == "MultiHeadAttention"],
                                   lambda node: self._match_attention(node, shapes),
                                   lambda node, found: self._lower_attention(graph, node, *found))
        if fired:
            lib.ensure_opset(model, lib.MS)
        return fired

    # ---- MatMul -> MatMulIntegerToFloat ------------------------------------------------------

    @staticmethod
    def _dequantize(value: ir.Value | None, what: str) -> tuple[ir.Node, np.ndarray, np.ndarray | None]:
        node = value.producer() if value is not None else None
        need(lib.standard(node, "DequantizeLinear"),
             f"the {what} does not come from DequantizeLinear")
        need("block_size" not in node.attributes, f"the {what}'s DequantizeLinear is block-wise")
        inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
        scale = constant_array(inputs[1])
        need(scale is not None and scale.dtype == np.float32, f"the {what}'s scale is not a float32 constant")
        zero_point = None
        if inputs[2] is not None:
            zero_point = constant_array(inputs[2])
            need(zero_point is not None and zero_point.shape == scale.shape,
                 f"the {what}'s zero point is not a constant of its scale's shape")
        return node, scale, zero_point

    def _match_matmul(self, node: ir.Node):
        a_dq, a_scale, _ = self._dequantize(node.inputs[0], "activation")
        b_dq, b_scale, _ = self._dequantize(node.inputs[1], "weight")
        need(a_scale.ndim == 0, "the activation is quantized per axis; the kernel takes one scale")
        codes = constant_array(b_dq.inputs[0])
        need(codes is not None and codes.ndim == 2, "the weight's codes are not a constant 2-D matrix")
        per_column = b_scale.ndim == 1 and b_scale.shape[0] == codes.shape[1] and \
            b_dq.attributes.get_int("axis", 1) in (1, -1)
        need(b_scale.ndim == 0 or per_column, "the weight is not quantized per tensor or per column (axis 1)")
        pair = (_dq_code_type(a_dq), _dq_code_type(b_dq))
        need(pair in KERNEL_PAIRS, f"{pair[0]} x {pair[1]} codes: onnxruntime's CPU kernel takes u8 x s8, u8 x u8 or s8 x s8")
        return a_dq, b_dq, self._bias(node, codes.shape[1])

    @staticmethod
    def _bias(node: ir.Node, width: int) -> tuple[ir.Node, ir.Value] | None:
        """(consumer, bias) when the MatMul's one consumer adds a constant float32 [width] vector:
        an Add, or a com.microsoft BiasGelu (whose bias then moves into the kernel)."""
        out = node.outputs[0]
        uses = out.uses()
        if out.is_graph_output() or len(uses) != 1:
            return None
        consumer, idx = uses[0].node, uses[0].idx
        if lib.standard(consumer, "Add"):
            other = consumer.inputs[1 - idx]
        elif consumer.domain == lib.MS and consumer.op_type == "BiasGelu" and idx == 0 and len(consumer.inputs) == 2:
            other = consumer.inputs[1]
        else:
            return None
        bias = constant_array(other)
        if other is consumer.inputs[idx] or bias is None or bias.dtype != np.float32 or bias.shape != (width,):
            return None
        return consumer, other

    def _lower_matmul(self, graph: ir.Graph, node: ir.Node, a_dq: ir.Node, b_dq: ir.Node, bias) -> None:
        a_in = (list(a_dq.inputs) + [None])[:3]
        b_in = (list(b_dq.inputs) + [None])[:3]
        inputs = [a_in[0], b_in[0], a_in[1], b_in[1], a_in[2], b_in[2]]
        last = node
        if bias is not None:
            last, b_value = bias
            inputs.append(b_value)
        while inputs and inputs[-1] is None:
            inputs.pop()
        base = node.name or "MatMul"
        lowered = ir.Node(lib.MS, "MatMulIntegerToFloat", inputs, name=f"{base}.int8", num_outputs=1)
        new_nodes, result = [lowered], lowered.outputs[0]
        if last.op_type == "BiasGelu":
            # Gelu(A + B) with the bias added in the kernel: onnxruntime's CPU Gelu runs in 75 us
            # where BiasGelu takes 175 us at [1, 128, 2736] (2 threads), the same erf GELU.
            gelu = ir.Node(lib.MS, "Gelu", [result], name=last.name or f"{base}.gelu", num_outputs=1)
            result.name = f"{base}.int8_biased"
            new_nodes, result = [lowered, gelu], gelu.outputs[0]
        lib.substitute(graph, last, new_nodes, result)

    # ---- packed projection + Split + MultiHeadAttention -> QAttention ---------------------------

    def _match_attention(self, node: ir.Node, shapes: SymbolicShapes):
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        q, k, v, mha_bias, mask = inputs[:5]
        need(all(x is None for x in inputs[5:]), "the node has an attention bias or a past state")
        need(all(not o.uses() and not o.is_graph_output() for o in node.outputs[1:]), "the node's present outputs are used")
        extra = set(node.attributes) - set(MHA_ATTRIBUTES)
        if extra:
            raise Decline(f"attribute {sorted(extra)[0]!r} has no QAttention counterpart")
        split = q.producer() if q is not None else None
        need(lib.standard(split, "Split") and
             len(split.outputs) == 3 and [q, k, v] == list(split.outputs),
             "query, key and value are not the three outputs of one Split")
        need(all(len(o.uses()) == 1 and not o.is_graph_output() for o in split.outputs),
             "a Split output has another consumer")
        projection = split.inputs[0].producer()
        need(projection is not None and projection.domain == lib.MS and projection.op_type == "MatMulIntegerToFloat",
             "the Split's input is not an integer projection (MatMulIntegerToFloat)")
        need(len(split.inputs[0].uses()) == 1 and not split.inputs[0].is_graph_output(),
             "the projection has another consumer")
        # MultiHeadAttention takes a 3-D query when key and value are given (and those, of the
        # query's rank here, cannot be the 4-D form), so an unknown rank is 3 by its contract.
        rank = shapes.rank(projection.inputs[0])
        need(rank in (None, 3), f"the projection's input is {rank}-D, not [batch, sequence, hidden]")
        need(_code_type(projection.inputs[0], lib.optional_input(projection, 4)) == U8,
             "the projection's input codes are not u8 (QAttention takes u8)")
        width = constant_array(projection.inputs[1]).shape[1]
        axis = split.attributes.get_int("axis", 0)
        need(axis in (2, -1), f"the Split is on axis {axis}, not the last")
        sizes = lib.split_sizes(split, width)
        need(sizes == [width // 3] * 3, f"the Split's sizes {sizes} are not three equal thirds")
        projection_bias = lib.optional_input(projection, 6)
        need(projection_bias is None or mha_bias is None, "both the projection and MultiHeadAttention add a bias")
        if mha_bias is not None:
            b = constant_array(mha_bias)
            need(b is not None and b.dtype == np.float32 and b.shape == (width,),
                 "MultiHeadAttention's bias is not a constant float32 vector of the projection's width")
        if mask is not None:
            need(mask.dtype == ir.DataType.INT32 and shapes.rank(mask) == 2,
                 "the mask is not a 2-D int32 [batch, kv length] mask")
        return split, projection, projection_bias or mha_bias, mask, width

    def _lower_attention(self, graph: ir.Graph, node: ir.Node, split: ir.Node, projection: ir.Node, bias, mask, width) -> None:
        p = list(projection.inputs) + [None] * (7 - len(projection.inputs))
        if bias is None:  # QAttention's bias is not optional
            bias = new_initializer(graph, np.zeros(width, np.float32), f"{projection.inputs[1].name}.bias")
        inputs = [p[0], p[1], bias, p[2], p[3], mask, p[4], p[5]]
        while inputs and inputs[-1] is None:
            inputs.pop()
        attrs = [node.attributes[name] for name in MHA_ATTRIBUTES if name in node.attributes]
        base = node.name or "MultiHeadAttention"
        name = base.replace("MultiHeadAttention", "QAttention") if "MultiHeadAttention" in base else f"{base}.int8"
        fused = ir.Node(lib.MS, "QAttention", inputs, attributes=attrs, name=name, num_outputs=1)
        lib.substitute(graph, node, [fused], fused.outputs[0])
