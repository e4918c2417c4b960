"""Verification samples a real model runs on (issue 11): dynamic dims, the size ladder, limits,
the user's own sample, non-deterministic originals, NaN/inf and string outputs, the noise floor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt import cli, load, verify

_rng = np.random.default_rng(0)


def _floats(n: int, scale: float = 0.1) -> str:
    return ", ".join(f"{v:.4f}" for v in _rng.standard_normal(n) * scale)


def _parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


# A feature pyramid as detection backbones export it: five stride-2 convolutions, two top-down
# levels that add an upsampled map to the map of the next stride. At 16x16 the maps are 2, 1, 1
# and the top-down Add fails (4 vs 2); at a multiple of 32 (224) every level matches.
FPN = """<ir_version: 8, opset_import: ["" : 17]>
fpn (float[N, 3, H, W] x) => (float[N, 8, P, Q] y) {
    w1 = Constant <value = float[8, 3, 3, 3] {%s}> ()
    w2 = Constant <value = float[8, 8, 3, 3] {%s}> ()
    sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
    c1 = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (x, w1)
    c2 = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (c1, w2)
    c3 = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (c2, w2)
    c4 = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (c3, w2)
    c5 = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (c4, w2)
    u5 = Resize <mode = "nearest"> (c5, , sc)
    p4 = Add(u5, c4)
    u4 = Resize <mode = "nearest"> (p4, , sc)
    p3 = Add(u4, c3)
    i = Identity(p3)
    y = Relu(i)
}
"""

# STFT-style framing of audio: reflect padding by 64 samples (needs more than 64), then frames
# of 128 with hop 32 as a strided Conv1d.
AUDIO = """<ir_version: 8, opset_import: ["" : 17]>
stft (float[B, T] audio) => (float[B, 4, F] y) {
    ax = Constant <value = int64[1] {1}> ()
    pads = Constant <value = int64[6] {0, 0, 64, 0, 0, 64}> ()
    w = Constant <value = float[4, 1, 128] {%s}> ()
    a = Unsqueeze(audio, ax)
    p = Pad <mode = "reflect"> (a, pads)
    f = Conv <strides = [32]> (p, w)
    y = Identity(f)
}
"""


def _fpn():
    return _parse(FPN % (_floats(8 * 27), _floats(8 * 72)))


def test_fpn_with_dynamic_hw_runs_on_a_multiple_of_32():
    # The graph's hint: five stride-2 convolutions, factor 32, so 64 (deepest map 2x2) comes first.
    result = onnxopt.compile(_fpn(), opt_level=3)
    ver = result.report["verification"]
    assert ver["ok"] and ver["input_shapes"] == {"x": [1, 3, 64, 64]}
    assert ver["shapes_tried"] == [{"x": [1, 3, 16, 16]}]
    assert verify.ladder(load.load(_fpn()))["image"] == (64, 224, 320, 640)


def test_reflect_pad_audio_runs_on_a_longer_signal():
    result = onnxopt.compile(_parse(AUDIO % _floats(4 * 128)), opt_level=2)
    ver = result.report["verification"]
    assert ver["ok"] and ver["input_shapes"]["audio"] == [1, 128]
    # A pad longer than any fixed rung: the graph's hint (the next power of two) runs.
    wide = _parse((AUDIO % _floats(4 * 128)).replace("64, 0, 0, 64", "20000, 0, 0, 20000"))
    ver = onnxopt.compile(wide, opt_level=2).report["verification"]
    assert ver["ok"] and ver["input_shapes"]["audio"] == [1, 32768]


def test_ladder_exhausted_names_input_shapes_tried_and_the_options(capfd, tmp_path):
    """capfd, not capsys: onnxruntime's native log writes to file descriptor 2 directly."""
    # Frames of 16001 samples: no rung of the ladder is a multiple.
    model = _parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[B, T] audio) => (float[B, F, 16001] y) {
    s = Constant <value = int64[3] {1, -1, 16001}> ()
    y = Reshape(audio, s)
}""")
    onnx.save(model, tmp_path / "m.onnx")
    assert cli.main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("onnxopt: error: onnxruntime cannot run the model on synthesized inputs: ")
    assert "audio: 1x16, 1x128, 1x512, 1x16000" in line
    assert "--input-shape audio:" in line and "--input-data FILE.npz" in line
    assert not (tmp_path / "o.onnx").exists()


MINUS_ONE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[-1, 3, H, 0] x) => (float[-1, 3, H, 0] y) {
    i = Identity(x)
    y = Relu(i)
}
"""


