"""LayerNorm and RMSNorm recognition: decomposed normalizations become one normalization op.

With x normalized over its last axis (D elements), mean = ReduceMean(x), and gamma, beta
constant [D] vectors:

    LayerNorm  (x - mean) / sqrt(var + eps) * gamma (+ beta)  = LayerNormalization(x, gamma, beta)
    RMSNorm    x / sqrt(mean(x^2) + eps) * gamma               = RMSNormalization(x, gamma)

Recognized spellings (every commutative Add/Mul in either operand order):
- variance: ReduceMean((x - mean)^2) as exported by torch (BERT, ViT, GPT-2), or
  ReduceMean(x^2) - mean^2 (the E[x^2] - E[x]^2 "moments" form); a square is Pow(v, 2) or v * v;
- inverse square root: Div(n, Sqrt(v + eps)), or n * r with r = Reciprocal(Sqrt(v + eps)),
  Div(1, Sqrt(v + eps)) or Pow(v + eps, -0.5) (how TF's Rsqrt is exported);
- scale and shift: y = n * gamma (+ beta), or TF/Keras' batch-norm arrangement
  y = x * g + (beta - mean * g) (or + (-mean) * g + beta) with g = r * gamma (either variance).

Preconditions, each refusal reported with its reason:
- both ReduceMeans reduce the last axis only (axes [-1], or [rank-1] when the rank is known;
  the axes attribute below opset 18, the axes input from 18) with keepdims=1;
- squares are exponent exactly 2, the 1 of Div(1, s) is 1, the Pow exponent is exactly -0.5;
- eps is a constant scalar (not a graph input), 0 < eps <= 1e-2;
- gamma and beta are constants (not graph inputs) of shape [D] with D > 1, so they broadcast over
  the last axis only (a [1] or scalar would be a broadcast scale, not a per-feature one); in the
  torch arrangement a following Add of anything else is not taken as beta and stays after the op;
- every intermediate value is used inside the pattern only (the matched nodes are removed);
- the element type (read from gamma) is float, float16 or bfloat16 (stash_type=1 computes in
  float; double would lose precision).

What is emitted, by pass:
- `layernorm` (-O2, every target): LayerNormalization (axis=-1, epsilon, stash_type=1) where the
  model's opset has it (>= 17), RMSNormalization where it has it (>= 23); otherwise the candidate
  is declined with the opset as reason (`--opset 17` upgrades the model first).
- `layernorm_ort` (-O3, onnxruntime CUDA): below those opsets, the onnxruntime fused kernel. onnxruntime
  registers LayerNormalization and SimplifiedLayerNormalization as ai.onnx-domain contrib kernels
  from version 1, but the ONNX checker (which emit runs) rejects both below opset 17 / at every
  opset. What both accept is com.microsoft SkipLayerNormalization with the input as its own skip:

      SkipLayerNormalization(x, x, gamma, beta, epsilon=4*eps) = LayerNorm(x + x; 4*eps) = LayerNorm(x; eps)

  since LayerNorm(2x; 4e) = 2(x - mean) / (2 sqrt(var + e)); likewise
  SkipSimplifiedLayerNormalization(x, x, gamma, epsilon=4*eps) = RMSNorm(x; eps). Scaling by 2 and
  4 is exact in binary floating point (up to overflow of 2x, i.e. |x| > 1.7e38 in float32).
  These kernels take rank-2 or rank-3 inputs of the types kernels/catalogue.py lists for the target,
  which is checked (rank by symbolic shapes).
  `skip_layernorm` later turns such a self-skip into a real residual SkipLayerNormalization.
  Not on onnxruntime's CPU EP: its Skip*LayerNormalization kernels are slower than Add +
  LayerNormalization (measured, see kernels/catalogue.py), and its session turns the decomposed
  form into LayerNormalization by itself, so there the norm is left as it is below opset 17.

Only the main graph is searched (not If/Loop bodies).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._lib import graph as lib
from onnxopt.passes._lib.graph import (
    MS, model_opset, only_use, other_input, outside_uses, produced_by, scalar,
    standard,
)
from onnxopt.passes._lib.symbolic_shapes import SymbolicShapes
from onnxopt.passes.base import Decline, OptPass, need
from onnxopt.kernels import catalogue
from onnxopt.passes.registry import register

LAYER_NORM_OPSET = 17
RMS_NORM_OPSET = 23
MAX_EPSILON = 1e-2
# Element types LayerNormalization/RMSNormalization take with stash_type=1 (float statistics).
NORM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def reduces_last_axis(node: ir.Node, rank: int | None) -> str | None:
    """None when `node` (a ReduceMean) reduces the last axis only with keepdims=1, else why not."""
    keepdims = node.attributes.get("keepdims")
    if keepdims is not None and keepdims.value != 1:
        return f"{node.op_type} has keepdims={keepdims.value}, not 1"
    attr = node.attributes.get("axes")
    if attr is not None:
        axes = list(attr.value)
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = lib.constant_array(node.inputs[1])
        if array is None:
            return f"{node.op_type} axes are not constant"
        axes = [int(a) for a in array.reshape(-1)]
    else:
        return f"{node.op_type} reduces every axis, not the last one"
    if axes == [-1] or (rank is not None and axes == [rank - 1]):
        return None
    return f"{node.op_type} reduces axes {axes}, not the last axis only" + (
        "" if rank is not None or axes == [-1] else " (rank unknown)"
    )


def feature_vector(value: ir.Value | None, what: str) -> np.ndarray:
    """A constant [D] (D > 1) vector broadcasting over the last axis only; raises Decline."""
    need(value is not None, f"{what} is missing")
    need(not value.is_graph_input(), f"{what} {value.name!r} is a graph input (a caller may override it)")
    array = lib.constant_array(value)
    need(array is not None, f"{what} is computed, not a constant")
    need(array.ndim == 1 and array.shape[0] >= 2, f"{what} has shape {list(array.shape)}, not [D] over the last axis")
    return array


def is_feature_vector(value: ir.Value | None) -> bool:
    try:
        feature_vector(value, "")
    except Decline:
        return False
    return True


# -- the match -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Norm:
    kind: str  # "layer" or "rms"
    x: ir.Value
    gamma: ir.Value
    beta: ir.Value | None
    epsilon: float
    nodes: list[ir.Node]
    output: ir.Value

    @property
    def last(self) -> ir.Node:
        return self.output.producer()


def _square_of(value: ir.Value, nodes: list[ir.Node]) -> ir.Value | None:
    """v for value = Pow(v, 2) or v * v (the node appended to `nodes`); raises on Pow(v, p != 2)."""
    node = produced_by(value, "Pow", "Mul")
    if node is None:
        return None
    if node.op_type == "Mul":
        if node.inputs[0] is not node.inputs[1]:
            return None
    else:
        exponent = scalar(node.inputs[1])
        need(exponent is not None, "the square's exponent is not a constant scalar")
        need(exponent == 2.0, f"exponent {exponent:g} is not 2")
    nodes.append(node)
    return node.inputs[0]


def _mean_of(value: ir.Value | None) -> ir.Node | None:
    return produced_by(value, "ReduceMean")


def is_variance_plus_epsilon(node: ir.Node) -> bool:
    """The anchor: an Add one of whose operands comes from ReduceMean or Sub(ReduceMean, .)."""
    if not standard(node, "Add") or len(node.inputs) != 2:
        return False
    for v in node.inputs:
        p = v.producer() if v is not None else None
        if standard(p, "ReduceMean") or (standard(p, "Sub") and _mean_of(p.inputs[0]) is not None):
            return True
    return False


def match_norm(anchor: ir.Node, rank_of) -> Norm:
    """Match the normalization around `anchor` (Add(variance, eps)); raise Decline(reason)."""
    nodes = [anchor]
    variance = next(
        v for v in anchor.inputs
        if standard(v.producer(), "ReduceMean")
        or (standard(v.producer(), "Sub") and _mean_of(v.producer().inputs[0]) is not None)
    )
    eps_value = other_input(anchor, variance)
    epsilon = scalar(eps_value)
    need(epsilon is not None, "epsilon is not a constant scalar (a graph input or a computed value)")
    need(0.0 < epsilon <= MAX_EPSILON, f"epsilon {epsilon:g} is not a small positive number")

    # The variance (or mean square) and what is normalized.
    var_node = variance.producer()
    nodes.append(var_node)
    mean = None  # the ReduceMean(x) node of a LayerNorm
    var_mean = var_node  # the ReduceMean of squares
    if var_node.op_type == "ReduceMean":
        base = _square_of(var_node.inputs[0], nodes)
        need(base is not None, "the reduced value is not a square (Pow(v, 2) or v * v)")
        sub = produced_by(base, "Sub")
        if sub is not None and _mean_of(sub.inputs[1]) is not None and _mean_of(sub.inputs[1]).inputs[0] is sub.inputs[0]:
            kind, x, mean, centred = "layer", sub.inputs[0], _mean_of(sub.inputs[1]), base
            nodes += [sub, mean]
        else:
            kind, x, centred = "rms", base, None
    else:  # Sub(ReduceMean(x^2), mean^2): the moments form
        var_mean = _mean_of(var_node.inputs[0])
        nodes.append(var_mean)
        x = _square_of(var_mean.inputs[0], nodes)
        need(x is not None, "E[x^2] - E[x]^2: the first mean is not of a square")
        m = _square_of(var_node.inputs[1], nodes)
        mean = _mean_of(m)
        need(mean is not None and mean.inputs[0] is x, "E[x^2] - E[x]^2: the subtracted value is not E[x]^2")
        nodes.append(mean)
        kind, centred = "layer", None
    rank = rank_of(x)
    for reduction in [var_mean] + ([mean] if mean else []):
        reason = reduces_last_axis(reduction, rank)
        need(reason is None, reason or "")

    # 1 / sqrt(variance + eps): either a Div by the Sqrt, or an inverse r that is multiplied.
    use = only_use(anchor.outputs[0])
    need(use is not None, "variance + epsilon is used more than once")
    normalized = inverse = numerator = None
    if standard(use, "Sqrt"):
        nodes.append(use)
        div = only_use(use.outputs[0])
        need(div is not None, "the square root is used more than once")
        nodes.append(div)
        if standard(div, "Div") and div.inputs[1] is use.outputs[0]:
            one = scalar(div.inputs[0])
            if one is not None:
                need(one == 1.0, f"Div({one:g}, sqrt) is not 1 / sqrt")
                inverse = div.outputs[0]
            else:
                normalized, numerator = div.outputs[0], div.inputs[0]
        elif standard(div, "Reciprocal"):
            inverse = div.outputs[0]
        else:
            raise Decline(f"the square root feeds {div.op_type}, not a division or Reciprocal")
    elif standard(use, "Pow"):
        exponent = scalar(use.inputs[1])
        need(exponent == -0.5, f"Pow(variance + eps, {exponent}) is not an inverse square root")
        nodes.append(use)
        inverse = use.outputs[0]
    else:
        raise Decline(f"variance + epsilon feeds {use.op_type}, not Sqrt")

    gamma = beta = None
    if inverse is not None:
        mul = only_use(inverse)
        need(standard(mul, "Mul"), "the inverse square root is not multiplied once")
        nodes.append(mul)
        operand = other_input(mul, inverse)
        if lib.constant_array(operand) is not None and kind == "layer":
            # TF / Keras: g = r * gamma; y = x * g + (beta - mean * g).
            gamma = operand
            output, beta = _match_tf_shift(mul.outputs[0], x, mean, nodes)
        else:
            normalized, numerator = mul.outputs[0], operand
    if gamma is None:
        # Torch-style: n = numerator * r (or numerator / s); y = n * gamma (+ beta).
        if kind == "layer" and centred is not None:
            need(numerator is centred, "the normalized value is not x - mean")
        elif kind == "layer":
            sub = produced_by(numerator, "Sub")
            need(sub is not None and sub.inputs[0] is x and sub.inputs[1] is mean.outputs[0],
                  "the normalized value is not x - mean")
            nodes.append(sub)
        else:
            need(numerator is x, "the normalized value is not the reduced input")
        scale = only_use(normalized)
        need(standard(scale, "Mul"), "no constant scale (gamma) multiplies the normalized value")
        gamma = other_input(scale, normalized)
        nodes.append(scale)
        output = scale.outputs[0]
        if kind == "layer":
            # A following constant [D] Add is the shift; anything else stays after the fused op.
            shift = only_use(output)
            if standard(shift, "Add") and is_feature_vector(other_input(shift, output)):
                beta = other_input(shift, output)
                nodes.append(shift)
                output = shift.outputs[0]

    gamma_array = feature_vector(gamma, "gamma")
    if beta is not None:
        beta_array = feature_vector(beta, "beta")
        need(beta_array.shape == gamma_array.shape,
              f"beta has shape {list(beta_array.shape)}, gamma {list(gamma_array.shape)}")
    reason = outside_uses(nodes, output)
    need(reason is None, reason or "")
    return Norm(kind, x, gamma, beta, epsilon, nodes, output)


def _match_tf_shift(g: ir.Value, x: ir.Value, mean: ir.Node, nodes: list[ir.Node]):
    """y = x * g + (beta - mean * g), or x * g + ((-mean) * g + beta); returns (y, beta)."""
    uses = [u.node for u in g.uses()]
    need(len(uses) == 2 and all(standard(n, "Mul") for n in uses) and not g.is_graph_output(),
          "gamma / sqrt(var + eps) is not used by exactly two multiplications")
    m = mean.outputs[0]
    scaled_x = next((n for n in uses if other_input(n, g) is x), None)
    scaled_mean = next((n for n in uses if n is not scaled_x), None)
    need(scaled_x is not None and scaled_mean is not None, "x is not multiplied by gamma / sqrt(var + eps)")
    mean_operand = other_input(scaled_mean, g)
    neg = produced_by(mean_operand, "Neg")
    need(mean_operand is m or (neg is not None and neg.inputs[0] is m),
          "the mean is not multiplied by gamma / sqrt(var + eps)")
    nodes += [scaled_x, scaled_mean] + ([neg] if neg is not None else [])
    shift = only_use(scaled_mean.outputs[0])
    if neg is not None:
        need(standard(shift, "Add"), "(-mean) * g is not added to beta")
        beta = other_input(shift, scaled_mean.outputs[0])
    else:
        need(standard(shift, "Sub") and shift.inputs[1] is scaled_mean.outputs[0], "mean * g is not subtracted from beta")
        beta = shift.inputs[0]
    need(lib.constant_array(beta) is not None, "the shift (beta) is not a constant")
    final = only_use(shift.outputs[0])
    need(standard(final, "Add") and other_input(final, shift.outputs[0]) is scaled_x.outputs[0],
          "x * g and the shift are not added")
    need(only_use(scaled_x.outputs[0]) is final, "x * g is used elsewhere")
    nodes += [shift, final]
    return final.outputs[0], beta


# -- the passes ----------------------------------------------------------------------------------
class _NormPass(OptPass):
    ort = False

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        opset = model_opset(model)
        shapes = SymbolicShapes(graph)
        fired = 0
        for anchor in list(graph):
            if anchor.graph is not graph or not is_variance_plus_epsilon(anchor):
                continue
            try:
                norm = match_norm(anchor, shapes.rank)
                new = self._fused(norm, opset, shapes)
            except Decline as refused:
                self.decline(None, anchor, str(refused))
                continue
            lib.fuse(model, norm.nodes, norm.output, new, norm.last)
            fired += 1
        return fired

    def _fused(self, norm: Norm, opset: int, shapes: SymbolicShapes) -> ir.Node:
        dtype = norm.gamma.dtype or ir.convenience.get_const_tensor(norm.gamma).dtype
        need(dtype in NORM_TYPES, f"element type {dtype} is not float, float16 or bfloat16")
        base = norm.output.name or "norm"
        layer = norm.kind == "layer"
        needed = LAYER_NORM_OPSET if layer else RMS_NORM_OPSET
        name = "LayerNormalization" if layer else "RMSNormalization"
        if opset >= needed:
            inputs = [norm.x, norm.gamma] + ([norm.beta] if norm.beta is not None else [])
            attrs = [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", norm.epsilon), ir.AttrInt64("stash_type", 1)]
            return ir.Node("", name, inputs, attributes=attrs, name=f"{base}.{name}")
        need(self.ort, f"opset {opset} has no {name} (needs {needed}; --opset {needed} upgrades the model; "
              "-O3 --target cuda uses onnxruntime's fused kernel, and onnxruntime's CPU session fuses the "
              "decomposed form itself)")
        fused = "SkipLayerNormalization" if layer else "SkipSimplifiedLayerNormalization"
        lib.need_kernel(self.options.get("target", "cpu"), fused, dtype)
        rank = shapes.rank(norm.x)
        need(rank in (2, 3), f"{fused} takes rank-2 or rank-3 inputs; the input's rank is "
              + ("unknown" if rank is None else str(rank)))
        inputs = [norm.x, norm.x, norm.gamma] + ([norm.beta] if norm.beta is not None else [])
        # x + x = 2x normalizes like x when epsilon is scaled by 4 (see the module docstring).
        epsilon = float(np.float32(norm.epsilon) * np.float32(4.0))
        return ir.Node(MS, fused, inputs, attributes=[ir.AttrFloat32("epsilon", epsilon)], name=f"{base}.{fused}")


@register("layernorm", level=2, stage="fusion", order=30)
class LayerNormPass(_NormPass):
    """Decomposed LayerNorm / RMSNorm -> LayerNormalization (opset >= 17) / RMSNormalization (>= 23)."""


# The self-skip form runs on the SkipLayerNormalization kernel, so it goes where that kernel does.
@register("layernorm_ort", level=3, stage="fusion", order=31,
          targets=catalogue.kernel("SkipLayerNormalization").emit_targets)
class LayerNormOrtPass(_NormPass):
    """Decomposed LayerNorm / RMSNorm below those opsets -> onnxruntime's fused kernel (self-skip)."""

    ort = True
