"""Inference Dropout on request (`--inference-dropout`): training-mode Dropout becomes inference Dropout.

    Dropout(x, ratio, training_mode=True) -> Dropout(x, ratio, training_mode=False)  (= x, mask all true)

A model exported in training mode (torch.onnx with `training=TrainingMode.TRAINING`, or a module
left in train()) drops random activations on every run, so it has no reference to verify against
and no deployment wants it. This changes what the model computes, on purpose, so it runs only when
asked, before the reference run, and the report lists the nodes it changed; the -O1 cleanups then
remove the inference Dropouts. Not a registered pass: it must run before verification takes the
original's outputs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def apply(model: ir.Model) -> list[str]:
    """Turn every training-mode Dropout (any subgraph) to inference mode; return their names."""
    changed = []
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        mode = node.inputs[2]
        if mode is None:
            continue
        const = ir.convenience.get_const_tensor(mode)
        if const is not None and not bool(const.numpy()):
            continue
        # A Constant node, not an initializer: IR < 4 models need every initializer as an input.
        false = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(np.array(False)))],
                        name=f"{node.name}.inference_mode", num_outputs=1)
        false.outputs[0].name = f"{node.name or 'dropout'}.inference_mode"
        node.graph.insert_before(node, false)
        node.replace_input_with(2, false.outputs[0])
        changed.append(node.name or "?")
    return changed