def test_declared_minus_one_and_zero_dims_are_dynamic():
    model = load.load(_parse(MINUS_ONE))
    assert verify.input_shapes(model) == {"x": (1, 3, 16, 16)}
    result = onnxopt.compile(_parse(MINUS_ONE), opt_level=1)
    assert result.report["verification"]["input_shapes"] == {"x": [1, 3, 16, 16]}


def test_input_shape_for_a_minus_one_batch(tmp_path, capsys):
    onnx.save(_parse(MINUS_ONE), tmp_path / "m.onnx")
    code = cli.main([str(tmp_path / "m.onnx"), "-O1", "--input-shape", "x:1,3,48,192", "-q",
                     "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    import json
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["input_shapes"] == {"x": [1, 3, 48, 192]}


@pytest.mark.parametrize("args, fragment", [
    (["--input-shape", "x:1099511627776,32"], "over the 2 GiB limit"),
    (["--input-shape", "x:-1,32"], "positive integers"),
])
def test_huge_or_negative_input_shape_is_one_line(args, fragment, tmp_path, capsys):
    model = _parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N, M] x) => (float[N, M] y) { y = Relu(x) }""")
    onnx.save(model, tmp_path / "m.onnx")
    assert cli.main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxopt: error: ") and fragment in err[0], err
    assert "--input-shape" in err[0] and not (tmp_path / "o.onnx").exists()


def test_declared_huge_dims_are_refused_not_memory_error():
    model = _parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1099511627776, 1099511627776] x) => (float[1099511627776, 1099511627776] y) { y = Relu(x) }""")
    with pytest.raises(onnxopt.CompileError, match="over the 2 GiB limit.*--input-data"):
        onnxopt.compile(model)


SHAPE_INPUT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, int64[2] s) => (float[A, B] y) {
    r = Reshape(x, s)
    y = Relu(r)
}
"""


def test_shape_tensor_input_asks_for_real_inputs():
    with pytest.raises(onnxopt.CompileError, match=r"input 's' is Reshape's shape.*--input-data FILE.npz"):
        onnxopt.compile(_parse(SHAPE_INPUT))


def test_input_data_verifies_on_the_users_sample(tmp_path, capsys):
    x = np.arange(24, dtype=np.float32).reshape(6, 4) - 10
    np.savez(tmp_path / "in.npz", x=x, s=np.array([3, 8], np.int64))
    result = onnxopt.compile(_parse(SHAPE_INPUT), opt_level=2, input_data=str(tmp_path / "in.npz"))
    ver = result.report["verification"]
    assert ver["ok"] and ver["input_source"] == "input_data" and ver["input_shapes"] == {"x": [6, 4], "s": [2]}
    assert result.report["options"]["input_data"] == str(tmp_path / "in.npz")
    # The CLI option, and a feed dict missing an input.
    onnx.save(_parse(SHAPE_INPUT), tmp_path / "m.onnx")
    assert cli.main([str(tmp_path / "m.onnx"), "--input-data", str(tmp_path / "in.npz"), "-q"]) == 0
    with pytest.raises(onnxopt.CompileError, match="has no array for input 's'"):
        onnxopt.compile(_parse(SHAPE_INPUT), input_data={"x": x})


def test_nan_at_the_same_positions_matches():
    # Sqrt of standard-normal samples is NaN for about half of them, in both models.
    model = _parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 8] y, float[N, 8] z) {
    i = Identity(x)
    y = Sqrt(i)
    one = Constant <value = float {1.0}> ()
    zero = Constant <value = float {0.0}> ()
    d = Mul(x, zero)
    z = Div(one, d)
}""")
    result = onnxopt.compile(model, opt_level=1)
    assert result.report["verification"]["ok"]
    ref = verify.compare({"y": np.array([np.nan, 1.0, np.inf], np.float32)},
                         {"y": np.array([np.nan, 1.0, -np.inf], np.float32)}, 1e-4)
    assert not ref[0].ok  # inf of the other sign is a difference


