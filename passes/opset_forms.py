"""Ops in the form the model's opset defines (a helper module: it registers no pass).

Several ops moved attributes to inputs over the opsets, and rewrite libraries (onnxscript's
constant folder turns ConcatFromSequence into Unsqueeze + Concat and SplitToSequence into Split)
build the newest form whatever the model's opset. A model at opset 11 or 12 with an Unsqueeze
taking its axes as an input is invalid. `legalize(model)`, run by the pipeline after every pass,
moves constant inputs back into the attributes the model's opset has:

  Unsqueeze, Squeeze   axes input      -> axes attribute       (before opset 13)
  Split                split input     -> split attribute      (before 13)
  ReduceSum            axes input      -> axes attribute       (before 13)
  other Reduce*        axes input      -> axes attribute       (before 18)
  Slice                starts, ends, axes, steps inputs -> starts, ends, axes attributes (before 10)
  Pad                  pads, value inputs -> pads, value attributes  (before 11)
  Clip                 min, max inputs -> min, max attributes  (before 11)
  Resize               (X, roi, scales) -> (X, scales)         (opset 10)
  Constant             value_int(s), value_float(s) -> value   (before 12)

A node whose moved input is not a constant cannot be written at that opset and is left as it is
(the checker then refuses the model with the node named).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
           "ReduceMin", "ReduceProd", "ReduceSumSquare")


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _ints(name: str, array: np.ndarray) -> ir.Attr:
    return ir.AttrInt64s(name, [int(v) for v in array.reshape(-1)])


def _move(node: ir.Node, first: int, names: tuple[str, ...], as_float: tuple[str, ...] = ()) -> bool:
    """Inputs first.. become attributes `names` (None inputs are skipped); True when done."""
    moved = node.inputs[first:first + len(names)]
    arrays = [_const(v) if v is not None else None for v in moved]
    if any(v is not None and a is None for v, a in zip(moved, arrays)):
        return False
    for name, array in zip(names, arrays):
        if array is None:
            continue
        if name in as_float:
            node.attributes[name] = ir.AttrFloat32(name, float(array.reshape(-1)[0]))
        else:
            node.attributes[name] = _ints(name, array)
    _drop_inputs(node, first)
    return True


def _drop_inputs(node: ir.Node, keep: int) -> None:
    node.resize_inputs(keep)  # detaches the uses of the dropped inputs


def _legalize_node(node: ir.Node, opset: int) -> bool:
    op, n = node.op_type, len(node.inputs)
    if op == "Constant" and opset < 12:
        return _constant_as_tensor(node)
    if op in ("Unsqueeze", "Squeeze") and opset < 13 and n > 1:
        return _move(node, 1, ("axes",))
    if op == "Split" and opset < 13 and n > 1:
        return _move(node, 1, ("split",))
    if (op == "ReduceSum" and opset < 13 or op in _REDUCE and opset < 18) and n > 1:
        return _move(node, 1, ("axes",))
    if op == "Slice" and opset < 10 and n > 1:
        steps = _const(node.inputs[4]) if n > 4 and node.inputs[4] is not None else None
        if steps is not None and np.any(steps != 1):
            return False
        return _move(node, 1, ("starts", "ends", "axes")) if n <= 4 or steps is not None else False
    if op == "Pad" and opset < 11 and n > 1:
        return _move(node, 1, ("pads", "value"), as_float=("value",))
    if op == "Clip" and opset < 11 and n > 1:
        return _move(node, 1, ("min", "max"), as_float=("min", "max"))
    if op == "Resize" and opset == 10 and n > 2:
        scales = node.inputs[2]
        node.replace_input_with(1, scales)
        _drop_inputs(node, 2)
        return True
    return False


_CONSTANT_FORMS = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32,
                   "value_floats": np.float32}


def _constant_as_tensor(node: ir.Node) -> bool:
    """Constant(value_int=3) (opset 12 on) -> Constant(value=tensor(3))."""
    for name, dtype in _CONSTANT_FORMS.items():
        attr = node.attributes.get(name)
        if attr is not None:
            del node.attributes[name]
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.array(attr.value, dtype=dtype)))
            return True
    return False


def legalize(model: ir.Model) -> int:
    """Rewrite newer-form nodes into the model's opset's form; return how many changed."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 99))
    if opset >= 18:
        return 0
    changed = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain in ("", "ai.onnx") and _legalize_node(node, opset):
            changed += 1
    return changed
