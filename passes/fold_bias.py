"""Bias and scale folding (-O2, every target).

    Add(Conv(x, W, b), t)  = Conv(x, W, b + t)                  t per output channel
    Mul(Conv(x, W, b), s)  = Conv(x, W * s, b * s)              s per output channel
    Add(MatMul(a, B), c)   = Gemm(a, B, c)                      a, B 2-D; c broadcasts to [N] / [1, N]

(likewise for ConvTranspose, whose output channel g * M/group + j lives in W[:, j] of group g).
Add and Mul are matched with either operand order.

Preconditions (refusals are reported with their reason):
- t / s / c are constants, not graph inputs (a caller may override those);
- t and s vary along the channel axis (1) only: after right-aligned broadcasting against the
  rank-r output their shape is [1, C or 1, 1, ...]. A [C]-shaped constant on a 4-D Conv output
  broadcasts along the *last* (width) axis, so it is refused, not folded;
- what is rewritten is used by this Conv only: the bias b for Add (W is kept as is, so it may be
  shared), W and b for Mul; the Conv output is used by the Add/Mul only (matcher-enforced);
- MatMul -> Gemm: a has rank 2 (its shape says so, or, B being 2-D, the MatMul's or the Add's
  output rank does), B a rank-2 constant, c's shape [N], [1, N], [1] or [],
  and a floating-point type (onnxruntime has no integer Gemm kernel).
Two cases are not candidates and are not reported, so the report is not flooded: an Add/Mul whose
other operand is computed (a residual add, a gate), and MatMul + Add on N-D inputs, e.g.
transformer [batch, seq, hidden] projections, whose biases the -O3 fusions absorb; the latter are
counted in one summary line.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.kernels import folding
from onnxopt.passes._lib import graph as lib
from onnxopt.passes.base import RewritePass
from onnxopt.passes._lib.folding import check_weights, note_shared_outputs, producer_layout, rank_of
from onnxopt.passes._lib.graph import new_initializer, optional_input
from onnxopt.passes.base import Decline, need
from onnxopt.passes.registry import register

# A failed check whose reason starts with this is not a candidate: it is counted, not listed.
_QUIET = "not a candidate: "
_GEMM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})


def _operand(value: ir.Value, what: str) -> np.ndarray:
    """The constant operand; a Decline otherwise, quiet (not listed) when the operand is computed."""
    if value.const_value is not None or lib.constant_array(value) is not None:
        return lib.constant(value, what)
    raise Decline(f"{_QUIET}{what} is computed")


def _channel_reason(c: np.ndarray, rank: int, channels: int, what: str) -> str:
    padded = (1,) * max(rank - c.ndim, 0) + c.shape
    if c.ndim > rank:
        return f"{what} of shape {c.shape} has a higher rank than the rank-{rank} output"
    axes = [i for i, d in enumerate(padded) if i != 1 and d != 1]
    if axes:
        return (f"{what} of shape {c.shape} varies along axis {axes[0]} of the rank-{rank} output, "
                "not only the channel axis 1")
    return f"{what} of shape {c.shape} has {padded[1]} channels, the output {channels}"


class _ConvChannelOp(pattern.RewriteRuleClassBase):
    """Shared matching of Op(Conv-like(x, W, ...), constant) for per-channel constants."""

    producer_op = "Conv"
    consumer_op = "Add"

    def pattern(self, op, x, w, c):
        y = getattr(op, self.producer_op)(x, w, _allow_other_inputs=True, _outputs=["conv_out"])
        return getattr(op, self.consumer_op)(y, c)

    def _vector(self, w: ir.Value, c: ir.Value, conv: ir.Node) -> tuple[np.ndarray, int]:
        """(per-channel vector, channel count); raises Decline."""
        what = f"the {self.consumer_op}'s other operand"
        array = _operand(c, what)
        need(w.shape is not None and all(isinstance(d, int) for d in w.shape.dims),
             f"{conv.op_type} weights' shape is unknown")
        layout, group = producer_layout(conv)
        dims = tuple(w.shape.dims)
        need(len(dims) >= 3 and not (layout == "conv_transpose" and (group < 1 or dims[0] % group)),
             f"{conv.op_type} weights have shape {dims}")
        channels = folding.output_channels(np.empty(dims, dtype=np.uint8), layout, group)
        rank = rank_of(conv.outputs[0]) or len(dims)
        vector = folding.channel_vector(array, rank, channels)
        if vector is None:
            raise Decline(_channel_reason(array, rank, channels, what))
        return vector, channels


def _check_bias(conv: ir.Node, channels: int) -> None:
    """The Conv's bias, if any, is a rewritable constant with one value per output channel."""
    bias = optional_input(conv, 2)
    if bias is not None:
        b = lib.rewritable_constant(bias, f"{conv.op_type} bias")
        need(b.size == channels, f"{conv.op_type} bias has shape {b.shape}")


class ConvAddBias(_ConvChannelOp):
    """Add(Conv(x, W, b), t) -> Conv(x, W, b + t)."""

    @lib.declines_as_fail
    def check(self, context, x, w, c, conv_out, **_):
        conv = conv_out.producer()
        _check_bias(conv, channels=self._vector(w, c, conv)[1])
        return lib.ok()

    def rewrite(self, op, x, w, c, conv_out, **_):
        conv = conv_out.producer()
        vector, channels = self._vector(w, c, conv)
        bias = optional_input(conv, 2)
        b = None if bias is None else lib.constant_array(bias)
        new_b = folding.fold_bias(b, vector, channels, like=vector)  # the Add's (= the Conv's) dtype
        base = f"{bias.name}.biasfold" if bias is not None else f"{c.name}.biasfold"
        b_value = new_initializer(conv.graph, new_b, base, op)
        return op.op(conv.op_type, x, w, b_value, **dict(conv.attributes))


