"""Fuzzing the library's promise: whatever the model, `onnxopt.compile` raises only CompileError,
never an internal error, and no file but the output changes.

Two sources: small random valid graphs (random elementwise/shape/matmul chains with random
constants, every level), and mutated protobuf bytes of valid models (flipped, dropped, inserted
and truncated bytes), given as paths. Under CI the examples are derandomized (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxopt

UNARY = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Identity", "Dropout", "Softmax", "Sqrt", "Exp"]
BINARY = ["Add", "Sub", "Mul", "Div", "Max", "Min"]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@st.composite
def graphs(draw) -> onnx.ModelProto:
    """A valid chain over x: [2, 4] with random ops, constants, an optional Reshape/Transpose/MatMul."""
    opset = draw(st.sampled_from([13, 14, 17, 18]))
    nodes, inits, cur, width = [], [], "x", 4
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["unary", "binary", "const", "matmul", "reshape", "transpose", "dup"]))
        out = f"t{i}"
        if kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(UNARY)), [cur], [out]))
        elif kind == "binary":
            nodes.append(helper.make_node(draw(st.sampled_from(BINARY)), [cur, cur], [out]))
        elif kind == "const":
            value = draw(st.floats(-3, 3, allow_nan=False, width=32))
            inits.append(numpy_helper.from_array(np.full([width], value, np.float32), f"c{i}"))
            nodes.append(helper.make_node(draw(st.sampled_from(BINARY)), [cur, f"c{i}"], [out]))
        elif kind == "matmul":
            new = draw(st.sampled_from([2, 4, 8]))
            w = np.random.default_rng(i).standard_normal((width, new)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [out]))
            width = new
        elif kind == "reshape":
            inits.append(numpy_helper.from_array(np.array([2, width], np.int64), f"s{i}"))
            nodes.append(helper.make_node("Reshape", [cur, f"s{i}"], [out]))
        elif kind == "transpose":
            nodes.append(helper.make_node("Transpose", [cur], [f"{out}a"], perm=[1, 0]))
            nodes.append(helper.make_node("Transpose", [f"{out}a"], [out], perm=[1, 0]))
        else:  # the same subexpression twice, summed: CSE and dedup material
            nodes.append(helper.make_node("Relu", [cur], [f"{out}a"]))
            nodes.append(helper.make_node("Relu", [cur], [f"{out}b"]))
            nodes.append(helper.make_node("Add", [f"{out}a", f"{out}b"], [out]))
        cur = out
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@FUZZ
@given(model=graphs(), level=st.integers(0, 3))
def test_random_graphs_compile_or_refuse_cleanly(tmp_path, model, level):
    try:
        result = onnxopt.compile(model, opt_level=level)
    except onnxopt.CompileError as exc:
        assert not str(exc).startswith("internal error"), exc
        return
    out = result.save(tmp_path / "out.onnx")
    onnx.checker.check_model(str(out), full_check=True)


SEEDS = [
    """<ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 4] y) {
        w = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
        t = Add(x, w)
        y = Relu(t)
    }""",
    """<ir_version: 7, opset_import: ["" : 13]>
    agraph (float[2, 3] x, int64[2] s) => (float[3, 2] y, float[2, 3] z) {
        a = Transpose <perm = [1, 0]> (x)
        y = Reshape(a, s)
        z = Sigmoid(x)
    }""",
]


def _seed_bytes(i: int) -> bytes:
    model = onnx.parser.parse_model(SEEDS[i])
    if i == 0:  # an initializer big enough to be mapped from the file (compiler/wire.py)
        w = numpy_helper.from_array(np.linspace(-1, 1, 512, dtype=np.float32).reshape(128, 4), "big")
        model.graph.initializer.append(w)
    return model.SerializeToString()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(_seed_bytes(draw(st.integers(0, len(SEEDS) - 1))))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "drop", "insert", "truncate", "byte"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "drop":
            del data[pos: pos + draw(st.integers(1, 8))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del data[max(pos, 1):]
        else:
            data[pos] = draw(st.integers(0, 255))
        if not data:
            data = bytearray(b"\x08")
    return bytes(data)


@FUZZ
@given(data=mutated(), level=st.sampled_from([0, 2, 3]))
def test_mutated_bytes_compile_or_refuse_cleanly(tmp_path_factory, data, level):
    folder = tmp_path_factory.mktemp("in")
    src = folder / "m.onnx"
    src.write_bytes(data)
    before = _digest(folder)
    out_dir = tmp_path_factory.mktemp("out")
    try:
        onnxopt.compile(str(src), opt_level=level).save(out_dir / "out.onnx")
    except onnxopt.CompileError as exc:
        assert not str(exc).startswith("internal error"), exc
        assert list(out_dir.iterdir()) == []
    assert _digest(folder) == before  # the input folder is never written
