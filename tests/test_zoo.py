"""Tests for the model zoo (onnxopt.bench.zoo).

Only tiny sizes and the small real-weight models are built here (never base sizes).  Builds go
to the normal zoo cache ($ONNXOPT_ZOO_CACHE or ~/.cache/onnxopt/zoo), so reruns are fast; the
caching tests use a private tmp cache.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest

import onnxruntime as ort

from onnxopt.bench import zoo

RTOL = 1e-4  # max |onnx - torch| / max |torch|, per output


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, feeds) -> dict[str, np.ndarray]:
    sess = _session(path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _assert_close(got: dict, ref: dict) -> None:
    assert set(ref) <= set(got), (sorted(got), sorted(ref))
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, (k, g.shape, r.shape)
        err = float(np.abs(g - r).max()) / max(float(np.abs(r).max()), 1e-12)
        assert err <= RTOL, f"{k}: relative error {err:.2e} > {RTOL}"


def _op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _vid(kw: dict) -> str:
    return f"{kw['name']}-{kw['exporter']}{kw['opset']}-{kw['attention']}"


# --------------------------------------------------------------------------------------------
# API / matrix (no builds)
# --------------------------------------------------------------------------------------------


def test_models_and_variants_shape():
    assert set(zoo.MODELS) >= {"bert", "gpt2", "vit", "resnet", "mobilenetv2", "cnn",
                               "minilm", "efficientnet_lite0", "digits_cnn"}
    vs = zoo.variants("tiny")
    keys = {(v["name"], v["exporter"], v["opset"], v["attention"]) for v in vs}
    assert len(keys) == len(vs), "duplicate variants"
    for attn in ("eager", "sdpa"):
        for op in (13, 14, 17):
            assert ("bert", "legacy", op, attn) in keys
        assert any(k[:2] == ("bert", "dynamo") and k[3] == attn for k in keys)
    for name in ("gpt2", "vit", "cnn"):
        assert any(k[:2] == (name, "dynamo") for k in keys)
    assert ("resnet", "legacy", 13, "eager") in keys
    assert ("mobilenetv2", "legacy", 14, "eager") in keys
    assert all(v["size"] == "tiny" and v["name"] in zoo.MODELS for v in vs)
    base = zoo.variants("base")  # not built: benchmarks only
    assert [dict(v, size="tiny") for v in base] == vs


def test_invalid_requests_raise():
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.build("nope")
    with pytest.raises(ValueError):
        zoo.build("bert", size="huge")
    with pytest.raises(ValueError):
        zoo.build("bert", exporter="tracing")
    with pytest.raises(ValueError):
        zoo.build("bert", opset=12)
    with pytest.raises(ValueError):
        zoo.build("bert", attention="flash")
    with pytest.raises(ValueError, match="Trilu"):
        zoo.build("gpt2", opset=13, attention="sdpa")


def test_sample_feeds_without_model():
    f1 = zoo.sample_feeds("bert", batch=2)
    f2 = zoo.sample_feeds("bert", batch=2)
    assert list(f1) == ["input_ids", "attention_mask", "token_type_ids"]
    for k in f1:
        np.testing.assert_array_equal(f1[k], f2[k])  # deterministic
        assert f1[k].dtype == np.int64 and f1[k].shape == (2, 16)
    assert f1["input_ids"].min() >= 0 and f1["input_ids"].max() < 1000
    assert (f1["attention_mask"] == 1).all()
    assert zoo.sample_feeds("bert", size="base")["input_ids"].shape == (1, 128)
    assert zoo.sample_feeds("gpt2", seq=7)["input_ids"].shape == (1, 7)
    img = zoo.sample_feeds("vit", batch=3)["pixel_values"]
    assert img.dtype == np.float32 and img.shape == (3, 3, 32, 32)
    assert -3 < img.min() < 0 < img.max() < 3  # ImageNet-normalized
    assert zoo.sample_feeds("resnet", size="base")["pixel_values"].shape == (1, 3, 224, 224)
    assert zoo.sample_feeds("cnn", batch=4)["input"].shape == (4, 1, 8, 8)


def test_digits_data():
    x_tr, y_tr, x_te, y_te = zoo.digits_data()
    assert x_tr.dtype == x_te.dtype == np.float32
    assert x_tr.shape[1:] == x_te.shape[1:] == (1, 8, 8)
    assert len(x_tr) == len(y_tr) and len(x_te) == len(y_te)
    assert len(x_tr) + len(x_te) == 1797
    assert set(np.unique(y_te)) == set(range(10))
    assert -1.0 <= x_tr.min() and x_tr.max() <= 1.0


# --------------------------------------------------------------------------------------------
# Caching
# --------------------------------------------------------------------------------------------


def test_cache_key_and_atomic_write(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_ZOO_CACHE", str(tmp_path / "env"))
    p = zoo.build("cnn", exporter="legacy", opset=13)
    assert p.parent == tmp_path / "env" and p.is_file()
    for part in ("cnn", "tiny", "legacy", "op13", "torch", "tf"):
        assert part in p.name
    mtime = p.stat().st_mtime_ns
    assert zoo.build("cnn", exporter="legacy", opset=13) == p
    assert p.stat().st_mtime_ns == mtime  # cache hit, not rebuilt
    assert not [f for f in p.parent.iterdir() if f.name.endswith(".tmp")]
    # explicit cache_dir wins over the env var; each key field gets its own file
    q = zoo.build("cnn", exporter="legacy", opset=17, cache_dir=tmp_path / "arg")
    assert q.parent == tmp_path / "arg"
    assert q.name == p.name.replace("-op13-", "-op17-")
    meta = {m.key: m.value for m in onnx.load(str(q)).metadata_props}
    assert meta["onnxopt.zoo.name"] == "cnn" and meta["onnxopt.zoo.opset"] == "17"


def test_dynamo_low_opset_maps_to_18():
    assert zoo.build("cnn", exporter="dynamo", opset=14) == zoo.build(
        "cnn", exporter="dynamo", opset=18
    )


# --------------------------------------------------------------------------------------------
# The tiny matrix: every variant exports, runs in ORT (no graph optimizations) and matches torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", zoo.variants("tiny"), ids=_vid)
def test_tiny_variant_matches_torch(kw):
    path = zoo.build(**kw)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == kw["opset"]

    feeds = zoo.sample_feeds(kw["name"], path, batch=1)
    assert [i.name for i in _session(path).get_inputs()] == list(feeds)
    ref = zoo.reference_outputs(kw["name"], feeds, "tiny", kw["attention"])
    _assert_close(_run(path, feeds), ref)

    # dynamic batch (and sequence for text models)
    text = "input_ids" in feeds
    feeds2 = zoo.sample_feeds(kw["name"], path, batch=3, seq=11 if text else None, seed=1)
    ref2 = zoo.reference_outputs(kw["name"], feeds2, "tiny", kw["attention"])
    _assert_close(_run(path, feeds2), ref2)


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "cnn"])
def test_batchnorm_kept(name):
    exporters = [("legacy", 13)] + ([("dynamo", 18)] if name == "cnn" else [])
    for exporter, opset in exporters:
        counts = _op_counts(zoo.build(name, exporter=exporter, opset=opset))
        assert counts.get("BatchNormalization", 0) > 0, (name, exporter)


def test_io_names_stable():
    sess = _session(zoo.build("bert", exporter="dynamo", opset=18))
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "pooler_output"]
    sess = _session(zoo.build("gpt2"))
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]
    sess = _session(zoo.build("resnet", opset=13))
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    sess = _session(zoo.build("cnn", opset=13))
    assert [(i.name, o.name) for i, o in zip(sess.get_inputs(), sess.get_outputs())] == [
        ("input", "logits")
    ]


def test_sdpa_and_eager_graphs_differ():
    eager = _op_counts(zoo.build("bert", opset=14, attention="eager"))
    sdpa = _op_counts(zoo.build("bert", opset=14, attention="sdpa"))
    assert eager != sdpa
    assert eager["MatMul"] == sdpa["MatMul"] == 16  # 2 layers x (QKV + 2 attn + out + 2 FFN)


# --------------------------------------------------------------------------------------------
# Real-weight models (small; size is ignored)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_real_minilm(attention):
    path = zoo.build("minilm", opset=14, attention=attention)
    feeds = zoo.sample_feeds("minilm", path, batch=2, seq=24)
    _assert_close(_run(path, feeds), zoo.reference_outputs("minilm", feeds, attention=attention))


def test_real_efficientnet_lite0():
    path = zoo.build("efficientnet_lite0", opset=13)
    assert _op_counts(path).get("BatchNormalization", 0) > 0
    feeds = zoo.sample_feeds("efficientnet_lite0", path, batch=1)
    assert feeds["input"].shape == (1, 3, 224, 224)
    out = _run(path, feeds)
    _assert_close(out, zoo.reference_outputs("efficientnet_lite0", feeds))
    assert out["logits"].shape == (1, 1000)


def test_real_digits_cnn_accuracy():
    path = zoo.build("digits_cnn", opset=13)
    _, _, x_te, y_te = zoo.digits_data()
    logits = _run(path, {"input": x_te})["logits"]
    acc = float((logits.argmax(1) == y_te).mean())
    assert acc >= 0.95, acc
    feeds = zoo.sample_feeds("digits_cnn", path, batch=5)
    _assert_close(_run(path, feeds), zoo.reference_outputs("digits_cnn", feeds))