class ConvMulScale(_ConvChannelOp):
    """Mul(Conv(x, W, b), s) -> Conv(x, W * s, b * s)."""

    consumer_op = "Mul"

    @lib.declines_as_fail
    def check(self, context, x, w, c, conv_out, **_):
        conv = conv_out.producer()
        channels = self._vector(w, c, conv)[1]
        reason = check_weights(conv, lib.rewritable_constant(w, f"{conv.op_type} weights"), channels=channels)
        need(reason is None, reason)
        _check_bias(conv, channels=channels)
        return lib.ok()

    def rewrite(self, op, x, w, c, conv_out, **_):
        conv = conv_out.producer()
        vector, _ = self._vector(w, c, conv)
        layout, group = producer_layout(conv)
        bias = optional_input(conv, 2)
        b = None if bias is None else lib.constant_array(bias)
        new_w, new_b = folding.fold_scale(lib.constant_array(w), b, vector, layout, group)
        inputs = [x, new_initializer(conv.graph, new_w, f"{w.name}.mulfold", op)]
        if new_b is not None:
            inputs.append(new_initializer(conv.graph, new_b, f"{bias.name}.mulfold", op))
        return op.op(conv.op_type, *inputs, **dict(conv.attributes))


class ConvTransposeAddBias(ConvAddBias):
    producer_op = "ConvTranspose"


class ConvTransposeMulScale(ConvMulScale):
    producer_op = "ConvTranspose"


def _a_rank(a: ir.Value, b: ir.Value, mm_out: ir.Value, add_out: ir.Value, bias: np.ndarray) -> int | None:
    """A's rank, from its own shape or, with a 2-D B (MatMul then keeps A's rank when it is
    >= 2), from the MatMul's or the Add's output (the latter when the bias cannot raise it)."""
    if a.shape is not None:
        return len(a.shape)
    if b.shape is None or len(b.shape) != 2:
        return None
    rank = rank_of(mm_out)
    if rank is None and bias.ndim <= 1:
        rank = rank_of(add_out)
    return rank if rank is not None and rank >= 2 else None


class MatMulAddToGemm(pattern.RewriteRuleClassBase):
    """Add(MatMul(a, B), c) -> Gemm(a, B, c) for 2-D a and B."""

    def pattern(self, op, a, b, c):
        return op.Add(op.MatMul(a, b, _outputs=["mm_out"]), c, _outputs=["add_out"])

    @lib.declines_as_fail
    def check(self, context, a, b, c, mm_out, add_out, **_):
        bias = _operand(c, "the Add's other operand")
        need(_a_rank(a, b, mm_out, add_out, bias) == 2, f"{_QUIET}MatMul input is not known to be 2-D")
        weights = lib.constant(b, "MatMul's B")
        need(ir.DataType.from_numpy(weights.dtype) in _GEMM_TYPES,
             f"MatMul is {weights.dtype}; onnxruntime has no Gemm kernel for that type")
        need(weights.ndim == 2, f"MatMul's B has rank {weights.ndim}, expected 2")
        n = weights.shape[1]
        need(not (bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, n)) or (bias.ndim == 2 and bias.shape[0] != 1)),
             f"the bias of shape {bias.shape} does not broadcast to [{n}] or [1, {n}]")
        return lib.ok()

    def rewrite(self, op, a, b, c, **_):
        return op.Gemm(a, b, c)


@register("fold_bias", level=2, stage="fusion", order=20)
class FoldBiasPass(RewritePass):
    """Conv + per-channel Add/Mul fold into the Conv's bias/weights; 2-D MatMul + Add = Gemm."""

    def __init__(self) -> None:
        rules = [ConvAddBias.rule(), ConvMulScale.rule(), ConvTransposeAddBias.rule(),
                 ConvTransposeMulScale.rule(), MatMulAddToGemm.rule()]
        super().__init__([variant for rule in rules for variant in rule.commute()])
        self._quiet: set[tuple[str, str, str]] = set()

    def decline(self, rule, node, reason) -> None:
        # (The commuted variant of a rule finding the same candidate is de-duplicated by the base.)
        if reason.startswith(_QUIET):
            self._quiet.add((rule, node.name if node is not None else "", reason))
            return
        super().decline(rule, node, reason)

    def apply(self, model: ir.Model) -> int:
        self._quiet.clear()
        count = super().apply(model)
        for node in model.graph:
            if lib.standard(node, "Add", "Mul") and len(node.inputs) == 2:
                for y, c in (node.inputs, reversed(node.inputs)):
                    if y is not None and c is not None and lib.constant_array(c) is not None:
                        if y.producer() is not None and y.producer().op_type in ("Conv", "ConvTranspose"):
                            note_shared_outputs(self, f"Conv{node.op_type}", node, [y])
        left = {node for (rule, node, reason) in self._quiet if rule == "MatMulAddToGemm" and "2-D" in reason}
        if left:
            self.decline("MatMulAddToGemm", None,
                         f"{len(left)} MatMul + constant Add left as they are: inputs not known to be 2-D "
                         "(N-D projection biases are absorbed by the -O3 fusions)")
        return count
