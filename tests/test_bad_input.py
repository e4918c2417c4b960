"""Every bad input ends in one line on stderr, a non-zero exit, no output file, input untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import cli

OK_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 4] x) => (float[N, 4] y) {
    w = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
    t = Add(x, w)
    y = Relu(t)
}
"""


def _ok_model() -> onnx.ModelProto:
    return onnx.parser.parse_model(OK_MODEL)


def _write(path: Path, model: onnx.ModelProto) -> Path:
    onnx.save(model, str(path))
    return path


def _graph_model(nodes, inputs=("x",), outputs=("y",), initializers=(), opset=17):
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi(i) for i in inputs], [vi(o) for o in outputs], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _external_model(tmp: Path, location: str) -> Path:
    """A model whose weight lives in external data at `location` (written where it points, if inside tmp)."""
    w = numpy_helper.from_array(np.arange(2, dtype=np.float32), "w")
    model = _graph_model([helper.make_node("Add", ["x", "w"], ["y"])], initializers=[w])
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value="8")
    return _write(tmp / "ext.onnx", model)


def _case_missing(tmp):
    return tmp / "nope.onnx"


def _case_empty(tmp):
    (tmp / "empty.onnx").write_bytes(b"")
    return tmp / "empty.onnx"


def _case_not_protobuf(tmp):
    (tmp / "text.onnx").write_text("this is not a model\n" * 10)
    return tmp / "text.onnx"


def _case_truncated(tmp):
    data = _ok_model().SerializeToString()
    (tmp / "cut.onnx").write_bytes(data[: len(data) // 2])
    return tmp / "cut.onnx"


def _case_future_opset(tmp):
    model = _ok_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    return _write(tmp / "future.onnx", model)


def _case_cycle(tmp):
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Add", ["a", "x"], ["b"]),
             helper.make_node("Identity", ["a"], ["y"])]
    return _write(tmp / "cycle.onnx", _graph_model(nodes))


def _case_produced_twice(tmp):
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]
    return _write(tmp / "twice.onnx", _graph_model(nodes))


def _case_undefined_use(tmp):
    return _write(tmp / "undef.onnx", _graph_model([helper.make_node("Add", ["x", "ghost"], ["y"])]))


def _case_missing_external(tmp):
    return _external_model(tmp, "weights.bin")


def _case_absolute_external(tmp):
    (tmp / "weights.bin").write_bytes(np.arange(2, dtype=np.float32).tobytes())
    return _external_model(tmp, str((tmp / "weights.bin").resolve()))


def _case_escaping_external(tmp):
    sub = tmp / "models"
    sub.mkdir()
    (tmp / "secret.bin").write_bytes(np.arange(2, dtype=np.float32).tobytes())
    path = _external_model(tmp, "../secret.bin")
    return path.rename(sub / path.name)


def _case_short_external(tmp):
    (tmp / "weights.bin").write_bytes(b"\0" * 4)
    return _external_model(tmp, "weights.bin")


BAD_MODELS = {
    "missing": (_case_missing, "no such file"),
    "empty": (_case_empty, "empty"),
    "not-protobuf": (_case_not_protobuf, "not"),
    "truncated": (_case_truncated, "truncated"),
    "future-opset": (_case_future_opset, "newer than"),
    "not-a-dag": (_case_cycle, "not a DAG"),
    "produced-twice": (_case_produced_twice, "produced twice"),
    "undefined-use": (_case_undefined_use, "no node, input or initializer produces"),
    "missing-external-data": (_case_missing_external, "missing"),
    "absolute-external-data": (_case_absolute_external, "absolute"),
    "escaping-external-data": (_case_escaping_external, "escapes"),
    "short-external-data": (_case_short_external, "too short"),
}


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_one_line_error(capfd, code, expect_code, fragment):
    # capfd, not capsys: onnxruntime's native log would write to file descriptor 2 directly.
    err = capfd.readouterr().err
    assert code == expect_code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxopt: error: "), err
    assert "Traceback" not in err
    assert fragment.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_one_line_error(case, tmp_path, capfd):
    make, fragment = BAD_MODELS[case]
    path = make(tmp_path)
    before = _snapshot(tmp_path)
    out = tmp_path / "out.onnx"
    code = cli.main([str(path), "-O2", "-o", str(out)])
    _assert_one_line_error(capfd, code, 1, fragment)
    assert not out.exists()
    assert _snapshot(tmp_path) == before  # input untouched, nothing left behind


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["-O", "7"], 2, "invalid choice"),
        (["-O7"], 2, "invalid choice"),
        (["--target", "tpu"], 2, "invalid choice"),
        (["-o", "{tmp}/missing/dir/out.onnx"], 1, "does not exist"),
        (["-o", "{model}"], 1, "is the input model"),
        (["--input-shape", "x:1,a"], 1, "bad --input-shape"),
        (["--input-shape", "nope:1,4"], 1, "unknown input"),
        (["--disable", "no_such_pass"], 1, "unknown pass"),
        (["--opset", "13"], 1, "only upgrades"),
    ],
)
def test_bad_options(args, code, fragment, tmp_path, capfd):
    model = _write(tmp_path / "m.onnx", _ok_model())
    before = _snapshot(tmp_path)
    args = [a.format(tmp=tmp_path, model=model) for a in args]
    result = cli.main([str(model), *args])
    _assert_one_line_error(capfd, result, code, fragment)
    assert _snapshot(tmp_path) == before


def test_real_process_exit_codes(tmp_path):
    """The installed entry point itself: exit 2 on usage, 1 on a bad file, one stderr line each."""
    bad = tmp_path / "bad.onnx"
    bad.write_text("garbage")
    for args, code in (([str(bad), "-O", "9"], 2), ([str(bad)], 1)):
        proc = subprocess.run([sys.executable, "-m", "onnxopt", *args], capture_output=True, text=True)
        assert proc.returncode == code, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad.opt.onnx").exists()


def test_ok_model_compiles_and_prints_summary(tmp_path, capfd):
    model = _write(tmp_path / "m.onnx", _ok_model())
    assert cli.main([str(model), "-O1", "--report", str(tmp_path / "r.json")]) == 0
    out = capfd.readouterr().out
    assert "nodes" in out and "verified" in out
    assert (tmp_path / "m.opt.onnx").exists()
    onnx.checker.check_model(str(tmp_path / "m.opt.onnx"), full_check=True)
    assert (tmp_path / "r.json").exists()
