"""Sample-input synthesis and the comparison rule used by built-in verification."""

from __future__ import annotations

import numpy as np
import pytest

import onnxopt
from onnxopt import load, verify
from onnxopt.bench import zoo


def test_feeds_for_bert_index_embeddings_in_range_and_mask_ones():
    model = load.load(zoo.build("bert", size="tiny", opset=14))
    feeds = verify.synthesize_feeds(model)
    assert feeds["input_ids"].shape == (1, verify.DEFAULT_DIM)
    vocab = model.graph.initializers  # the word-embedding table bounds the ids
    tables = [v.const_value.shape[0] for v in vocab.values() if v.const_value is not None and len(v.const_value.shape) == 2]
    assert feeds["input_ids"].max() < max(tables)
    assert feeds["token_type_ids"].max() <= 1 and (feeds["attention_mask"] == 1).all()


def test_shared_symbolic_dims_follow_an_override():
    model = load.load(zoo.build("bert", size="tiny", opset=14))
    shapes = verify.input_shapes(model, {"input_ids": (2, 8)})
    assert shapes == {"input_ids": (2, 8), "attention_mask": (2, 8), "token_type_ids": (2, 8)}


def test_override_must_respect_fixed_dims():
    model = load.load(zoo.build("cnn", size="tiny", opset=13))
    with pytest.raises(onnxopt.CompileError, match="fixed in the model"):
        verify.input_shapes(model, {"input": (1, 3, 8, 8)})


def test_compare_is_relative_to_output_magnitude():
    ref = {"big": np.full(4, 1000.0, np.float32), "small": np.full(4, 1e-3, np.float32)}
    got = {"big": ref["big"] + 0.05, "small": ref["small"] + 5e-7}
    diffs = {d.name: d for d in verify.compare(ref, got, tolerance=1e-4)}
    assert diffs["big"].ok and diffs["big"].rel == pytest.approx(5e-5, rel=1e-2)
    assert not diffs["small"].ok  # 5e-7 on outputs of 1e-3 is 5e-4 relative


def test_compare_flags_nan_and_shape_changes():
    ref = {"y": np.array([1.0, np.nan], np.float32), "z": np.zeros((2, 2), np.float32)}
    got = {"y": np.array([1.0, 2.0], np.float32), "z": np.zeros((4,), np.float32)}
    diffs = {d.name: d for d in verify.compare(ref, got, tolerance=1e-4)}
    assert not diffs["y"].ok and "non-finite" in diffs["y"].note
    assert not diffs["z"].ok
