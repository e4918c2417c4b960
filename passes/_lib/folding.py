"""The graph side of folding a per-channel affine map (BatchNorm, a bias Add, a scale Mul) into
the Conv / ConvTranspose / Gemm / MatMul that produces its input (the math: onnxopt.kernels.folding)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import folding
from onnxopt.passes._lib.graph import int_attr, optional_input, single_use, standard

# Ops a per-channel affine map after them can fold into (weights layout: see producer_layout).
FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def rank_of(value: ir.Value) -> int | None:
    """The value's rank if known; for a Conv/ConvTranspose output, the rank of its weights."""
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is not None and producer.op_type in ("Conv", "ConvTranspose") and standard(producer):
        w = optional_input(producer, 1)
        if w is not None and w.shape is not None:
            return len(w.shape)
    return None


def producer_layout(node: ir.Node) -> tuple[str, int]:
    """(layout in onnxopt.kernels.folding, group) of a Conv/ConvTranspose/Gemm/MatMul node."""
    if node.op_type == "Conv":
        return "conv", 1
    if node.op_type == "ConvTranspose":
        return "conv_transpose", int_attr(node, "group", 1)
    if node.op_type == "Gemm":
        return ("matmul_t" if int_attr(node, "transB", 0) else "matmul"), 1
    return "matmul", 1


def check_weights(node: ir.Node, w: np.ndarray, channels: int | None = None) -> str | None:
    """Why W (of `node`, see producer_layout) cannot take a per-output-channel fold, else None."""
    op_type = node.op_type
    if not np.issubdtype(w.dtype, np.floating):
        return f"{op_type} weights are {w.dtype}, not floating point"
    layout, group = producer_layout(node)
    if op_type in ("Conv", "ConvTranspose") and w.ndim < 3:
        return f"{op_type} weights have rank {w.ndim}, expected >= 3"
    if op_type in ("Gemm", "MatMul") and w.ndim != 2:
        return f"{op_type} weights have rank {w.ndim}, expected 2"
    if op_type == "ConvTranspose" and (group < 1 or w.shape[0] % group):
        return f"ConvTranspose weights' {w.shape[0]} input channels do not split into group={group}"
    if channels is not None and folding.output_channels(w, layout, group) != channels:
        return (f"{op_type} computes {folding.output_channels(w, layout, group)} output channels, "
                f"the following op has {channels}")
    return None


def note_shared_outputs(sink, rule: str, consumer: ir.Node, candidates) -> None:
    """Report a consumer the matcher skipped because its producer's output has other users.

    onnxscript's matcher refuses such matches before any check runs (the producer could not be
    removed), so without this the report would not say why they did not fold."""
    for value in candidates:
        producer = value.producer() if value is not None else None
        if producer is None or not standard(producer, *FOLDABLE):
            continue
        if not single_use(value):
            users = len(value.uses()) + int(value.is_graph_output())
            sink.decline(rule, consumer,
                         f"the {producer.op_type} output '{value.name}' has {users} users; "
                         f"it can only absorb {consumer.op_type} when that is the only one")
            return
