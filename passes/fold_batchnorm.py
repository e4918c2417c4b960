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
from onnxopt.passes import checks
from onnxopt.passes.base import RewritePass
from onnxopt.passes.registry import register

# Ops a per-channel affine map after them can fold into (weights layout: see producer_layout).
FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ---- helpers shared with fold_bias -----------------------------------------------------------


def fresh_name(graph: ir.Graph | None, base: str) -> str:
    """`base`, or `base.N`, whichever no initializer of `graph` has yet."""
    taken = graph.initializers if graph is not None else {}
    name, n = base, 1
    while name in taken:
        name, n = f"{base}.{n}", n + 1
    return name


def new_initializer(op, array: np.ndarray, graph: ir.Graph | None, base: str) -> ir.Value:
    name = fresh_name(graph, base)
    return op.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)


def constant(value: ir.Value | None, what: str) -> tuple[np.ndarray | None, str | None]:
    """(array, None) for a constant; (None, reason) otherwise."""
    if value is None:
        return None, f"{what} is missing"
    if value.is_graph_input():
        if value.const_value is not None:
            return None, f"{what} '{value.name}' is a graph input with an initializer (a default the caller may override)"
        return None, f"{what} '{value.name}' is a graph input"
    array = checks.constant_array(value)
    if array is None:
        return None, f"{what} '{value.name}' is not a constant"
    return array, None


def rewritable_constant(value: ir.Value | None, what: str) -> tuple[np.ndarray | None, str | None]:
    """A constant this rewrite may replace: also used by one node only, and not a graph output."""
    array, reason = constant(value, what)
    if reason:
        return None, reason
    if not checks.single_use(value):
        users = len(value.uses()) + int(value.is_graph_output())
        return None, f"{what} '{value.name}' is shared ({users} uses); folding would change the other users"
    return array, None


def optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def rank_of(value: ir.Value) -> int | None:
    """The value's rank if known; for a Conv/ConvTranspose output, the rank of its weights."""
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is not None and producer.op_type in ("Conv", "ConvTranspose") and producer.domain in ("", "ai.onnx"):
        w = optional_input(producer, 1)
        if w is not None and w.shape is not None:
            return len(w.shape)
    return None


def producer_layout(node: ir.Node) -> tuple[str, int]:
    """(layout in onnxopt.kernels.folding, group) of a Conv/ConvTranspose/Gemm/MatMul node."""
    if node.op_type == "Conv":
        return "conv", 1
    if node.op_type == "ConvTranspose":
        return "conv_transpose", int_attr(node, "group", 1)
    if node.op_type == "Gemm":
        return ("matmul_t" if int_attr(node, "transB", 0) else "matmul"), 1
    return "matmul", 1


def check_weights(node: ir.Node, w: np.ndarray, channels: int | None = None) -> str | None:
    """Why W (of `node`, see producer_layout) cannot take a per-output-channel fold, else None."""
    op_type = node.op_type
    if not np.issubdtype(w.dtype, np.floating):
        return f"{op_type} weights are {w.dtype}, not floating point"
    layout, group = producer_layout(node)
    if op_type in ("Conv", "ConvTranspose") and w.ndim < 3:
        return f"{op_type} weights have rank {w.ndim}, expected >= 3"
    if op_type in ("Gemm", "MatMul") and w.ndim != 2:
        return f"{op_type} weights have rank {w.ndim}, expected 2"
    if op_type == "ConvTranspose" and (group < 1 or w.shape[0] % group):
        return f"ConvTranspose weights' {w.shape[0]} input channels do not split into group={group}"
    if channels is not None and folding.output_channels(w, layout, group) != channels:
        return (f"{op_type} computes {folding.output_channels(w, layout, group)} output channels, "
                f"the following op has {channels}")
    return None


def note_shared_outputs(sink, rule: str, consumer: ir.Node, candidates) -> None:
    """Report a consumer the matcher skipped because its producer's output has other users.

    onnxscript's matcher refuses such matches before any check runs (the producer could not be
    removed), so without this the report would not say why they did not fold."""
    for value in candidates:
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type not in FOLDABLE or producer.domain not in ("", "ai.onnx"):
            continue
        if not checks.single_use(value):
            users = len(value.uses()) + int(value.is_graph_output())
            sink.decline(rule, consumer,
                         f"the {producer.op_type} output '{value.name}' has {users} users; "
                         f"it can only absorb {consumer.op_type} when that is the only one")
            return


