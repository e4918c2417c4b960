"""BatchNormalization folding (-O2, every target).

    BN(P(x; W, b)) = P(x; W * s, (b - mean) * s + beta),   s = gamma / sqrt(var + epsilon)

for a producer P whose output channels are the BN's channels (axis 1):
- Conv           W[M, C/group, k...]: channel m is W[m]; groups need nothing special.
- ConvTranspose  W[C, M/group, k...]: channel g * M/group + j is W[g-th block of C/group, j].
- Gemm           B[K, N] (B[N, K] with transB=1); alpha stays; Gemm's beta scales C, so it is
                 folded into the new C and the attribute dropped.
- MatMul         x[M, K] @ B[K, N] only: BN normalizes axis 1, which is the MatMul's output
                 channel axis only for 2-D outputs. Becomes Gemm(x, B * s, (0 - mean) * s + beta).
A BN with nothing to fold into becomes Add(Mul(x, s), beta - mean * s) with constant s and shift
shaped [C, 1, ...] to broadcast on axis 1.

Preconditions (each refusal is reported with its reason):
- gamma, beta, mean, var are constants (not graph inputs, which a caller may override), 1-D of
  the channel count;
- inference mode: training_mode = 0, spatial = 1 (opset <= 8) and Y the node's only output
  (before opset 14, declaring the running-statistics outputs selects training mode);
- the producer's weights (and bias) are constants used by that producer only, since they are
  rewritten; its output is used by the BN only; its output channels equal the BN's channels;
  floating-point weights;
- for the Mul + Add fallback, the input's rank is known (to shape s and the shift).
The math lives in onnxopt.kernels.folding (float64, cast back to the weight's dtype).

onnxscript ships FuseBatchNormIntoConv/ConvTranspose/Gemm (rewriter.rules.common); their weight
math is right (groups, ConvTranspose axis, transB, Gemm beta) but they do not check training_mode,
the parameters' shapes or the producer's float type, compute in the weights' own precision, reuse
the old initializer names and cover no MatMul, so this module has its own rules.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.kernels import folding
from onnxopt.passes._lib import graph as lib
from onnxopt.passes._lib.folding import check_weights, note_shared_outputs, producer_layout, rank_of
from onnxopt.passes._lib.graph import float_attr, int_attr, new_initializer, optional_input
from onnxopt.passes.base import Decline, RewritePass, need
from onnxopt.passes.registry import register

# ---- BatchNormalization ----------------------------------------------------------------------


def batchnorm_params(bn: ir.Node):
    """(gamma, beta, mean, var, epsilon) of an inference-mode BN with constant parameters; raises
    Decline saying why not."""
    need(int_attr(bn, "training_mode", 0) == 0, "BatchNormalization is in training mode (training_mode=1)")
    need(int_attr(bn, "spatial", 1) == 1, "BatchNormalization has spatial=0 (per-activation statistics)")
    need(int_attr(bn, "is_test", 1) == 1, "BatchNormalization has is_test=0 (training mode)")
    need(len(bn.outputs) <= 1, "BatchNormalization declares running-statistics outputs (training mode)")
    need(len(bn.inputs) == 5, f"BatchNormalization has {len(bn.inputs)} inputs, expected 5")
    arrays = [lib.constant(value, f"BatchNormalization {what}")
              for value, what in zip(bn.inputs[1:], ("scale (gamma)", "bias (beta)", "mean", "var"))]
    need(all(a.ndim == 1 for a in arrays) and len({a.size for a in arrays}) == 1,
         f"BatchNormalization parameters have shapes {[a.shape for a in arrays]}, "
         "expected four vectors of one length")
    epsilon = float_attr(bn, "epsilon", folding.BN_DEFAULT_EPSILON)
    return (*arrays, epsilon)


class _BatchNormIntoProducer(pattern.RewriteRuleClassBase):
    """BN(P(x; W, b)) -> P(x; W * s, (b - mean) * s + beta)."""

    producer_op = ""

    def pattern(self, op, x, w, gamma, beta, mean, var):
        y = getattr(op, self.producer_op)(x, w, _allow_other_inputs=True, _outputs=["producer_out"])
        return op.BatchNormalization(y, gamma, beta, mean, var, _outputs=["bn_out"])

    @lib.declines_as_fail
    def check(self, context, x, w, producer_out, bn_out, **_):
        params = batchnorm_params(bn_out.producer())
        producer = producer_out.producer()
        need(lib.standard(producer), f"{producer.op_type} is in domain {producer.domain!r}")
        self._check_more(producer, x)
        weights = lib.rewritable_constant(w, f"{producer.op_type} weights")
        reason = check_weights(producer, weights, channels=params[0].size)
        need(reason is None, reason)
        bias = self._bias(producer)
        if bias is not None:
            b = lib.rewritable_constant(bias, f"{producer.op_type} bias")
            need(self._bias_fits(b, params[0].size), f"{producer.op_type} bias has shape {b.shape}, not per output channel")
        return lib.ok()

    def _bias(self, producer: ir.Node) -> ir.Value | None:
        return optional_input(producer, 2)

    def _bias_fits(self, b: np.ndarray, channels: int) -> bool:
        return b.size in (1, channels) and b.ndim <= 1

    def _check_more(self, producer: ir.Node, x: ir.Value) -> None:
        """Raise Decline for a producer-specific precondition that does not hold."""

    def rewrite(self, op, x, w, producer_out, bn_out, **_):
        producer, bn = producer_out.producer(), bn_out.producer()
        gamma, beta, mean, var, epsilon = batchnorm_params(bn)
        layout, group = producer_layout(producer)
        bias = self._bias(producer)
        b = None if bias is None else lib.constant_array(bias)
        attributes = dict(producer.attributes)
        bias_scale = 1.0
        if producer.op_type == "Gemm":
            bias_scale = attributes.pop("beta").as_float() if "beta" in attributes else 1.0
        new_w, new_b = folding.fold_batchnorm(lib.constant_array(w), b, gamma, beta, mean, var, epsilon,
                                              layout=layout, group=group, bias_scale=bias_scale)
        graph = bn.graph
        w_value = new_initializer(graph, new_w, f"{w.name}.bnfold", op)
        b_base = f"{bias.name}.bnfold" if bias is not None else f"{w.name}.bnfold_bias"
        b_value = new_initializer(graph, new_b, b_base, op)
        op_type = "Gemm" if producer.op_type == "MatMul" else producer.op_type
        return op.op(op_type, x, w_value, b_value, **attributes)


class ConvBatchNorm(_BatchNormIntoProducer):
    producer_op = "Conv"


class ConvTransposeBatchNorm(_BatchNormIntoProducer):
    producer_op = "ConvTranspose"


class GemmBatchNorm(_BatchNormIntoProducer):
    producer_op = "Gemm"

    def _bias_fits(self, b: np.ndarray, channels: int) -> bool:
        # Gemm's C broadcasts to [M, N]; the folded C is C * s + shift, broadcast the same way.
        try:
            shape = np.broadcast_shapes(b.shape, (channels,))
        except ValueError:
            return False
        return len(shape) <= 2 and shape[-1] == channels


class MatMulBatchNorm(_BatchNormIntoProducer):
    producer_op = "MatMul"

    def _bias(self, producer: ir.Node) -> ir.Value | None:
        return None

    def _check_more(self, producer: ir.Node, x: ir.Value) -> None:
        rank = rank_of(x)
        need(rank is not None, "the MatMul input's rank is unknown; BN folds into MatMul only for 2-D [N, C] outputs")
        need(rank == 2, f"the MatMul output has rank {rank}: BatchNormalization normalizes its axis 1, "
                        "not the MatMul's output axis (folds only for 2-D [N, C] outputs)")


def _bn_rank(x: ir.Value, y: ir.Value) -> int | None:
    # BN keeps its input's shape, so a known output shape (a graph output, say) gives the rank too.
    rank = rank_of(x)
    return rank if rank is not None else rank_of(y)


class BatchNormToMulAdd(pattern.RewriteRuleClassBase):
    """BN(x) -> Add(Mul(x, s), beta - mean * s), s and shift shaped [C, 1, ...] (axis 1)."""

    def pattern(self, op, x, gamma, beta, mean, var):
        return op.BatchNormalization(x, gamma, beta, mean, var, _outputs=["bn_out"])

    @lib.declines_as_fail
    def check(self, context, x, bn_out, **_):
        params = batchnorm_params(bn_out.producer())
        rank = _bn_rank(x, bn_out)
        need(rank is not None, "the BatchNormalization input's rank is unknown (needed to shape the scale)")
        need(rank >= 2, f"the BatchNormalization input has rank {rank}, expected >= 2")
        need(x.shape is None or not isinstance(x.shape[1], int) or x.shape[1] == params[0].size,
             f"the input has {x.shape[1] if x.shape is not None else '?'} channels, the parameters {params[0].size}")
        return lib.ok()

    def rewrite(self, op, x, gamma, beta, bn_out, **_):
        bn = bn_out.producer()
        g, b, mean, var, epsilon = batchnorm_params(bn)
        scale, shift = folding.batchnorm_scale_shift(g, b, mean, var, epsilon)
        scale, shift = folding.channel_affine(scale, shift, _bn_rank(x, bn_out))
        dtype = (x.dtype or gamma.dtype).numpy()
        s = new_initializer(bn.graph, scale.astype(dtype), f"{gamma.name}.bn_scale", op)
        t = new_initializer(bn.graph, shift.astype(dtype), f"{beta.name}.bn_shift", op)
        return op.Add(op.Mul(x, s), t)


@register("fold_batchnorm", level=2, stage="fusion", order=10)
class FoldBatchNormPass(RewritePass):
    """BN(P(x; W, b)) = P(x; W * s, (b - mean) * s + beta), s = gamma / sqrt(var + eps); else Mul + Add."""

    def __init__(self) -> None:
        super().__init__([ConvBatchNorm.rule(), ConvTransposeBatchNorm.rule(), GemmBatchNorm.rule(),
                          MatMulBatchNorm.rule()])
        self.fallback = RewritePass([BatchNormToMulAdd.rule()])

    def apply(self, model: ir.Model) -> int:
        # Fold first (to a fixed point, then record refusals); only what is left becomes Mul + Add.
        count = super().apply(model)
        for node in model.graph:
            if lib.standard(node, "BatchNormalization"):
                try:
                    batchnorm_params(node)
                except Decline as exc:
                    self.decline("BatchNormalization", node, str(exc))
                else:
                    note_shared_outputs(self, "BatchNormalization", node, node.inputs[:1])
        count += self.fallback.apply(model)
        for d in self.fallback.declined:
            self.add_declined(d)
        return count
