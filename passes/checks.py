"""Precondition helpers shared by the pattern passes.

Each returns a MatchResult (truthy on success) or a plain value; a failed check carries a reason
a person can read, which ends up in the compile report.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


def ok() -> pattern.MatchResult:
    return pattern.MatchResult()


def fail(reason: str, *sources) -> pattern.MatchResult:
    return pattern.MatchResult().fail(reason, *sources)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's numpy array if it is a constant the model cannot override, else None."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape if every dimension is a known integer, else None."""
    if value is None or value.shape is None:
        return None
    dims = value.shape.dims
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(dims)


def single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()