# ---- BatchNormalization ----------------------------------------------------------------------


def batchnorm_params(bn: ir.Node):
    """(gamma, beta, mean, var, epsilon) of an inference-mode BN with constant parameters, or a
    failed MatchResult saying why not."""
    if int_attr(bn, "training_mode", 0) != 0:
        return checks.fail("BatchNormalization is in training mode (training_mode=1)")
    if int_attr(bn, "spatial", 1) != 1:
        return checks.fail("BatchNormalization has spatial=0 (per-activation statistics)")
    if int_attr(bn, "is_test", 1) != 1:
        return checks.fail("BatchNormalization has is_test=0 (training mode)")
    if len(bn.outputs) > 1:
        return checks.fail("BatchNormalization declares running-statistics outputs (training mode)")
    if len(bn.inputs) != 5:
        return checks.fail(f"BatchNormalization has {len(bn.inputs)} inputs, expected 5")
    arrays = []
    for value, what in zip(bn.inputs[1:], ("scale (gamma)", "bias (beta)", "mean", "var")):
        array, reason = constant(value, f"BatchNormalization {what}")
        if reason:
            return checks.fail(reason)
        arrays.append(array)
    sizes = {a.size for a in arrays}
    if any(a.ndim != 1 for a in arrays) or len(sizes) != 1:
        return checks.fail(f"BatchNormalization parameters have shapes {[a.shape for a in arrays]}, "
                           "expected four vectors of one length")
    epsilon = float_attr(bn, "epsilon", folding.BN_DEFAULT_EPSILON)
    return (*arrays, epsilon)


class _BatchNormIntoProducer(pattern.RewriteRuleClassBase):
    """BN(P(x; W, b)) -> P(x; W * s, (b - mean) * s + beta)."""

    producer_op = ""

    def pattern(self, op, x, w, gamma, beta, mean, var):
        y = getattr(op, self.producer_op)(x, w, _allow_other_inputs=True, _outputs=["producer_out"])
        return op.BatchNormalization(y, gamma, beta, mean, var, _outputs=["bn_out"])

    def check(self, context, x, w, producer_out, bn_out, **_):
        params = batchnorm_params(bn_out.producer())
        if isinstance(params, pattern.MatchResult):
            return params
        producer = producer_out.producer()
        if producer.domain not in ("", "ai.onnx"):
            return checks.fail(f"{producer.op_type} is in domain {producer.domain!r}")
        more = self._check_more(producer, x)
        if not more:
            return more
        weights, reason = rewritable_constant(w, f"{producer.op_type} weights")
        if reason:
            return checks.fail(reason)
        reason = check_weights(producer, weights, channels=params[0].size)
        if reason:
            return checks.fail(reason)
        bias = self._bias(producer)
        if bias is not None:
            b, reason = rewritable_constant(bias, f"{producer.op_type} bias")
            if reason:
                return checks.fail(reason)
            if not self._bias_fits(b, params[0].size):
                return checks.fail(f"{producer.op_type} bias has shape {b.shape}, not per output channel")
        return checks.ok()

    def _bias(self, producer: ir.Node) -> ir.Value | None:
        return optional_input(producer, 2)

    def _bias_fits(self, b: np.ndarray, channels: int) -> bool:
        return b.size in (1, channels) and b.ndim <= 1

    def _check_more(self, producer: ir.Node, x: ir.Value):
        return checks.ok()

    def rewrite(self, op, x, w, producer_out, bn_out, **_):
        producer, bn = producer_out.producer(), bn_out.producer()
        gamma, beta, mean, var, epsilon = batchnorm_params(bn)
        layout, group = producer_layout(producer)
        bias = self._bias(producer)
        b = None if bias is None else checks.constant_array(bias)
        attributes = dict(producer.attributes)
        bias_scale = 1.0
        if producer.op_type == "Gemm":
            bias_scale = attributes.pop("beta").as_float() if "beta" in attributes else 1.0
        new_w, new_b = folding.fold_batchnorm(checks.constant_array(w), b, gamma, beta, mean, var, epsilon,
                                              layout=layout, group=group, bias_scale=bias_scale)
        graph = bn.graph
        w_value = new_initializer(op, new_w, graph, f"{w.name}.bnfold")
        b_base = f"{bias.name}.bnfold" if bias is not None else f"{w.name}.bnfold_bias"
        b_value = new_initializer(op, new_b, graph, b_base)
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

    def _check_more(self, producer: ir.Node, x: ir.Value):
        rank = rank_of(x)
        if rank is None:
            return checks.fail("the MatMul input's rank is unknown; BN folds into MatMul only for 2-D [N, C] outputs")
        if rank != 2:
            return checks.fail(f"the MatMul output has rank {rank}: BatchNormalization normalizes its axis 1, "
                               "not the MatMul's output axis (folds only for 2-D [N, C] outputs)")
        return checks.ok()


