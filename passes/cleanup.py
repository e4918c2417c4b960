"""Exact cleanups (-O0 canonicalization, -O1 cleanups, and the final dead-code sweep).

Each pass here is exact: it never changes what the model computes, bit for bit, on any input.
Most of them are thin wrappers over onnx_ir / onnxscript building blocks; the wrappers add the
registry entry and the accounting the report needs.

- canonicalize:            nodes in topological order; every value and node uniquely named.
- fold_initializer_inputs: (flag) initializers that are also graph inputs (IR v3 exports) become
                           plain constants. Off by default: it removes inputs from the interface.
- fold_constants:          a node whose inputs are all constant is replaced by its value, including
                           Shape/Gather/Concat/Reshape/ConstantOfShape chains over static shapes.
                           Initializers that are also graph inputs are never treated as constants.
- remove_noops:            Identity(x) = x; Dropout(x) at inference = x; Cast(x, to=dtype(x)) = x;
                           Transpose(x, perm=identity) = x; Reshape/Expand(x, shape(x)) = x;
                           Reshape(Reshape(x, s1), s2) = Reshape(x, s2) (s2 without 0 entries).
- cse:                     two nodes with the same op, attributes and inputs are computed once.
- deduplicate_initializers: initializers with equal dtype, shape and bytes are stored once.
- lift_constants:          Constant nodes become initializers (one place for all weights).
- dead_code:               nodes, initializers, functions and opset imports nothing uses are removed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants_ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import (
    dropout_inference_rule,
    dropout_zero_rule,
    no_op_cast_rule,
    no_op_expand_rule,
    no_op_transpose_rule,
    reshape_reshape_rule,
)

from onnxopt.passes import checks
from onnxopt.passes.base import OptPass, RewritePass
from onnxopt.passes.registry import register


def _size(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph)) + len(model.graph.initializers)


def _run(passes, model: ir.Model) -> int:
    """Run onnx_ir passes in order; return how many nodes and initializers they removed (at least
    1 when anything changed), as the pass's fire count."""
    before = _size(model)
    modified = sum(int(p(model).modified) for p in passes)
    return max(before - _size(model), 1) if modified else 0


@register("canonicalize", level=0, stage="canonicalize")
class CanonicalizePass(OptPass):
    """Topological order and stable unique names (graph input/output names are kept)."""

    def apply(self, model: ir.Model) -> int:
        return _run([common.TopologicalSortPass(), common.NameFixPass()], model)


@register("fold_initializer_inputs", level=0, stage="canonicalize", flag="fold-initializer-inputs")
class FoldInitializerInputsPass(OptPass):
    """Initializers listed as graph inputs stop being inputs, so they can be folded."""

    def apply(self, model: ir.Model) -> int:
        return _run([common.RemoveInitializersFromInputsPass()], model)


def _not_an_overridable_input(node: ir.Node) -> bool | None:
    # A value that is both initializer and graph input is a default the caller may override:
    # folding it would bake the default in.
    if any(v is not None and v.is_graph_input() for v in node.inputs):
        return False
    return None


@register("fold_constants", level=1, stage="cleanup")
class FoldConstantsPass(OptPass):
    """op(constants) = constant; shape ops over static shapes become constants."""

    def apply(self, model: ir.Model) -> int:
        result = fold_constants_ir(
            model, onnx_shape_inference=False, should_fold=_not_an_overridable_input
        )
        return int(result.modified)


class NoOpReshape(pattern.RewriteRuleClassBase):
    """Reshape(x, s) = x when x's static shape already equals s (after resolving 0 and -1)."""

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True)

    def check(self, context, x, shape, **_):
        target = checks.constant_array(shape)
        if target is None:
            return checks.fail("target shape is not constant")
        dims = checks.static_shape(x)
        if dims is None:
            return checks.fail("input shape is not static")
        target = [int(t) for t in target.tolist()]
        if len(target) != len(dims):
            return checks.fail("rank changes")
        resolved = [d if t == 0 else t for t, d in zip(target, dims)]
        if -1 in resolved:
            known = int(np.prod([t for t in resolved if t != -1]))
            resolved = [int(np.prod(dims)) // known if t == -1 else t for t in resolved]
        if resolved != list(dims):
            return checks.fail(f"shape {dims} is changed to {resolved}")
        return checks.ok()

    def rewrite(self, op, x, shape, **_):
        return op.Identity(x)


@register("remove_noops", level=1, stage="cleanup")
class RemoveNoOpsPass(RewritePass):
    """Identity, inference Dropout and no-op Cast/Transpose/Reshape/Expand are removed."""

    # Every Cast and Reshape is a candidate here; listing them all would drown the report.
    report_declines = False

    def __init__(self) -> None:
        super().__init__(
            [
                dropout_inference_rule,
                dropout_zero_rule,
                no_op_cast_rule,
                no_op_transpose_rule,
                no_op_expand_rule,
                NoOpReshape.rule(),
                reshape_reshape_rule,
            ]
        )

    def apply(self, model: ir.Model) -> int:
        # The rules above leave Identity nodes behind; identity elimination then bypasses them
        # (keeping graph output names).
        count = super().apply(model)
        eliminate = common.IdentityEliminationPass()
        while eliminate(model).modified:
            count += 1
        return count


@register("cse", level=1, stage="cleanup")
class CommonSubexpressionPass(OptPass):
    """f(a, b) computed twice with equal attributes becomes one node."""

    def apply(self, model: ir.Model) -> int:
        return _run([common.CommonSubexpressionEliminationPass()], model)


@register("deduplicate_initializers", level=1, stage="cleanup")
class DeduplicateInitializersPass(OptPass):
    """Initializers with identical dtype, shape and content are shared."""

    def apply(self, model: ir.Model) -> int:
        return _run([common.DeduplicateInitializersPass()], model)


@register("lift_constants", level=1, stage="cleanup")
class LiftConstantsPass(OptPass):
    """Constant nodes become initializers."""

    def apply(self, model: ir.Model) -> int:
        return _run([common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)], model)


@register("dead_code", level=1, stage="finalize")
class DeadCodePass(OptPass):
    """Unused nodes, initializers, functions and opset imports are removed."""

    def apply(self, model: ir.Model) -> int:
        return _run(
            [
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            model,
        )


@register("canonicalize_final", level=0, stage="finalize")
class FinalCanonicalizePass(CanonicalizePass):
    """Topological order and unique names again after all rewrites."""
