"""Residual + LayerNorm (-O3, onnxruntime CUDA): the residual Add folds into the norm kernel.

    LayerNorm(a + b)              = SkipLayerNormalization(a, b, gamma, beta)
    LayerNorm(MatMul(h, W) + c + b) = SkipLayerNormalization(MatMul(h, W), b, gamma, beta, bias=c)
    RMSNorm(a + b)                = SkipSimplifiedLayerNormalization(a, b, gamma)   (likewise with c)

The LayerNorm is a standard LayerNormalization (axis -1, stash_type 1, only its first output
used), a standard RMSNormalization, or the self-skip SkipLayerNormalization(x, x) /
SkipSimplifiedLayerNormalization(x, x) that `layernorm_ort` emits below opset 17 / 23 (it
normalizes x with epsilon / 4; see passes/layernorm.py). When the sum a + b has other users as well
(pre-LN transformers such as GPT-2 and ViT carry it on the residual stream), they read it from the
kernel's fourth output, input_skip_bias_sum.

Preconditions, each refusal reported with its reason:
- a and b have the same shape, proven by symbolic shapes (passes/_lib/symbolic_shapes.py: equal dims
  are equal on every input the model accepts), of rank 2 or 3 (what the kernels take). A
  broadcasting skip (BERT's position embeddings, [1, S, D] + [B, S, D]) is refused: onnxruntime
  would silently compute the smaller shape if it became the kernel's input;
- gamma (and beta) are 1-D of length D, the last dimension of a;
- the element type is one the target runs the kernel in (kernels/catalogue.py);
- a bias c is folded only when it is a constant [D] added to a MatMul output whose weight has D
  columns, and that sum is used by the residual Add only; otherwise a and b go in as they are.
Shapes are computed once, on the graph before any rewrite, then all candidates are rewritten.
Only the main graph is searched (not If/Loop bodies).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._lib.symbolic_shapes import SymbolicShapes
from onnxopt.passes._lib import graph as lib
from onnxopt.passes.base import Decline, OptPass, need
from onnxopt.passes._lib.graph import MS, ensure_opset, matmul_bias, produced_by
from onnxopt.kernels import catalogue
from onnxopt.passes.registry import register


@dataclasses.dataclass
class _Candidate:
    norm: ir.Node  # the LayerNorm-like node
    add: ir.Node  # the residual Add feeding it
    gamma: ir.Value
    beta: ir.Value | None
    epsilon: float
    rms: bool
    bias_add: ir.Node | None  # MatMul(h, W) + c, folded into the kernel's bias


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _normalized_input(node: ir.Node):
    """(x, gamma, beta, epsilon, rms) for a LayerNorm-like node whose extra outputs are unused;
    None when `node` is not one (not a candidate)."""
    extra_outputs_used = any(v.uses() or v.is_graph_output() for v in node.outputs[1:])
    if node.domain in ("", "ai.onnx") and node.op_type in ("LayerNormalization", "RMSNormalization"):
        if extra_outputs_used or _attr(node, "stash_type", 1) != 1 or _attr(node, "axis", -1) != -1:
            return None
        inputs = list(node.inputs) + [None]
        rms = node.op_type == "RMSNormalization"
        return inputs[0], inputs[1], (None if rms else inputs[2]), float(_attr(node, "epsilon", 1e-5)), rms
    if node.domain == MS and node.op_type in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
        rms = node.op_type == "SkipSimplifiedLayerNormalization"
        inputs = list(node.inputs) + [None, None]
        has_bias = inputs[3 if rms else 4] is not None
        if inputs[0] is not inputs[1] or has_bias or extra_outputs_used:
            return None
        # The self-skip form: x + x normalized with 4 * epsilon is x normalized with epsilon.
        epsilon = float(np.float32(_attr(node, "epsilon", 1e-12)) / np.float32(4.0))
        return inputs[0], inputs[2], (None if rms else inputs[3]), epsilon, rms
    return None


def _length(value: ir.Value, shapes: SymbolicShapes):
    dims = shapes.dims(value)
    if dims is None or len(dims) != 1 or dims[0] is None or not dims[0].is_int:
        return None
    return int(dims[0])


def _foldable_bias(operand: ir.Value, d: int) -> ir.Node | None:
    """The Add computing `operand` = MatMul(h, W) + c with c a constant [d], W with d columns, and
    `operand` used once (by the residual Add)."""
    found = matmul_bias(operand, width=d)
    if found is None or len(operand.uses()) != 1 or operand.is_graph_output():
        return None
    return found[0]


# Only where the fused kernel is faster than the unfused form: not onnxruntime's CPU EP (see the
# catalogue's measured note; the CPU session builds its own LayerNormalization instead).
@register("skip_layernorm", level=3, stage="fusion", order=70,
          targets=catalogue.kernel("SkipLayerNormalization").emit_targets)
class SkipLayerNormPass(OptPass):
    """Add(a, b) -> LayerNorm/RMSNorm -> com.microsoft SkipLayerNormalization / SkipSimplifiedLayerNormalization."""

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        shapes = SymbolicShapes(graph)
        candidates, claimed = [], set()
        for node in graph:
            found = _normalized_input(node)
            if found is None:
                continue
            x, gamma, beta, epsilon, rms = found
            add = produced_by(x, "Add")
            if add is None or len(add.inputs) != 2:
                continue
            try:
                need(add not in claimed, "the sum is also normalized by another LayerNorm, which takes the residual Add")
                bias_add = self._check(add, gamma, beta, shapes)
            except Decline as exc:
                self.decline(None, node, str(exc))
                continue
            claimed.add(add)
            candidates.append(_Candidate(node, add, gamma, beta, epsilon, rms, bias_add))
        for cand in candidates:
            self._rewrite(model, cand)
        return len(candidates)

    def _check(self, add: ir.Node, gamma, beta, shapes: SymbolicShapes) -> ir.Node | None:
        """The bias Add to absorb (or None); raises Decline when the residual cannot be fused."""
        a, b = add.inputs
        if a is b:
            # Not a residual: LayerNorm(x + x) is the self-skip form already.
            raise Decline("the Add adds a value to itself")
        da, db = shapes.dims(a), shapes.dims(b)
        if da is None or db is None or any(d is None for d in da + db):
            raise Decline("the shapes of the residual Add's operands are not known")
        if da != db:
            raise Decline(f"the skip would broadcast: shapes {da} and {db} differ")
        if len(da) not in (2, 3):
            raise Decline(f"the kernel takes rank-2 or rank-3 inputs, not rank {len(da)}")
        last = da[-1]
        if not last.is_int:
            raise Decline("the normalized (last) dimension is not static")
        d = int(last)
        for value, what in ((gamma, "gamma"), (beta, "beta")):
            if value is None:
                continue
            if _length(value, shapes) != d:
                raise Decline(f"{what} is not 1-D of length {d} (the last dimension)")
        lib.need_kernel(self.options.get("target", "cuda"), "SkipLayerNormalization", gamma.dtype)
        return _foldable_bias(a, d) or _foldable_bias(b, d)

    def _rewrite(self, model: ir.Model, cand: _Candidate) -> None:
        graph = model.graph
        add, norm = cand.add, cand.norm
        total = add.outputs[0]
        a, b = add.inputs
        bias = None
        old_nodes = [norm, add]
        if cand.bias_add is not None:
            # The folded Add computes one of the operands; the other is the skip.
            skip = b if cand.bias_add.outputs[0] is a else a
            mm, bias = (cand.bias_add.inputs if produced_by(cand.bias_add.inputs[0], "MatMul") is not None
                        else reversed(cand.bias_add.inputs))
            inputs = [mm, skip]
            old_nodes.append(cand.bias_add)
        else:
            inputs = [a, b]
        inputs.append(cand.gamma)
        if not cand.rms:
            inputs.append(cand.beta)
        if bias is not None:
            inputs.append(bias)
        while inputs[-1] is None:
            inputs.pop()
        op = "SkipSimplifiedLayerNormalization" if cand.rms else "SkipLayerNormalization"
        # Other users of the sum read it from output 3 (input_skip_bias_sum).
        others = [u for u in total.uses() if u.node is not norm] or total.is_graph_output()
        out = norm.outputs[0]
        base = out.name or "skip_norm"
        new = ir.Node(
            MS, op, inputs, attributes=[ir.AttrFloat32("epsilon", cand.epsilon)],
            num_outputs=4 if others else 1, name=f"{base}.{op}",
        )
        if others:
            for i, suffix in ((1, "mean"), (2, "inv_std_var")):
                new.outputs[i].name = f"{base}.{suffix}"
        ensure_opset(model, MS)
        old_values = [out] + ([total] if others else [])
        new_values = [new.outputs[0]] + ([new.outputs[3]] if others else [])
        ir.convenience.replace_nodes_and_values(graph, add, old_nodes, [new], old_values, new_values)
