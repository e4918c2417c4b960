"""GELU recognition: decomposed GELUs become one activation op, absorbing a preceding bias at -O3.

    erf     0.5 * x * (1 + erf(x / sqrt(2)))                               = Gelu(x)
    tanh    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))         = Gelu(x, approximate="tanh")
    sigmoid x * sigmoid(alpha * x)                                          = QuickGelu(x, alpha)

Recognized spellings (every commutative Add/Mul in either operand order): x / sqrt(2) as
Div(x, 1.4142135) or Mul(x, 0.70710677); 1 + erf / 1 + tanh; the 0.5 multiplied last
((x * (1 + e)) * 0.5, torch legacy), with the bracket (x * ((1 + e) * 0.5), torch dynamo) or first
((x * 0.5) * (1 + e)); x^3 as Pow(x, 3), (x * x) * x or x * (x * x).

Preconditions, each refusal reported with its reason:
- every constant is a scalar (one element, rank <= 1) within a relative 1e-5 of its exact value:
  0.5, 1, sqrt(2) (or 1/sqrt(2)), 0.044715, sqrt(2/pi), the exponent exactly 3;
- every intermediate value is used inside the pattern only, and x is the same value everywhere.
A Tanh or Sigmoid is a candidate (and its refusal reported) only when its neighbourhood looks like a
GELU (1 + tanh; Sigmoid(x * c) * x), so other uses of Tanh (e.g. BERT's pooler) are not listed.

Passes:
- `gelu` (-O2, every target): erf/tanh forms -> standard Gelu (approximate "none"/"tanh") where the
  model's opset has it (>= 20); below, declined with the opset as reason (the portable output may
  only use ops of the model's opset). The sigmoid form is left alone: ONNX has no op computing
  x * sigmoid(alpha * x) (Gelu(tanh) is a different function).
- `gelu_ort` (-O3, cpu/cuda): com.microsoft kernels at any opset: erf -> Gelu, tanh -> FastGelu,
  sigmoid -> QuickGelu(alpha) (exactly x * sigmoid(alpha * x), for any constant alpha). A bias
  folds in when x = MatMul(a, W) + b, b a constant [N] with N = W's last dimension and the sum
  used by the GELU only: erf -> BiasGelu(MatMul, b), tanh -> FastGelu(MatMul, b). This also applies
  to a standard Gelu that `gelu` produced (opset >= 20). These kernels take the element types
  kernels/catalogue.py lists for the target (float32 on cpu, float32/float16 on cuda; the element
  type is read from the pattern's constants).
Only the main graph is searched (not If/Loop bodies).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnxopt.passes._lib import graph as lib
from onnxopt.passes._lib.graph import (
    MS, close, ensure_opset, matmul_bias, model_opset, only_use, other_input, outside_uses, produced_by, replace,
    scalar, split_constant, standard,
)
from onnxopt.passes.base import Decline, OptPass, need
from onnxopt.passes.registry import ORT_TARGETS, register

GELU_OPSET = 20
SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715
GELU_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


@dataclasses.dataclass
class Gelu:
    kind: str  # "erf", "tanh" or "sigmoid"
    x: ir.Value
    nodes: list[ir.Node]
    output: ir.Value
    dtype: ir.DataType | None
    alpha: float | None = None


def _constant(value: ir.Value | None, want: float, what: str) -> float:
    """The scalar constant, which must be `want` to 1e-5, or to the precision of its own type when
    that is coarser (a float16 GELU's sqrt(2) is 1.4140625, the nearest float16)."""
    got = scalar(value)
    need(got is not None, f"{what} is not a constant scalar")
    dtype = lib.constant_array(value).dtype
    rel = max(1e-5, float(np.finfo(dtype).eps)) if dtype.kind == "f" else 1e-5
    need(close(got, want, rel), f"{what} is {got:.9g}, not {want:.9g}")
    return got


def _dtype(*values: ir.Value | None) -> ir.DataType | None:
    for v in values:
        if v is None:
            continue
        tensor = ir.convenience.get_const_tensor(v) if lib.constant_array(v) is not None else None
        if tensor is not None:
            return tensor.dtype
        if v.dtype is not None:
            return v.dtype
    return None


def _half_x_one_plus(t: ir.Value, x: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value]:
    """Match 0.5 * x * (1 + t) in its three arrangements; returns (output, the 0.5 constant)."""
    add = only_use(t)
    need(add is not None, "the activation's output is also used elsewhere")
    need(standard(add, "Add"), "the activation is not followed by 1 + (.)")
    _constant(other_input(add, t), 1.0, "the 1 in 1 + (.)")
    nodes.append(add)
    p = add.outputs[0]
    m1 = only_use(p)
    need(standard(m1, "Mul"), "1 + (.) is not multiplied once")
    nodes.append(m1)
    o = other_input(m1, p)
    if o is x:  # (x * (1 + t)) * 0.5
        m2 = only_use(m1.outputs[0])
        need(standard(m2, "Mul"), "x * (1 + (.)) is not multiplied by 0.5")
        half = other_input(m2, m1.outputs[0])
        nodes.append(m2)
        output = m2.outputs[0]
    elif scalar(o) is not None:  # x * ((1 + t) * 0.5)
        half = o
        m2 = only_use(m1.outputs[0])
        need(standard(m2, "Mul") and other_input(m2, m1.outputs[0]) is x, "(1 + (.)) * 0.5 is not multiplied by x")
        nodes.append(m2)
        output = m2.outputs[0]
    else:  # (x * 0.5) * (1 + t)
        h = produced_by(o, "Mul")
        need(h is not None and x in h.inputs, "1 + (.) is not multiplied by x or 0.5 * x")
        half = other_input(h, x)
        nodes.append(h)
        output = m1.outputs[0]
    _constant(half, 0.5, "the 0.5 factor")
    return output, half


def _erf_candidate(node: ir.Node) -> bool:
    return standard(node, "Erf")


def _match_erf(node: ir.Node) -> Gelu:
    nodes = [node]
    scaled = produced_by(node.inputs[0], "Div", "Mul")
    need(scaled is not None, "Erf's input is not x / sqrt(2)")
    nodes.append(scaled)
    if scaled.op_type == "Div":
        x, c = scaled.inputs[0], scaled.inputs[1]
        _constant(c, SQRT_2, "the divisor sqrt(2)")
    else:
        x, c = split_constant(scaled)
        need(x is not None, "Erf's input is not x * (1 / sqrt(2)) with a constant factor")
        _constant(c, 1.0 / SQRT_2, "the factor 1/sqrt(2)")
    output, half = _half_x_one_plus(node.outputs[0], x, nodes)
    return Gelu("erf", x, nodes, output, _dtype(c, half))


def _tanh_candidate(node: ir.Node) -> bool:
    if not standard(node, "Tanh"):
        return False
    add = only_use(node.outputs[0])
    return standard(add, "Add") and scalar(other_input(add, node.outputs[0])) is not None


def _cube_of(value: ir.Value | None, nodes: list[ir.Node]) -> ir.Value | None:
    """v for value = Pow(v, 3), (v * v) * v or v * (v * v), else None; raises on Pow(v, p != 3)."""
    node = produced_by(value, "Pow", "Mul")
    if node is None:
        return None
    if node.op_type == "Pow":
        exponent = scalar(node.inputs[1])
        need(exponent == 3.0, f"the cube's exponent is {exponent}, not 3")
        nodes.append(node)
        return node.inputs[0]
    for v, sq in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        square = produced_by(sq, "Mul")
        if square is not None and square.inputs[0] is v and square.inputs[1] is v:
            nodes += [node, square]
            return v
    return None


def _match_tanh(node: ir.Node) -> Gelu:
    nodes = [node]
    scaled = produced_by(node.inputs[0], "Mul")
    need(scaled is not None, "Tanh's input is not sqrt(2/pi) * (.)")
    inner, c2 = split_constant(scaled)
    need(inner is not None, "Tanh's input is not a constant times (x + 0.044715 x^3)")
    _constant(c2, SQRT_2_OVER_PI, "the factor sqrt(2/pi)")
    nodes.append(scaled)
    add = produced_by(inner, "Add")
    need(add is not None, "Tanh's argument is not x + 0.044715 * x^3")
    nodes.append(add)
    found = None
    for x, k in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        term = produced_by(k, "Mul")
        if term is None:
            continue
        cube, c1 = split_constant(term)
        extra: list[ir.Node] = []
        if cube is not None and _cube_of(cube, extra) is x:
            found = x, term, c1, extra
            break
    need(found is not None, "Tanh's argument is not x + c * x^3")
    x, term, c1, extra = found
    _constant(c1, TANH_CUBIC, "the cubic coefficient 0.044715")
    nodes += [term] + extra
    output, half = _half_x_one_plus(node.outputs[0], x, nodes)
    return Gelu("tanh", x, nodes, output, _dtype(c1, c2, half))


def _sigmoid_candidate(node: ir.Node) -> bool:
    if not standard(node, "Sigmoid"):
        return False
    scaled = produced_by(node.inputs[0], "Mul")
    if scaled is None:
        return False
    x, alpha = split_constant(scaled)
    use = only_use(node.outputs[0])
    return x is not None and standard(use, "Mul") and other_input(use, node.outputs[0]) is x


def _match_sigmoid(node: ir.Node) -> Gelu:
    scaled = produced_by(node.inputs[0], "Mul")
    x, alpha_value = split_constant(scaled)
    alpha = scalar(alpha_value)
    need(alpha is not None and math.isfinite(alpha), "alpha is not a finite constant scalar")
    use = only_use(node.outputs[0])
    return Gelu("sigmoid", x, [scaled, node, use], use.outputs[0], _dtype(alpha_value), alpha)


class _GeluPass(OptPass):
    ort = False

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        opset = model_opset(model)
        fired = 0
        matchers = [(_erf_candidate, _match_erf), (_tanh_candidate, _match_tanh)]
        if self.ort:
            matchers.append((_sigmoid_candidate, _match_sigmoid))
        for node in list(graph):
            if node.graph is not graph:
                continue
            if self.ort and self._fold_bias_into_fused(model, node):
                fired += 1
                continue
            for candidate, match in matchers:
                if not candidate(node):
                    continue
                try:
                    gelu = match(node)
                    reason = outside_uses(gelu.nodes, gelu.output)
                    need(reason is None, reason or "")
                    new, nodes = self._fused(gelu, opset)
                except Decline as refused:
                    self.decline(None, node, str(refused))
                    break
                lib.fuse(model, nodes, gelu.output, new, gelu.output.producer())
                fired += 1
                break
        return fired

    def _fused(self, gelu: Gelu, opset: int) -> tuple[ir.Node, list[ir.Node]]:
        base = gelu.output.name or "gelu"
        if not self.ort:
            need(opset >= GELU_OPSET, f"opset {opset} has no Gelu (needs {GELU_OPSET}; -O3 for an onnxruntime "
                  "target uses its fused kernel)")
            need(gelu.dtype in GELU_TYPES, f"element type {gelu.dtype} is not a float type")
            attrs = [ir.AttrString("approximate", "tanh")] if gelu.kind == "tanh" else []
            return ir.Node("", "Gelu", [gelu.x], attributes=attrs, name=f"{base}.Gelu"), gelu.nodes
        target = self.options.get("target", "cpu")
        if gelu.kind == "sigmoid":
            lib.need_kernel(target, "QuickGelu", gelu.dtype)
            attrs = [ir.AttrFloat32("alpha", gelu.alpha)]
            return ir.Node(MS, "QuickGelu", [gelu.x], attributes=attrs, name=f"{base}.QuickGelu"), gelu.nodes
        bias = matmul_bias(gelu.x)
        if bias is not None and outside_uses(gelu.nodes + [bias[0]], gelu.output) is None:
            add, matmul, b = bias
            op = "BiasGelu" if gelu.kind == "erf" else "FastGelu"
            lib.need_kernel(target, op, gelu.dtype)
            return ir.Node(MS, op, [matmul.outputs[0], b], name=f"{base}.{op}"), gelu.nodes + [add]
        op = "Gelu" if gelu.kind == "erf" else "FastGelu"
        lib.need_kernel(target, op, gelu.dtype)
        return ir.Node(MS, op, [gelu.x], name=f"{base}.{op}"), gelu.nodes

    def _fold_bias_into_fused(self, model: ir.Model, node: ir.Node) -> bool:
        """Gelu(MatMul + b) -> BiasGelu(MatMul, b) (or FastGelu with bias) for an existing standard
        Gelu (opset >= 20) or a bias-less com.microsoft Gelu / FastGelu."""
        if standard(node, "Gelu"):
            attr = node.attributes.get("approximate")
            tanh = attr is not None and attr.value == "tanh"
        elif node.domain == MS and node.op_type in ("Gelu", "FastGelu") and len(node.inputs) == 1:
            tanh = node.op_type == "FastGelu"
        else:
            return False
        bias = matmul_bias(node.inputs[0])
        if bias is None:
            return False
        add, matmul, b = bias
        mm = matmul.outputs[0]
        op = "FastGelu" if tanh else "BiasGelu"
        if only_use(add.outputs[0]) is not node:
            return False
        try:
            lib.need_kernel(self.options.get("target", "cpu"), op, _dtype(b))
        except Decline:
            return False
        out = node.outputs[0]
        new = ir.Node(MS, op, [mm, b], name=f"{out.name or 'gelu'}.{op}")
        ensure_opset(model, MS)
        replace(model.graph, [add, node], out, new, node)
        return True


@register("gelu", level=2, stage="fusion", order=40)
class GeluPass(_GeluPass):
    """Decomposed erf / tanh GELU -> standard Gelu where the opset has it (>= 20)."""


@register("gelu_ort", level=3, stage="fusion", targets=ORT_TARGETS, order=41)
class GeluOrtPass(_GeluPass):
    """Decomposed GELUs -> com.microsoft Gelu / FastGelu / QuickGelu, with MatMul bias -> BiasGelu."""

    ort = True
