"""The user's files: nothing onnxopt reads is ever overwritten, nothing outside the model's folder is
read, nothing is left behind on failure, and every failure is one line (issue 10, case by case)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import cli
from test_bad_input import OK_MODEL, _snapshot

def _ok(tmp: Path, name: str = "m.onnx") -> Path:
    path = tmp / name
    onnx.save(onnx.parser.parse_model(OK_MODEL), str(path))
    return path


def _external(tmp: Path, name: str = "net.onnx", location: str = "w.bin") -> Path:
    """A model whose one weight is external data at `location` beside it."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [vi("x")], [vi("y")], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp / name), save_as_external_data=True, location=location, size_threshold=0)
    return tmp / name


def _calibration(tmp: Path) -> Path:
    path = tmp / "cal.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((8, 1, 4)).astype(np.float32))
    return path


def _refused(capsys, argv: list[str], fragment: str, folder: Path) -> None:
    """exit 1, one `onnxopt: error:` line naming the problem, and no file in `folder` changed."""
    before = _snapshot(folder)
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("onnxopt: error: "), err
    assert fragment in lines[0], lines[0]
    assert _snapshot(folder) == before


# -- 1, 2: every write differs from every read, by path and by inode -------------------------------

OVERLAPS = {
    "report onto the input": (lambda t: [str(_ok(t)), "-O3", "--report", str(t / "m.onnx"), "-o", str(t / "out.onnx")],
                              "is the input model"),
    "report onto the output": (lambda t: [str(_ok(t)), "-o", str(t / "out.onnx"), "--report", str(t / "out.onnx")],
                               "are the same file"),
    "output onto the external data": (lambda t: [str(_external(t)), "-o", str(t / "w.bin")],
                                      "is the input model's external data"),
    "external data onto the input's": (lambda t: [str(_external(t, location="out.onnx.data")), "--external-data",
                                                  "-o", str(t / "out.onnx")], "is the input model's external data"),
    "model.data as input": (lambda t: [str(_ok(t, "net.onnx.data")), "-O3", "-o", str(t / "net.onnx"),
                                       "--external-data"], "is the input model"),
    "output onto the calibration data": (lambda t: [str(_ok(t)), "--int8", "--calibration-data", str(_calibration(t)),
                                                    "-o", str(t / "cal.npz")], "is the calibration data"),
    "report onto the calibration data": (lambda t: [str(_ok(t)), "--int8", "--calibration-data", str(_calibration(t)),
                                                    "--report", str(t / "cal.npz")], "is the calibration data"),
}


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_no_write_onto_a_read(case, tmp_path, capsys):
    make, fragment = OVERLAPS[case]
    _refused(capsys, make(tmp_path), fragment, tmp_path)


def test_links_to_inputs_are_refused(tmp_path, capsys):
    model = _ok(tmp_path)
    os.link(model, tmp_path / "hard.onnx")
    (tmp_path / "soft.onnx").symlink_to(model)
    for out in ("hard.onnx", "soft.onnx"):
        _refused(capsys, [str(model), "-o", str(tmp_path / out)], "is the input model", tmp_path)
        _refused(capsys, [str(model), "--report", str(tmp_path / out)], "is the input model", tmp_path)


def test_library_save_refuses_what_the_compile_read(tmp_path):
    src = _external(tmp_path)
    result = onnxopt.compile(str(src))
    before = _snapshot(tmp_path)
    for target in (src, tmp_path / "w.bin"):
        with pytest.raises(onnxopt.CompileError, match="refusing to overwrite"):
            result.save(target)
    assert _snapshot(tmp_path) == before
    cal = _calibration(tmp_path)
    result = onnxopt.compile(str(_ok(tmp_path)), int8=True, calibration_data=str(cal), calibration_samples=8)
    with pytest.raises(onnxopt.CompileError, match="calibration data"):
        result.save(cal)


# -- 3: external data of every input form stays inside the model's folder ---------------------------

def _ir_with_external(tmp: Path, location: str, base_dir: str) -> ir.Model:
    model = ir.load(str(_external(tmp)))
    model.graph.initializers["w"].const_value = ir.ExternalTensor(
        location, 0, 16, ir.DataType.FLOAT, shape=ir.Shape([4]), name="w", base_dir=base_dir)
    return model


@pytest.mark.parametrize("location, base, fragment", [
    ("/etc/passwd", "{tmp}", "absolute"),
    ("../../../../etc/passwd", "{tmp}", "escapes"),
    ("passwd", "/etc", "escapes"),  # built in memory: the tensor claims a folder of its own
])
def test_in_memory_ir_model_cannot_read_outside_base_dir(tmp_path, location, base, fragment):
    model = _ir_with_external(tmp_path, location, base.format(tmp=tmp_path))
    with pytest.raises(onnxopt.CompileError, match=fragment):
        onnxopt.compile(model, base_dir=tmp_path)


