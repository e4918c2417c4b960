"""Merged Q/K/V projections (-O2, every target, standard ops only).

N >= 2 MatMuls that read the same input X as their left operand, with constant 2-D weights of the
same K and dtype, become one MatMul on the concatenated weights and one Split:

    [X W1 (+ b1), ..., X Wn (+ bn)] = Split(X [W1 | ... | Wn] (+ [b1 | ... | bn]), [N1, ..., Nn], axis=-1)

A bias is a constant vector [Ni] added by the MatMul's only user; when at least one projection has
one, the others get zeros (when none has one, there is no Add). The Split takes its sizes as an
attribute before opset 13 and as an input from 13 on. Its outputs replace the originals (and take
their names), so the attention, Q/K/V reshapes and everything else downstream are unchanged.

Exact: the concatenated product computes each column block with the same dot products as before.

Preconditions (each failing one is reported as a declined candidate):
  * the weight is a constant (an initializer that is also a graph input can be overridden, so it
    is not), 2-D, of the same K and dtype as the others;
  * X is the MatMul's left operand (a MatMul whose right operand is the shared value has nothing
    to concatenate with);
  * the opset has Split with negative axes (>= 11), or X's rank is known.
New initializers are named from the first weight and bias they replace (`{W1}.qkv`, `{b1}.qkv`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._lib import graph as lib
from onnxopt.passes._lib.graph import new_initializer
from onnxopt.passes.base import Decline, OptPass, need
from onnxopt.passes.registry import register

def _bias(node: ir.Node, width: int, dtype) -> tuple[ir.Node, np.ndarray, ir.Value] | None:
    """(Add, bias array, bias value) when the MatMul's only user adds a constant [width] vector."""
    add = lib.only_use(node.outputs[0])
    found = lib.matmul_bias(add.outputs[0], width) if lib.standard(add, "Add") else None
    if found is None or found[1] is not node:
        return None
    bias = lib.constant_array(found[2])
    return (add, bias, found[2]) if bias.dtype == dtype else None


def _weight(node: ir.Node, x: ir.Value) -> np.ndarray:
    """The constant 2-D float weight of a MatMul whose left operand is the shared `x`; raises Decline."""
    need(node.inputs[0] is x, f"{x.name!r} is this MatMul's right operand, not the shared left one")
    w_value = node.inputs[1]
    need(w_value is None or not w_value.is_graph_input(),
         f"weight {getattr(w_value, 'name', None)!r} is a graph input (overridable), not a constant")
    weight = lib.constant_array(w_value)
    need(weight is not None, f"weight {getattr(w_value, 'name', None)!r} is not a constant")
    need(weight.ndim == 2, f"weight {w_value.name!r} is {weight.ndim}-D, not 2-D")
    need(weight.dtype.kind == "f", f"weight {w_value.name!r} has dtype {weight.dtype}, not floating point")
    return weight


@register("merge_qkv", level=2, stage="fusion", order=60)
class MergeQKVPass(OptPass):
    """MatMuls sharing their input, with constant weights, become one MatMul and a Split."""

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        shared: dict[ir.Value, list[ir.Node]] = {}
        for node in graph:
            if lib.standard(node, "MatMul"):
                for value in node.inputs:
                    if value is not None and node not in shared.setdefault(value, []):
                        shared[value].append(node)
        count = 0
        for x, users in shared.items():
            if len(users) < 2 or lib.constant_array(x) is not None:
                continue
            count += self._merge(graph, x, users)
        return count

    def _merge(self, graph: ir.Graph, x: ir.Value, users: list[ir.Node]) -> int:
        candidates = []
        for node in users:
            try:
                candidates.append((node, _weight(node, x)))
            except Decline as exc:
                self.decline(None, node, str(exc))
        if len(candidates) < 2:
            return 0
        # The most common (K, dtype) wins; a different one cannot share the input's last axis.
        keys = [(w.shape[0], w.dtype) for _, w in candidates]
        key = max(keys, key=keys.count)
        group = []
        for (node, weight), k in zip(candidates, keys):
            if k != key:
                self.decline(None, node, f"weight K={k[0]} ({k[1]}) differs from the other projections' K={key[0]} ({key[1]})")
            else:
                group.append((node, weight))
        if len(group) < 2:
            return 0
        opset = graph.opset_imports.get("", 1)
        if opset < 11 and (x.shape is None or x.shape.rank() is None):
            for node, _ in group:
                self.decline(None, node, f"opset {opset} Split needs a non-negative axis and the input's rank is unknown")
            return 0
        self._rewrite(graph, x, group, opset)
        return 1

    def _rewrite(self, graph: ir.Graph, x: ir.Value, group, opset: int) -> None:
        order = {node: i for i, node in enumerate(graph)}
        group.sort(key=lambda item: order[item[0]])
        first = group[0][0]
        dtype = group[0][1].dtype
        widths = [int(w.shape[1]) for _, w in group]
        biases = [_bias(node, w.shape[1], dtype) for node, w in group]

        weight = new_initializer(graph, np.concatenate([w for _, w in group], axis=1), f"{first.inputs[1].name}.qkv")
        matmul = ir.Node("", "MatMul", [x, weight], name=f"{first.name}.qkv", num_outputs=1)
        new_nodes = [matmul]
        merged = matmul.outputs[0]
        if any(b is not None for b in biases):
            vector = np.concatenate([b[1] if b is not None else np.zeros(n, dtype) for b, n in zip(biases, widths)])
            base = next(b[2].name for b in biases if b is not None)
            add = ir.Node("", "Add", [merged, new_initializer(graph, vector, f"{base}.qkv")],
                          name=f"{first.name}.qkv_bias", num_outputs=1)
            new_nodes.append(add)
            merged = add.outputs[0]
        axis = -1 if opset >= 11 else x.shape.rank() - 1
        if opset >= 13:
            sizes = new_initializer(graph, np.array(widths, np.int64), f"{first.inputs[1].name}.qkv_split")
            split = ir.Node("", "Split", [merged, sizes], attributes=[ir.AttrInt64("axis", axis)],
                            name=f"{first.name}.qkv_split", num_outputs=len(group))
        else:
            split = ir.Node("", "Split", [merged], attributes=[ir.AttrInt64("axis", axis), ir.AttrInt64s("split", widths)],
                            name=f"{first.name}.qkv_split", num_outputs=len(group))
        new_nodes.append(split)
        graph.insert_before(first, new_nodes)

        for (node, _), bias, out in zip(group, biases, split.outputs):
            old = bias[0].outputs[0] if bias is not None else node.outputs[0]
            name = old.name
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            if bias is not None:
                graph.remove(bias[0], safe=True)
            graph.remove(node, safe=True)
            # The split piece is the same tensor: it takes the replaced value's name, type and shape.
            out.name, out.type, out.shape = name, old.type, old.shape
