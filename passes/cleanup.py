"""Exact cleanups (-O0 canonicalization, -O1 cleanups, and the final dead-code sweep).

Each pass here is exact: it never changes what the model computes, bit for bit, on any input.
Most of them are thin wrappers over onnx_ir / onnxscript building blocks; the wrappers add the
registry entry and the accounting the report needs.

- canonicalize:            nodes in topological order; every value and node uniquely named.
- fold_initializer_inputs: (flag) initializers that are also graph inputs (IR v3 exports) become
                           plain constants. Off by default: it removes inputs from the interface.
- fold_constants:          a node whose inputs are all constant is replaced by its value, including
                           Shape/Gather/Concat/Reshape chains over static shapes and small
                           (<= 1024 elements) ConstantOfShape results.
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

import contextlib

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import _constant_folding, fold_constants_ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import (
    dropout_inference_rule,
    dropout_zero_rule,
    no_op_cast_rule,
    no_op_expand_rule,
    no_op_transpose_rule,
    reshape_reshape_rule,
)

from onnxopt.passes._lib import graph as lib
from onnxopt.passes.base import OptPass, RewritePass
from onnxopt.passes.registry import register


def _size(model: ir.Model) -> tuple[int, int]:
    nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    return nodes, len(model.graph.initializers)


def _changes(model: ir.Model, step) -> int:
    """Run `step(model) -> modified`; return its fire count: the nodes it removed, else the
    initializers it removed, and at least 1 when it changed anything."""
    nodes, inits = _size(model)
    if not step(model):
        return 0
    nodes_after, inits_after = _size(model)
    return max(nodes - nodes_after, inits - inits_after, 1)


def _run(passes, model: ir.Model) -> int:
    """Run onnx_ir passes in order and count their changes."""
    return _changes(model, lambda m: sum(int(p(m).modified) for p in passes) > 0)


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


# ConstantOfShape results up to this many elements are folded (onnxscript keeps every
# ConstantOfShape so as not to materialize large tensors; small ones are shape arithmetic, such
# as the "same" padding amounts of TF-style exports, which must become constants for Pad fusion).
SMALL_CONSTANT_OF_SHAPE = 1024


def _should_fold(node: ir.Node) -> bool | None:
    # A value that is both initializer and graph input is a default the caller may override:
    # folding it would bake the default in.
    if any(v is not None and v.is_graph_input() for v in node.inputs):
        return False
    if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx"):
        shape = lib.constant_array(node.inputs[0]) if node.inputs else None
        if shape is not None and shape.ndim == 1 and np.all(shape >= 0) and int(np.prod(shape)) <= SMALL_CONSTANT_OF_SHAPE:
            return True
    return None


@contextlib.contextmanager
def _split_needs_constant_sizes(opset: int):
    """Before opset 13 Split takes its sizes as an attribute, so onnxscript's SplitToSequence ->
    Split rewrite (which passes them as an input) is only valid when they are constant (the
    pipeline then moves them into the attribute, see opset_forms). onnxscript offers no switch:
    its evaluator lookup is wrapped for the duration of the fold."""
    if opset >= 13:
        yield
        return
    registry = _constant_folding.registry
    lookup = registry.lookup_evaluators

    def guarded(domain, op_type, version):
        found = lookup(domain, op_type, version)
        if op_type != "SplitToSequence":
            return found
        return [lambda node, op, state, f=f: f(node, op, state)
                if len(node.inputs) < 2 or lib.constant_array(node.inputs[1]) is not None else None
                for f in found]

    registry.lookup_evaluators = guarded
    try:
        yield
    finally:
        registry.lookup_evaluators = lookup


@register("fold_constants", level=1, stage="cleanup")
class FoldConstantsPass(OptPass):
    """op(constants) = constant; shape ops over static shapes become constants."""

    def apply(self, model: ir.Model) -> int:
        with _split_needs_constant_sizes(model.opset_imports.get("", 99)):
            changed = _changes(
                model,
                lambda m: fold_constants_ir(m, should_fold=_should_fold).modified,
            )
        _rewrap_strings(model)
        return changed


def _rewrap_strings(model: ir.Model) -> None:
    """onnxscript's folder returns a folded string value (e.g. Identity of a string Constant) as an
    ir.Tensor over a numpy bytes array, which onnx_ir cannot serialize; make it an ir.StringTensor."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if t is not None and t.dtype == ir.DataType.STRING and not isinstance(t, ir.StringTensor):
                value.const_value = ir.StringTensor(np.asarray(t.numpy(), dtype=np.bytes_), name=t.name,
                                                    shape=t.shape)


class NoOpReshape(pattern.RewriteRuleClassBase):
    """Reshape(x, s) = x when x's static shape already equals s (after resolving 0 and -1)."""

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True)

    def check(self, context, x, shape, **_):
        target = lib.constant_array(shape)
        if target is None:
            return lib.fail("target shape is not constant")
        dims = lib.static_shape(x)
        if dims is None:
            return lib.fail("input shape is not static")
        target = [int(t) for t in target.tolist()]
        if len(target) != len(dims):
            return lib.fail("rank changes")
        resolved = [d if t == 0 else t for t, d in zip(target, dims)]
        if -1 in resolved:
            known = int(np.prod([t for t in resolved if t != -1]))
            resolved = [int(np.prod(dims)) // known if t == -1 else t for t in resolved]
        if resolved != list(dims):
            return lib.fail(f"shape {dims} is changed to {resolved}")
        return lib.ok()

    def rewrite(self, op, x, shape, **_):
        return op.Identity(x)


class _IdentityElimination(common.IdentityEliminationPass):
    """onnx_ir's identity elimination, minus one case it gets wrong for us.

    `z = Identity(y)` where both y and z are graph outputs must stay: removing it makes one value
    two outputs, which ONNX forbids, and the pipeline would re-insert it on every run (not
    idempotent). Likewise an output Identity of a value from an enclosing graph.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        x, y = (node.inputs[0] if node.inputs else None), node.outputs[0]
        if x is not None and y.is_graph_output():
            producer = x.producer()
            if x.is_graph_output() or (producer is not None and producer.graph is not node.graph):
                return False
        return super()._try_eliminate_identity_node(node)


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
        return count + _changes(model, lambda m: _IdentityElimination()(m).modified)


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
        removed = _drop_stale_initializers(model)
        return removed + _run(
            [
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            model,
        )


def _drop_stale_initializers(model: ir.Model) -> int:
    """Initializers only nodes outside the graph still "use": folding an If or Loop away leaves the
    nodes of its dropped branch holding uses of outer weights, so use counts never reach zero
    (seen on voice models: `Failed to find existing initializer` in onnxruntime)."""
    live = {id(node) for node in ir.traversal.RecursiveGraphIterator(model.graph)}
    stale = [name for name, value in model.graph.initializers.items()
             if not value.is_graph_input() and not value.is_graph_output()
             and value.uses() and all(id(node) not in live for node, _ in value.uses())]
    for name in stale:
        model.graph.initializers.pop(name)
    return len(stale)


@register("canonicalize_final", level=0, stage="finalize")
class FinalCanonicalizePass(CanonicalizePass):
    """Topological order and unique names again after all rewrites."""