def test_in_memory_external_data_needs_base_dir(tmp_path):
    model = ir.load(str(_external(tmp_path)))
    with pytest.raises(onnxopt.CompileError, match="base_dir="):
        onnxopt.compile(model)
    result = onnxopt.compile(model, base_dir=tmp_path)
    assert result.report["verification"]["ok"]
    proto = onnx.load(str(_external(tmp_path)), load_external_data=False)
    with pytest.raises(onnxopt.CompileError, match="without a folder"):
        onnxopt.compile(proto)
    assert onnxopt.compile(proto, base_dir=tmp_path).report["verification"]["ok"]


def test_sparse_initializer_external_data_is_confined(tmp_path):
    values = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "sp")
    values.ClearField("raw_data")
    values.data_location = TensorProto.EXTERNAL
    values.external_data.add(key="location", value="../../etc/passwd")
    values.external_data.add(key="length", value="8")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 3], np.int64), "i"), [4])
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Add", ["x", "sp"], ["y"])], "g", [vi("x")], [vi("y")],
                              sparse_initializer=[sparse])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "s.onnx"))
    with pytest.raises(onnxopt.CompileError, match="escapes"):
        onnxopt.compile(str(tmp_path / "s.onnx"))


# -- 4: outputs validated before any write; model and report both or neither ------------------------

def test_bad_report_folder_writes_nothing(tmp_path, capsys):
    model = _ok(tmp_path)
    _refused(capsys, [str(model), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "no" / "r.json")],
             "does not exist", tmp_path)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folders_write_nothing(tmp_path, capsys):
    model = _ok(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(capsys, [str(model), "-o", str(ro / "out.onnx")], "not writable", tmp_path)
        _refused(capsys, [str(model), "-o", str(tmp_path / "out.onnx"), "--report", str(ro / "r.json")],
                 "not writable", tmp_path)
    finally:
        ro.chmod(0o755)


def test_unwritable_output_is_one_clean_line(tmp_path, capsys, monkeypatch):
    """What a read-only file system says (root can write into a chmod 555 folder, so simulated)."""
    from onnxopt import files

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(files.tempfile, "mkdtemp", refuse)
    _refused(capsys, [str(_ok(tmp_path)), "-o", str(tmp_path / "out.onnx")], "Read-only file system", tmp_path)


def test_pair_is_written_both_or_neither(tmp_path, monkeypatch):
    """A failure between the model's rename and the report's puts the old model back."""
    from onnxopt import files

    model = _ok(tmp_path)
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    out.write_bytes(b"previous model")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == rep:
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    code = cli.main([str(model), "-o", str(out), "--report", str(rep)])
    assert code == 1
    assert out.read_bytes() == b"previous model" and not rep.exists()
    assert not list(tmp_path.glob(".onnxopt-*"))


# -- 5: SIGTERM mid-save leaves nothing -------------------------------------------------------------

def test_sigterm_during_save_leaves_nothing(tmp_path):
    """A 256 MiB model: SIGTERM once its staged file appears; no staging folder or output remains."""
    big = numpy_helper.from_array(np.zeros((64, 1024, 1024), np.float32), "w")
    vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    graph = helper.make_graph([helper.make_node("Shape", ["w"], ["s"]), helper.make_node("Add", ["x", "x"], ["y"])],
                              "g", [vi("x", [1])], [vi("y", [1]), helper.make_tensor_value_info("s", TensorProto.INT64, [3])],
                              [big])
    src = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "out" / "big.opt.onnx"
    out.parent.mkdir()
    # The signal must land during the save: a save that wins the race is retried (at most 5 times), and a
    # test that never interrupts a save fails rather than passing on nothing.
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "onnxopt", str(src), "-O0", "--no-verify", "-o", str(out)],
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out.parent.glob(".onnxopt-*/*")):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
        out.unlink()
    assert proc.returncode != 0, "SIGTERM never arrived during a save in 5 tries"
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["onnxopt: error: terminated (SIGTERM); nothing was written"], err
    assert list(out.parent.iterdir()) == []
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


# -- 6: wrong values are CompileError, never another exception --------------------------------------

@pytest.mark.parametrize("options, fragment", [
    ({"opset": "17"}, "opset"),
    ({"tolerance": "big"}, "tolerance"),
    ({"int8_min_cosine": "x"}, "int8_min_cosine"),
    ({"input_shapes": {"x": ("a", 32)}}, "input_shapes"),
    ({"input_shapes": {"x": (1, -5)}}, "input_shapes"),
    ({"enable": "gelu"}, "enable"),
    ({"fp16": "yes"}, "fp16"),
    ({"calibration_samples": 0}, "calibration_samples"),
    ({"opt_level": "3"}, "optimization level"),
])
def test_wrongly_typed_options(tmp_path, options, fragment):
    with pytest.raises(onnxopt.CompileError, match=fragment):
        onnxopt.compile(str(_ok(tmp_path)), **options)


