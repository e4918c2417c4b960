"""fold_pad through the oracle: a zero constant Pad on the spatial axes in front of a Conv becomes
the Conv's pads (EfficientNet-Lite0's TF-style "same" padding, after the pad amounts fold to
constants); other pads stay, each with its reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.bench import zoo
from oracle import assert_rewrite

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
W = "float[4, 3, 3, 3] w = {" + ", ".join(str(round(0.1 * ((i * 7) % 11) - 0.5, 2)) for i in range(108)) + "}"
FEEDS = {"x": np.random.default_rng(0).normal(size=(1, 3, 6, 6)).astype(np.float32)}


def pad_conv(pads: str, *, mode: str = "constant", value: str = "", conv_attrs: str = "") -> onnx.ModelProto:
    value_init = f", float v = {{{value}}}" if value else ""
    value_arg = ", v" if value else ""
    return onnx.parser.parse_model(HEADER + f"""
    g (float[1, 3, 6, 6] x) => (float[?, 4, ?, ?] y) <{W}, int64[8] p = {{{pads}}}{value_init}> {{
        t = Pad<mode = "{mode}">(x, p{value_arg})
        y = Conv{conv_attrs}(t, w)
    }}""")


def reasons(model) -> list[str]:
    result = onnxopt.compile(model, opt_level=0, enable=["fold_pad"], verify_outputs=False)
    return [d["reason"] for d in next(p for p in result.report["passes"] if p["name"] == "fold_pad")["declined"]]


@pytest.mark.parametrize("pads, conv_attrs, want", [
    ("0, 0, 1, 1, 0, 0, 1, 1", "", [1, 1, 1, 1]),
    ("0, 0, 0, 0, 0, 0, 1, 1", "<strides = [2, 2]>", [0, 0, 1, 1]),  # TF "same" for stride 2: end only
    ("0, 0, 1, 2, 0, 0, 0, 1", "<pads = [1, 1, 1, 1]>", [2, 3, 1, 2]),  # adds to the Conv's own pads
])
def test_zero_pad_folds_into_conv(pads, conv_attrs, want):
    out = assert_rewrite("fold_pad", pad_conv(pads, conv_attrs=conv_attrs), FEEDS, expect_ops={"Pad": 0, "Conv": 1})
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == want


@pytest.mark.parametrize("kw, reason", [
    (dict(pads="0, 0, 1, 1, 0, 0, 1, 1", mode="reflect"), "mode must be 'constant'"),
    (dict(pads="0, 0, 1, 1, 0, 0, 1, 1", value="1.0"), "must be equal to 0"),
    (dict(pads="1, 0, 1, 1, 0, 0, 1, 1"), "zero in non-spatial dimensions"),  # batch padding
])
def test_pads_that_are_not_conv_padding_stay(kw, reason):
    m = pad_conv(**kw)
    assert_rewrite("fold_pad", m, FEEDS, expect_fired=False, expect_ops={"Pad": 1})
    assert any(reason in r for r in reasons(m))


def test_efficientnet_same_padding_folds_and_quantizes():
    """EfficientNet-Lite0 (real weights) computes its 17 pads with ConstantOfShape arithmetic: -O1
    folds it to constants, -O2 folds every Pad into its Conv."""
    path = zoo.build("efficientnet_lite0")
    assert_rewrite(2, path, zoo.sample_feeds("efficientnet_lite0", path), expect_ops={"Pad": 0, "Conv": 49},
                   absent_ops=("ConstantOfShape",))
