"""Differential verification: run the original and the compiled model in onnxruntime, compare.

onnxruntime's own graph optimizations are disabled for both runs, so its fusions cannot hide (or
cause) a difference: what is compared is what onnxopt emitted.

Sample inputs are synthesized from the graph inputs' types and shapes:
- a dynamic dimension gets `DEFAULT_BATCH` (1) on axis 0 and `DEFAULT_DIM` (16) elsewhere; a
  symbolic dimension gets the same value wherever its name appears; `input_shapes` overrides
  (the CLI's `--input-shape name:1,128`);
- integer inputs that index an embedding table (a Gather on a constant) get values in range; inputs
  whose name says "mask" get ones; other integer inputs get 0 or 1; booleans are True;
- float inputs are standard normal, seeded, so verification is reproducible.

The error of one output is max|got - ref| / max(max|ref|, 1e-6): relative to the output's
magnitude, so it means the same for logits and for hidden states.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import weights
from onnxopt.errors import CompileError
from onnxopt.kernels.metrics import cosine  # noqa: F401  (part of this module's API)

DEFAULT_BATCH = 1
DEFAULT_DIM = 16
DEFAULT_TOLERANCE = 1e-4
_MAGNITUDE_FLOOR = 1e-6
# Ops through which an integer input still indexes the same table.
_INDEX_PRESERVING = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """'name:1,128' -> ('name', (1, 128))."""
    name, sep, dims = spec.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip() != "")
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise CompileError(f"bad --input-shape {spec!r}: expected NAME:D1,D2,... with positive integers")
    return name, shape


def input_shapes(model: ir.Model, overrides: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every true graph input (initializer-backed inputs keep their defaults)."""
    overrides = dict(overrides or {})
    inputs = [v for v in model.graph.inputs if v.const_value is None]
    unknown = set(overrides) - {v.name for v in inputs}
    if unknown:
        names = ", ".join(v.name for v in inputs)
        raise CompileError(f"--input-shape names unknown input {sorted(unknown)[0]!r} (inputs: {names})")
    symbols: dict[str, int] = {}
    # Overrides pin symbolic dims, so other inputs sharing the symbol agree (input_ids and mask).
    for v in inputs:
        if v.name in overrides and v.shape is not None:
            if len(overrides[v.name]) != len(v.shape):
                raise CompileError(
                    f"--input-shape {v.name}: rank {len(overrides[v.name])} given, the model's input has rank {len(v.shape)}"
                )
            for d, n in zip(v.shape.dims, overrides[v.name]):
                if isinstance(d, int) and d != n:
                    raise CompileError(f"--input-shape {v.name}: dimension {d} is fixed in the model, {n} given")
                if isinstance(d, ir.SymbolicDim) and d.value is not None:
                    symbols.setdefault(d.value, n)
    shapes = {}
    for v in inputs:
        if v.name in overrides:
            shapes[v.name] = tuple(overrides[v.name])
            continue
        if v.shape is None:
            raise CompileError(f"input {v.name!r} has no shape: give it with --input-shape {v.name}:D1,D2,...")
        dims = []
        for axis, d in enumerate(v.shape.dims):
            if isinstance(d, int):
                dims.append(d)
                continue
            default = DEFAULT_BATCH if axis == 0 else DEFAULT_DIM
            key = d.value if isinstance(d, ir.SymbolicDim) else None
            dims.append(symbols.setdefault(key, default) if key else default)
        shapes[v.name] = tuple(dims)
    return shapes


def _index_range(value: ir.Value) -> int | None:
    """Size of the smallest constant table `value` indexes through Gather, if any."""
    highs, frontier, seen = [], [value], set()
    while frontier:
        v = frontier.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node, idx in v.uses():
            if node.op_type == "Gather" and idx == 1:
                table = node.inputs[0]
                if table is not None and table.const_value is not None and table.shape is not None:
                    axis = node.attributes.get_int("axis", 0)
                    highs.append(int(table.shape[axis]))
            elif node.op_type in _INDEX_PRESERVING and idx == 0:
                frontier.extend(node.outputs)
    return min(highs) if highs else None


def synthesize_feeds(
    model: ir.Model, overrides: dict[str, tuple[int, ...]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = input_shapes(model, overrides)
    feeds = {}
    for v in model.graph.inputs:
        if v.name not in shapes:
            continue
        shape = shapes[v.name]
        if v.dtype is None:
            raise CompileError(f"input {v.name!r} has no element type")
        dtype = v.dtype.numpy()
        if v.dtype == ir.DataType.BOOL:
            feeds[v.name] = np.ones(shape, dtype=bool)
        elif v.dtype.is_integer():
            if "mask" in v.name.lower():
                feeds[v.name] = np.ones(shape, dtype=dtype)
            else:
                high = _index_range(v) or 2
                feeds[v.name] = rng.integers(0, high, size=shape).astype(dtype)
        elif v.dtype.is_floating_point():
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        else:
            raise CompileError(f"input {v.name!r}: cannot synthesize values of type {v.dtype}")
    return feeds


def session(model: onnx.ModelProto | ir.Model | str | os.PathLike, providers=("CPUExecutionProvider",),
            optimize: bool = False):
    """An onnxruntime session with every graph optimization off (`optimize`: all on, as deployed;
    for measuring what the fused and integer kernels compute)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    # Verification runs once: pre-packing weights would only add a copy and startup time.
    options.add_session_config_entry("session.disable_prepacking", "1")
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), options, providers=list(providers))
    if isinstance(model, ir.Model):
        return weights.session(model, options, providers)
    return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))


def run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        sess = session(model)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError(f"onnxruntime cannot run the model: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclasses.dataclass
class OutputDiff:
    name: str
    max_abs: float
    rel: float
    ok: bool
    note: str = ""
    cosine: float | None = None


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tolerance: float) -> list[OutputDiff]:
    diffs = []
    for name, r in ref.items():
        g = got.get(name)
        if g is None:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), False, "output missing"))
            continue
        if g.shape != r.shape or g.dtype != r.dtype:
            diffs.append(
                OutputDiff(name, float("inf"), float("inf"), False, f"{g.dtype}{list(g.shape)} != {r.dtype}{list(r.shape)}")
            )
            continue
        if not np.issubdtype(r.dtype, np.inexact):
            bad = int(np.count_nonzero(g != r))
            diffs.append(OutputDiff(name, float(bad), float(bad), bad == 0, "exact compare"))
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        if not np.array_equal(np.isfinite(r64), np.isfinite(g64)) or not np.array_equal(
            r64[~np.isfinite(r64)], g64[~np.isfinite(g64)]
        ):
            diffs.append(OutputDiff(name, float("inf"), float("inf"), False, "non-finite values differ"))
            continue
        finite = np.isfinite(r64)
        err = float(np.max(np.abs(g64 - r64)[finite])) if finite.any() else 0.0
        scale = max(float(np.max(np.abs(r64[finite]))) if finite.any() else 0.0, _MAGNITUDE_FLOOR)
        diffs.append(OutputDiff(name, err, err / scale, err / scale <= tolerance))
    return diffs


def signature(model: ir.Model, initializer_inputs: bool = True) -> dict:
    """Names, element types and shapes of the graph inputs and outputs: the model's interface."""

    def describe(v: ir.Value):
        shape = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape.dims]
        return {"name": v.name, "dtype": str(v.dtype), "shape": shape}

    return {
        "inputs": [describe(v) for v in model.graph.inputs if initializer_inputs or v.const_value is None],
        "outputs": [describe(v) for v in model.graph.outputs],
    }
