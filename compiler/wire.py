"""Read an .onnx file without pulling its weights through protobuf.

The file is memory-mapped and its wire format scanned (ModelProto.graph -> GraphProto.initializer
-> TensorProto.raw_data). Every large raw_data payload is dropped from the bytes handed to
protobuf and replaced by an external-data reference to the model file itself (location = the
file's name, offset and length of the payload), which the ONNX spec allows and onnx_ir resolves
by memory-mapping. So loading a 440 MB BERT parses ~1 MB of protobuf and copies no weight; pages
are read from the page cache only when a pass or onnxruntime touches them.

Only what protobuf would parse is rewritten; a malformed file raises ValueError (the loader turns
it into a one-line error).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx

MIN_EXTERNAL_BYTES = 1024

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _fields(buf, pos: int, end: int):
    """Yield (field number, wire type, field start, payload start, field end)."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _read_varint(buf, pos, end)
            payload = pos
        elif wire == _I64:
            payload, pos = pos, pos + 8
        elif wire == _I32:
            payload, pos = pos, pos + 4
        elif wire == _LEN:
            length, payload = _read_varint(buf, pos, end)
            pos = payload + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end or number == 0:
            raise ValueError("truncated or corrupt message")
        yield number, wire, start, payload, pos


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | _LEN) + _varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    # StringStringEntryProto: key = 1, value = 2
    return _len_field(_TENSOR_EXTERNAL_DATA, _len_field(1, key.encode()) + _len_field(2, value.encode()))


def _tensor(buf, start: int, end: int, location: str) -> bytes:
    fields = list(_fields(buf, start, end))
    if any(n in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION) for n, *_ in fields):
        return bytes(buf[start:end])
    raw = [f for f in fields if f[0] == _TENSOR_RAW_DATA and f[1] == _LEN]
    if len(raw) != 1 or raw[0][4] - raw[0][3] < MIN_EXTERNAL_BYTES:
        return bytes(buf[start:end])
    _, _, raw_start, payload, raw_end = raw[0]
    out = bytearray(buf[start:raw_start])
    out += buf[raw_end:end]
    out += _entry("location", location) + _entry("offset", str(payload)) + _entry("length", str(raw_end - payload))
    out += _varint((_TENSOR_DATA_LOCATION << 3) | _VARINT) + _varint(onnx.TensorProto.EXTERNAL)
    return bytes(out)


def _graph(buf, start: int, end: int, location: str) -> bytes:
    out = bytearray()
    for number, wire, field_start, payload, field_end in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire == _LEN:
            out += _len_field(_GRAPH_INITIALIZER, _tensor(buf, payload, field_end, location))
        else:
            out += buf[field_start:field_end]
    return bytes(out)


def load_mapped(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at `path` with its large inline weights as external references to `path` itself."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            out = bytearray()
            for number, wire, field_start, payload, field_end in _fields(buf, 0, len(buf)):
                if number == _MODEL_GRAPH and wire == _LEN:
                    out += _len_field(_MODEL_GRAPH, _graph(buf, payload, field_end, path.name))
                else:
                    out += buf[field_start:field_end]
        finally:
            buf.release()
    proto = onnx.ModelProto()
    proto.ParseFromString(bytes(out))
    return proto
