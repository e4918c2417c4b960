"""Keep weights out of protobuf: the model's skeleton goes through protobuf, weights do not.

Serializing a 440 MB model through protobuf costs seconds and a full copy per step (measured on
BERT-base here: SerializeToString 1-2 s, and the onnx checker on a proto serializes it again). So
every step that needs a ModelProto (checker, onnxruntime session, file write) works on a
*skeleton*: the model with each large initializer temporarily swapped for an external-data
reference, which serializes in milliseconds. The weights then travel separately:
- onnxruntime gets them as OrtValues over the same numpy buffers
  (`SessionOptions.add_external_initializers`);
- a file write streams them after the skeleton as raw bytes, appended as a second occurrence of
  ModelProto.graph holding only initializers. Protobuf merges repeated occurrences of an embedded
  message field, so every reader sees one graph; the file is a plain single-file ONNX model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

# Initializers smaller than this stay in the skeleton (shape constants and the like: the checker's
# shape inference and onnxruntime need their values).
EXTERNALIZE_MIN_BYTES = 1024
_PLACEHOLDER = "onnxopt.weights.placeholder"

# Protobuf wire-format tags (field number << 3 | wire type 2, length-delimited).
_TAG_MODEL_GRAPH = (7 << 3) | 2  # ModelProto.graph
_TAG_GRAPH_INITIALIZER = (5 << 3) | 2  # GraphProto.initializer
_TAG_TENSOR_RAW_DATA = (9 << 3) | 2  # TensorProto.raw_data


def _movable(tensor) -> bool:
    if tensor is None or tensor.dtype == ir.DataType.STRING or tensor.dtype.bitwidth % 8:
        return False
    # Tensors already in external data are always swapped: the skeleton never points at user files.
    return tensor.nbytes >= EXTERNALIZE_MIN_BYTES or isinstance(tensor, ir.ExternalTensor)


@contextlib.contextmanager
def stripped(model: ir.Model) -> Iterator[list[tuple[str, ir.TensorProtocol]]]:
    """Within the block, large main-graph initializers are external references to a placeholder.

    Yields [(name, tensor)] of the swapped-out weights; the model is restored on exit.
    """
    swapped = []
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if not _movable(tensor):
            continue
        swapped.append((value, tensor))
        value.const_value = ir.ExternalTensor(
            _PLACEHOLDER, offset=0, length=tensor.nbytes, dtype=tensor.dtype, shape=tensor.shape, name=name
        )
    try:
        yield [(value.name, tensor) for value, tensor in swapped]
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def skeleton(model: ir.Model) -> tuple[onnx.ModelProto, list[tuple[str, ir.TensorProtocol]]]:
    with stripped(model) as weights:
        return ir.serde.serialize_model(model), weights


def array(tensor) -> np.ndarray:
    """A C-contiguous numpy view (or, for protobuf-backed tensors, copy) of a tensor's data."""
    return np.ascontiguousarray(tensor.numpy())


def check(model: ir.Model, full_check: bool = True) -> None:
    """onnx.checker on the skeleton (the weights are checked by construction: dtype and shape)."""
    proto, _ = skeleton(model)
    with tempfile.TemporaryDirectory() as tmp:
        # The checker wants external data files to exist; it does not read them.
        Path(tmp, _PLACEHOLDER).touch()
        path = os.path.join(tmp, "skeleton.onnx")
        onnx.save(proto, path)
        onnx.checker.check_model(path, full_check=full_check)


def session(model: ir.Model, options, providers, edit=None):
    """An onnxruntime session whose large weights are handed over as OrtValues, not protobuf.
    `edit(proto)` may adjust the skeleton first (the verifier relaxes declared 0 dims)."""
    return session_from_parts(session_parts(model, edit), options, providers)


def session_parts(model: ir.Model, edit=None) -> tuple[bytes, list[str], list[np.ndarray]]:
    """What a session is made of: the serialized skeleton, and the names and arrays of the weights it
    uses (picklable, so a worker process or a Ray task makes the same session: session_from_parts)."""
    proto, weights = skeleton(model)
    if edit is not None:
        edit(proto)
    # onnxruntime drops unused initializers before it takes external ones: hand over used ones
    # only. "Used" is read from the serialized graph (subgraphs included), not from the IR's use
    # lists: a folded-away If or Loop can leave stale uses of a weight nothing reads any more.
    used = _names_used(proto.graph) | {o.name for o in proto.graph.output}
    weights = [(name, t) for name, t in weights if name in used]
    return proto.SerializeToString(), [name for name, _ in weights], [array(t) for _, t in weights]


def session_from_parts(parts: tuple[bytes, list[str], list[np.ndarray]], options, providers):
    import onnxruntime as ort

    skeleton_bytes, names, arrays = parts
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if names:
        options.add_external_initializers(names, values)
    sess = ort.InferenceSession(skeleton_bytes, options, providers=list(providers))
    sess._onnxopt_weights = values  # onnxruntime may use the buffers: keep them alive with it
    return sess


def _names_used(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of `graph` or of its subgraphs reads."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                used |= _names_used(sub)
                used.update(o.name for o in sub.output)
    return used


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def write(model: ir.Model, path: str | os.PathLike) -> None:
    """Write a single-file ONNX model, streaming large weights instead of serializing them."""
    proto, weights = skeleton(model)
    by_name = dict(weights)
    moved = [t for t in proto.graph.initializer if t.name in by_name]
    kept = [t for t in proto.graph.initializer if t.name not in by_name]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)

    entries = []
    for tp in moved:
        header = onnx.TensorProto()
        header.CopyFrom(tp)
        header.ClearField("external_data")
        header.ClearField("data_location")
        # A byte view works for every dtype (memoryview cannot cast ml_dtypes' bfloat16 etc.).
        data = memoryview(array(by_name[tp.name]).reshape(-1).view(np.uint8))
        head = header.SerializeToString() + bytes([_TAG_TENSOR_RAW_DATA]) + _varint(len(data))
        entries.append((head, data))
    graph_len = sum(1 + len(_varint(len(h) + len(d))) + len(h) + len(d) for h, d in entries)

    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        if entries:
            f.write(bytes([_TAG_MODEL_GRAPH]) + _varint(graph_len))
            for head, data in entries:
                f.write(bytes([_TAG_GRAPH_INITIALIZER]) + _varint(len(head) + len(data)))
                f.write(head)
                f.write(data)