@pytest.mark.parametrize("offset", ["-8", "abc"])
def test_bad_external_offsets(tmp_path, capsys, offset):
    src = _external(tmp_path)
    proto = onnx.load(str(src), load_external_data=False)
    tensor = proto.graph.initializer[0]
    entries = {e.key: e for e in tensor.external_data}
    (entries.get("offset") or tensor.external_data.add(key="offset")).value = offset
    onnx.save(proto, str(src))
    _refused(capsys, [str(src), "-o", str(tmp_path / "out.onnx")], "offset", tmp_path)


# -- 7: valid models that were refused --------------------------------------------------------------

def test_input_that_is_also_an_output(tmp_path):
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi("x")], [vi("y"), vi("x")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "io.onnx"))
    for level in range(4):
        result = onnxopt.compile(str(tmp_path / "io.onnx"), opt_level=level)
        assert [v.name for v in result.ir_model.graph.outputs] == ["y", "x"]
        assert [v.name for v in result.ir_model.graph.inputs] == ["x"]
        result.save(tmp_path / f"io.O{level}.onnx")
        onnx.checker.check_model(str(tmp_path / f"io.O{level}.onnx"), full_check=True)


@pytest.mark.parametrize("through", ["direct", "identity"])
def test_string_constant_output(tmp_path, through):
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("Constant", [], ["s" if through == "direct" else "c"], value_strings=["a", "bc"])]
    if through == "identity":
        nodes.append(helper.make_node("Identity", ["c"], ["s"]))
    graph = helper.make_graph(nodes, "g", [vi("x")], [vi("y"), helper.make_tensor_value_info("s", TensorProto.STRING, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "s.onnx"))
    for level in range(4):
        out = onnxopt.compile(str(tmp_path / "s.onnx"), opt_level=level).save(tmp_path / f"s.O{level}.onnx")
        onnx.checker.check_model(str(out), full_check=True)


# -- 8: a corrupt initializer is refused at load -----------------------------------------------------

@pytest.mark.parametrize("n_bytes", [8192, 512])
def test_initializer_size_mismatch(tmp_path, capsys, n_bytes):
    w = numpy_helper.from_array(np.zeros(n_bytes // 4, np.float32), "w")
    del w.dims[:]
    w.dims.append(256)
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [256])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [vi("x")], [vi("y")], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "c.onnx"))
    _refused(capsys, [str(tmp_path / "c.onnx"), "-o", str(tmp_path / "out.onnx")],
             f"(1024 bytes) but holds {n_bytes} bytes", tmp_path)


def test_typed_field_count_mismatch(tmp_path, capsys):
    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], float_data=[1.0, 2.0, 3.0])  # 3 for 4
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [vi("x")], [vi("y")], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "c.onnx"))
    _refused(capsys, [str(tmp_path / "c.onnx")], "holds 3", tmp_path)


# -- 9: nothing on stderr but onnxopt's own line -----------------------------------------------------

def test_sparse_initializer_compiles_quietly(tmp_path, capfd):
    values = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "sp")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 3], np.int64), "i"), [4])
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Add", ["x", "sp"], ["y"])], "g", [vi("x")], [vi("y")],
                              sparse_initializer=[sparse])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "s.onnx"))
    result = onnxopt.compile(str(tmp_path / "s.onnx"), opt_level=3)
    w = result.ir_model.graph.initializers["sp"].const_value.numpy()
    np.testing.assert_array_equal(w, [1.0, 0.0, 0.0, 2.0])
    assert capfd.readouterr().err == ""


def test_skipped_deduplication_is_not_printed(tmp_path):
    ones = lambda n: numpy_helper.from_array(np.ones(4, np.float32), n)  # noqa: E731
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Add", ["x", "a"], ["y"]), helper.make_node("Add", ["x", "b"], ["z"])],
                              "g", [vi("x"), vi("b")], [vi("y"), vi("z")], [ones("a"), ones("b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "d.onnx"))
    proc = subprocess.run([sys.executable, "-m", "onnxopt", str(tmp_path / "d.onnx"), "-O3", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_bench_and_compare_never_overwrite_their_inputs(tmp_path, capsys):
    model = _ok(tmp_path)
    for argv, fragment in ((["bench", str(model), "-o", str(model)], "is the input model"),
                           (["bench", str(model), "--markdown", str(model)], "is the input model"),
                           (["compare", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.json")], "is the report"),
                           (["compare", str(tmp_path / "r.json"), "--html", str(tmp_path / "o"),
                             "--markdown", str(tmp_path / "o")], "are the same file")):
        (tmp_path / "r.json").write_text("{}")
        before = _snapshot(tmp_path)
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert _snapshot(tmp_path) == before


def test_html_report_is_self_contained_and_written_with_the_model(tmp_path, capsys):
    model = _ok(tmp_path)
    out, page = tmp_path / "out.onnx", tmp_path / "r.html"
    assert cli.main([str(model), "-O3", "-o", str(out), "--report-html", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "lift_constants" in text and "<script" not in text
    assert "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    _refused(capsys, [str(model), "--report-html", str(model)], "is the input model", tmp_path)
