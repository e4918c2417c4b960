"""Emit and library API: atomic, deterministic, external data, inputs never modified."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import cli, emit
from oracle import run_ort


def _weighted_model(n: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Identity", ["a"], ["i"]), helper.make_node("Relu", ["i"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_compile_result_api(tmp_path):
    proto = _weighted_model()
    before = proto.SerializeToString()
    result = onnxopt.compile(proto, opt_level=2)
    assert proto.SerializeToString() == before  # the caller's model is untouched
    assert isinstance(result.model, onnx.ModelProto)
    assert result.model.producer_name == "onnxopt" and result.model.producer_version == onnxopt.__version__
    json.dumps(result.report)  # JSON-serializable
    assert result.report["verification"]["ok"]
    assert result.report["ops_after"].get("Identity", 0) == 0
    path = result.save(tmp_path / "out.onnx")
    onnx.checker.check_model(str(path), full_check=True)


def test_ir_model_input_is_not_modified():
    model = ir.serde.deserialize_model(_weighted_model())
    before = ir.serde.serialize_model(model).SerializeToString()
    onnxopt.compile(model, opt_level=1)
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_compile_error_carries_the_cli_message():
    with pytest.raises(onnxopt.CompileError, match="optimization level"):
        onnxopt.compile(_weighted_model(), opt_level=5)
    with pytest.raises(onnxopt.CompileError, match="unknown target"):
        onnxopt.compile(_weighted_model(), target="fpga")


def test_two_compiles_are_byte_identical(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_weighted_model(), str(src))
    for name in ("a.onnx", "b.onnx"):
        assert cli.main([str(src), "-O3", "-q", "-o", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_external_data_round_trip(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_weighted_model(), str(src), save_as_external_data=True, location="m.weights",
              size_threshold=0)
    out = tmp_path / "out.onnx"
    assert cli.main([str(src), "-O2", "-q", "--external-data", "-o", str(out)]) == 0
    assert (tmp_path / "out.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.weights", "out.onnx", "out.onnx.data"]
    x = {"x": np.ones((2, 64), np.float32)}
    ref = run_ort(onnx.load(str(src)), x)
    np.testing.assert_allclose(run_ort(onnx.load(str(out)), x)["y"], ref["y"], rtol=1e-5, atol=1e-5)


def test_large_models_get_external_data_automatically(tmp_path, monkeypatch):
    monkeypatch.setattr(emit, "EXTERNAL_DATA_THRESHOLD", 1000)
    result = onnxopt.compile(_weighted_model(), opt_level=1)
    result.save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert (tmp_path / "big.onnx").stat().st_size < 2000


def test_failed_emit_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_checker(model):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(emit, "_check", broken_checker)
    result = onnxopt.compile(_weighted_model(), opt_level=1)
    with pytest.raises(onnxopt.CompileError, match="fails the ONNX checker"):
        result.save(tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_dynamic_dims_and_input_shape_override():
    result = onnxopt.compile(_weighted_model(), opt_level=1, input_shapes={"x": (3, 64)})
    assert result.report["verification"]["input_shapes"] == {"x": [3, 64]}
    default = onnxopt.compile(_weighted_model(), opt_level=1)
    assert default.report["verification"]["input_shapes"] == {"x": [1, 64]}


def test_opset_upgrade_is_verified():
    result = onnxopt.compile(_weighted_model(), opt_level=1, opset=18)
    assert {o.domain: o.version for o in result.model.opset_import}[""] == 18
    assert result.report["verification"]["ok"]


def test_opset_upgrade_of_a_model_loaded_from_its_path(tmp_path):
    """Weights stay memory-mapped in the input file; the upgrade must keep them attached."""
    src = tmp_path / "m.onnx"
    onnx.save(_weighted_model(), str(src))
    result = onnxopt.compile(src, opt_level=1, opset=18)
    assert result.report["verification"]["ok"]
    result.save(tmp_path / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