def _bn_rank(x: ir.Value, y: ir.Value) -> int | None:
    # BN keeps its input's shape, so a known output shape (a graph output, say) gives the rank too.
    rank = rank_of(x)
    return rank if rank is not None else rank_of(y)


class BatchNormToMulAdd(pattern.RewriteRuleClassBase):
    """BN(x) -> Add(Mul(x, s), beta - mean * s), s and shift shaped [C, 1, ...] (axis 1)."""

    def pattern(self, op, x, gamma, beta, mean, var):
        return op.BatchNormalization(x, gamma, beta, mean, var, _outputs=["bn_out"])

    def check(self, context, x, bn_out, **_):
        params = batchnorm_params(bn_out.producer())
        if isinstance(params, pattern.MatchResult):
            return params
        rank = _bn_rank(x, bn_out)
        if rank is None:
            return checks.fail("the BatchNormalization input's rank is unknown (needed to shape the scale)")
        if rank < 2:
            return checks.fail(f"the BatchNormalization input has rank {rank}, expected >= 2")
        if x.shape is not None and isinstance(x.shape[1], int) and x.shape[1] != params[0].size:
            return checks.fail(f"the input has {x.shape[1]} channels, the parameters {params[0].size}")
        return checks.ok()

    def rewrite(self, op, x, gamma, beta, bn_out, **_):
        bn = bn_out.producer()
        g, b, mean, var, epsilon = batchnorm_params(bn)
        scale, shift = folding.batchnorm_scale_shift(g, b, mean, var, epsilon)
        scale, shift = folding.channel_affine(scale, shift, _bn_rank(x, bn_out))
        dtype = (x.dtype or gamma.dtype).numpy()
        s = new_initializer(op, scale.astype(dtype), bn.graph, f"{gamma.name}.bn_scale")
        t = new_initializer(op, shift.astype(dtype), bn.graph, f"{beta.name}.bn_shift")
        return op.Add(op.Mul(x, s), t)


class _DedupDeclines:
    """Mixin: one report line per (node, reason), however many rules or rounds found it."""

    def decline(self, rule, node, reason) -> None:
        name = (node.name or "") if node is not None else ""
        if any(d.node == name and d.reason == reason for d in self.declined):
            return
        super().decline(rule, node, reason)


@register("fold_batchnorm", level=2, stage="fusion", order=10)
class FoldBatchNormPass(_DedupDeclines, RewritePass):
    """BN(P(x; W, b)) = P(x; W * s, (b - mean) * s + beta), s = gamma / sqrt(var + eps); else Mul + Add."""

    def __init__(self) -> None:
        super().__init__([ConvBatchNorm.rule(), ConvTransposeBatchNorm.rule(), GemmBatchNorm.rule(),
                          MatMulBatchNorm.rule()])
        self.fallback = RewritePass([BatchNormToMulAdd.rule()])

    def apply(self, model: ir.Model) -> int:
        # Fold first (to a fixed point, then record refusals); only what is left becomes Mul + Add.
        count = super().apply(model)
        for node in model.graph:
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                params = batchnorm_params(node)
                if isinstance(params, pattern.MatchResult):
                    self.decline("BatchNormalization", node, params.reason)
                else:
                    note_shared_outputs(self, "BatchNormalization", node, node.inputs[:1])
        count += self.fallback.apply(model)
        for d in self.fallback.declined:
            if not any((e.node, e.reason) == (d.node, d.reason) for e in self.declined):
                self.declined.append(d)
        return count