def test_string_inputs_are_synthesized():
    model = _parse("""<ir_version: 9, opset_import: ["" : 19]>
g (string[N, L] x) => (bool[N, L] y, string[N, L] z) {
    w = Constant <value = string[1] {"w3"}> ()
    i = Identity(x)
    y = Equal(i, w)
    z = Identity(x)
}""")
    result = onnxopt.compile(model, opt_level=1)
    ver = result.report["verification"]
    assert ver["ok"] and ver["input_shapes"] == {"x": [1, 16]}
    assert result.report["ops_after"] == {"Equal": 1, "Identity": 1}
    feeds = verify.synthesize_feeds(load.load(model))
    assert feeds["x"].dtype == object and len(set(feeds["x"].ravel().tolist())) > 1


def _training_dropout_export(tmp_path):
    """A module exported in training mode, as torch.onnx does when asked for TrainingMode.TRAINING."""
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.ReLU())
    path = tmp_path / "train.onnx"
    torch.onnx.export(net, (torch.randn(2, 8),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17,
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False, dynamo=False)
    return path


def test_training_mode_dropout_is_explained_and_removed_on_request(tmp_path, capsys):
    path = _training_dropout_export(tmp_path)
    assert cli.main([str(path), "-o", str(tmp_path / "o.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "not deterministic" in err[0] and "Dropout" in err[0] and "training_mode" in err[0]
    assert "model.eval()" in err[0] and "--inference-dropout" in err[0]
    assert not (tmp_path / "o.onnx").exists()

    result = onnxopt.compile(str(path), opt_level=1, inference_dropout=True)
    assert result.report["verification"]["ok"]
    assert result.report["options"]["inference_dropout"] is True
    assert len(result.report["inference_dropout"]["changed"]) == 1
    assert "Dropout" not in result.report["ops_after"]  # inference Dropout is then removed at -O1


def test_weight_left_by_a_folded_if_is_not_handed_to_onnxruntime():
    """Folding If(true) leaves the else branch's weight with a stale use; onnxruntime drops it as
    unused, and handing it over anyway failed ("Failed to find existing initializer")."""
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(np.full((64, 8), 0.5, np.float32), "w1")
    w2 = numpy_helper.from_array(np.full((64, 8), -0.5, np.float32), "w2")
    out = lambda n: [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)]  # noqa: E731
    then_g = helper.make_graph([helper.make_node("Add", ["x", "w1"], ["t"])], "then", [], out("t"))
    else_g = helper.make_graph([helper.make_node("Add", ["x", "w2"], ["e"])], "else", [], out("e"))
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 8])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = onnxopt.compile(model, opt_level=1)
    assert result.report["ops_after"] == {"Add": 1} and result.report["verification"]["ok"]
    assert list(result.ir_model.graph.initializers) == ["w1"]  # the dead branch's weight is gone


def _cancelling_conv_bn(big: float = 3e4) -> onnx.ModelProto:
    """Conv with bias `big` and a BatchNorm subtracting the same mean: the unfused original rounds
    at `big`'s ulp and then cancels, so any Conv+BN folding (onnxruntime's own, or onnxopt's)
    differs from it by ~1.6e-4 relative, more than the default tolerance."""
    weights = ", ".join(f"{v:.4f}" for v in np.random.default_rng(1).standard_normal(144) * 0.3)
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, H, W] x) => (float[N, 4, H, W] y) {{
    w = Constant <value = float[4, 4, 3, 3] {{{weights}}}> ()
    b = Constant <value = float[4] {{{big}, {big}, {big}, {big}}}> ()
    s = Constant <value = float[4] {{1.0, 1.0, 1.0, 1.0}}> ()
    z = Constant <value = float[4] {{0.0, 0.0, 0.0, 0.0}}> ()
    m = Constant <value = float[4] {{{big}, {big}, {big}, {big}}}> ()
    v = Constant <value = float[4] {{1.0, 1.0, 1.0, 1.0}}> ()
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = BatchNormalization <epsilon = 0.0> (c, s, z, m, v)
}}"""
    return _parse(text)


def test_error_within_the_originals_own_rounding_noise_passes():
    result = onnxopt.compile(_cancelling_conv_bn(), opt_level=2)
    ver = result.report["verification"]
    out = ver["outputs"][0]
    assert ver["ok"] and out["rel"] > verify.DEFAULT_TOLERANCE
    floor = ver["noise_floor"]["y"]
    assert floor > verify.DEFAULT_TOLERANCE and out["rel"] <= verify.NOISE_MULTIPLE * floor
    assert "rounding noise" in out["note"] and "margin" in out["note"]


def test_error_beyond_the_noise_floor_fails_and_suggests_a_tolerance(monkeypatch):
    monkeypatch.setattr(verify, "noise_floor", lambda *a: {"y": 1e-6})  # an original that is exact
    with pytest.raises(onnxopt.CompileError, match=r"relative error 0\.000\d+ > tolerance 0\.0001 \(the "
                       r"original's own rounding noise is 1e-06; --tolerance 0\.000\d would accept it\)"):
        onnxopt.compile(_cancelling_conv_bn(), opt_level=2)


def test_ladder_sizes_by_input_kind():
    model = load.load(_parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[B, 3, H, W] img, float[B, T] wav, int64[B, S] ids) => (float[B, 3, H, W] y) { y = Relu(img) }"""))
    ladder = [verify.input_shapes(model, rung=r) for r in range(4)]
    assert [s["img"] for s in ladder] == [(1, 3, 16, 16), (1, 3, 224, 224), (1, 3, 320, 320), (1, 3, 640, 640)]
    assert [s["wav"][1] for s in ladder] == [16, 128, 512, 16000]
    assert [s["ids"][1] for s in ladder] == [16, 128, 512, 512]  # token ids never reach 16000


SAMPLE_RATE = """<ir_version: 8, opset_import: ["" : 17]>
vad (float[B, T] audio, int64 sr) => (float[B, F, W] y) {
    hundred = Constant <value = int64 {100}> ()
    head = Constant <value = int64[2] {1, -1}> ()
    ax = Constant <value = int64[1] {0}> ()
    w = Div(sr, hundred)
    w1 = Unsqueeze(w, ax)
    s = Concat <axis = 0> (head, w1)
    y = Reshape(audio, s)
}
"""


def test_a_sample_rate_input_is_named_and_input_data_runs_it(tmp_path):
    """Frames of sr/100 samples: a synthesized sr of 0 or 1 cannot run, a real 16000 can."""
    with pytest.raises(onnxopt.CompileError, match=r"input 'sr' is an integer scalar.*--input-data FILE.npz"):
        onnxopt.compile(_parse(SAMPLE_RATE))
    feeds = {"audio": np.zeros((1, 16000), np.float32), "sr": np.array(16000, np.int64)}
    result = onnxopt.compile(_parse(SAMPLE_RATE), input_data=feeds)
    assert result.report["verification"]["ok"] and result.report["options"]["input_data"] == "<feed dict>"
