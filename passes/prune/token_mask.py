"""Which calibration rows are padding: the attention mask input of a transformer, if it has one.

Tokenizers pad calibration batches to a fixed length; the padded positions' activations never
reach a real token (the attention mask removes their keys) and their outputs are thrown away by
every pooling, yet they can be most of the rows (MiniLM samples padded to 64 hold 13-30 real
tokens). Fitting pruning's statistics on them spends the reconstruction on rows nobody reads, so
rows where the mask is 0 are left out of the statistics and of the fidelity measure.

The mask is a graph input M of a 2-D integer or bool type whose values reach an attention's mask:
input 3 (mask_index) of com.microsoft Attention or input 4 (key_padding_mask) of
MultiHeadAttention, or the scores of a Softmax, through ops that compute a mask from it (casts,
reshapes, arithmetic, comparisons, Where) but never as the indices of a Gather (what token ids and
token types are). Only activations whose leading dims are M's (batch, sequence) are masked; and a
sample whose M holds other values than 0 and 1 is used whole.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_INT = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.INT8, ir.DataType.UINT8}
# Ops a mask computation goes through between the input and the scores.
_MASK_OPS = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Sub", "Mul", "Add", "Div", "Neg", "Not",
             "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Where", "And", "Or", "Identity",
             "ConstantOfShape", "Slice", "Concat", "Tile", "Min", "Max", "Clip", "Transpose", "Flatten"}


def _reaches_attention(start: ir.Value) -> bool:
    seen = set()
    stack = [start]
    while stack:
        v = stack.pop()
        for use in v.uses():
            node, idx = use[0], use[1]
            if node.domain == "com.microsoft":
                if (node.op_type == "Attention" and idx == 3) or (node.op_type == "MultiHeadAttention" and idx == 4):
                    return True
                continue
            if node.op_type == "Softmax":
                return True
            if node.op_type not in _MASK_OPS or id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(node.outputs)
    return False


def find(graph: ir.Graph) -> str | None:
    """The name of the graph input that is the attention padding mask, or None."""
    for v in graph.inputs:
        if v.dtype not in _INT or v.shape is None or len(v.shape) != 2 or v.const_value is not None:
            continue
        if any(use[0].op_type == "Gather" and use[1] == 1 for use in v.uses()):
            continue
        if _reaches_attention(v):
            return v.name
    return None


def rows(feed: dict, name: str | None) -> np.ndarray | None:
    """The sample's [batch, seq] boolean keep mask, or None (use every row)."""
    if name is None or name not in feed:
        return None
    m = np.asarray(feed[name])
    if m.ndim != 2 or not np.isin(m, (0, 1)).all() or not m.any():
        return None
    return m.astype(bool)


def select(x: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """The rows [..., K] of x at the kept positions, when x's leading dims are the mask's."""
    if keep is None or x.ndim < 3 or x.shape[:2] != keep.shape:
        return x.reshape(-1, x.shape[-1])
    return x[keep].reshape(-1, x.shape[-1])


def trim(feed: dict, name: str | None) -> dict | None:
    """The sample with its trailing padding cut off (every input whose leading dims are the mask's
    (batch, seq) cut to the longest real row), or None when the mask is not right padding or there
    is nothing to cut. Whether the model gives the same real-token outputs on it is checked by the
    caller (a model with a fixed sequence length, or positions counted from the end, does not)."""
    keep = rows(feed, name)
    if keep is None:
        return None
    length = keep.sum(axis=1)
    if not all(keep[i, : length[i]].all() for i in range(keep.shape[0])):
        return None
    cut = int(length.max())
    if cut == keep.shape[1]:
        return None
    return {k: (np.asarray(v)[:, :cut] if np.ndim(v) >= 2 and np.shape(v)[:2] == keep.shape else v)
            for k, v in feed.items()}
