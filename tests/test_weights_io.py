"""The weight-streaming I/O paths: memory-mapped loading, streamed writing, models over 2 GB."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import load, wire

DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int32, np.int64, np.bool_,
          ml_dtypes.bfloat16]


def _identity_model(arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Each initializer feeds one Identity output, so every weight is visible in the outputs."""
    nodes, outputs, inits = [], [], []
    for name, arr in arrays.items():
        inits.append(numpy_helper.from_array(arr, name))
        nodes.append(helper.make_node("Identity", [name], [f"out_{name}"]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
    graph = helper.make_graph(nodes, "g", [], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _arrays(rng, big: bool) -> dict[str, np.ndarray]:
    n = 4096 if big else 8
    out = {}
    for dtype in DTYPES:
        name = f"w_{np.dtype(dtype).name}"
        if np.dtype(dtype) == np.bool_:
            out[name] = rng.integers(0, 2, n).astype(bool)
        elif np.issubdtype(np.dtype(dtype), np.integer):
            out[name] = rng.integers(-100 if np.dtype(dtype).kind == "i" else 0, 100, n).astype(dtype)
        else:
            out[name] = rng.standard_normal(n).astype(dtype)
    return out


@pytest.mark.parametrize("big", [False, True], ids=["inline", "streamed"])
def test_round_trip_every_dtype(tmp_path, big):
    arrays = _arrays(np.random.default_rng(0), big)
    src = tmp_path / "m.onnx"
    onnx.save(_identity_model(arrays), str(src))
    out = tmp_path / "out.onnx"
    # (verification off: onnxruntime cannot hand bfloat16 outputs to numpy)
    onnxopt.compile(src, opt_level=0, verify_outputs=False).save(out)
    onnx.checker.check_model(str(out), full_check=True)
    reread = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for name, arr in arrays.items():
        assert reread[name].dtype == arr.dtype and np.array_equal(reread[name], arr), name


def test_loader_maps_large_weights_and_keeps_small_ones_inline(tmp_path):
    arrays = {"big": np.arange(4096, dtype=np.float32), "small": np.arange(4, dtype=np.float32)}
    src = tmp_path / "m.onnx"
    onnx.save(_identity_model(arrays), str(src))
    proto = wire.load_mapped(src)
    by_name = {t.name: t for t in proto.graph.initializer}
    assert by_name["big"].data_location == TensorProto.EXTERNAL
    assert {e.key: e.value for e in by_name["big"].external_data}["location"] == "m.onnx"
    assert by_name["small"].data_location == TensorProto.DEFAULT
    model = load.load(src)
    assert isinstance(model.graph.initializers["big"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(model.graph.initializers["big"].const_value.numpy(), arrays["big"])


def test_truncated_inside_a_weight_is_refused(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_identity_model({"big": np.arange(4096, dtype=np.float32)}), str(src))
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(onnxopt.CompileError, match="truncated"):
        onnxopt.compile(src)


def test_model_over_2gb_with_external_data(tmp_path):
    """A 2.2 GB table in external data (a sparse file): loads without reading it, and the output
    gets external data too since protobuf cannot hold it."""
    rows = 2_200_000_000 // 4096
    (tmp_path / "big.data").open("wb").truncate(rows * 4096)
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, 1024],
                        data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "big.data"), ("offset", "0"), ("length", str(rows * 4096))):
        table.external_data.add(key=key, value=value)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["g"]), helper.make_node("Identity", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1024])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "big.onnx"))

    result = onnxopt.compile(tmp_path / "big.onnx", opt_level=1, verify_outputs=False)
    assert result.report["time_s"]["load"] < 1.0  # nothing of the 2.2 GB was read
    out = result.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").stat().st_size == rows * 4096
    assert out.stat().st_size < 10_000
    onnx.checker.check_model(str(out), full_check=True)
    assert result.report["ops_after"] == {"Gather": 1}


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_models_reached_through_links(tmp_path, link):
    arrays = {"big": np.arange(4096, dtype=np.float32)}
    real = tmp_path / "real" / "m.onnx"
    real.parent.mkdir()
    onnx.save(_identity_model(arrays), str(real))
    linked = tmp_path / "linked.onnx"
    if link == "symlink":
        linked.symlink_to(real)
    else:
        linked.hardlink_to(real)
    result = onnxopt.compile(linked, opt_level=1)
    assert result.report["verification"]["ok"]
    out = result.save(tmp_path / "out.onnx")
    got = numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0])
    np.testing.assert_array_equal(got, arrays["big"])
