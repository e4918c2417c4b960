"""Every level -O0..-O3 on every zoo model (tiny sizes, all exporters, plus the real-weight models),
through the oracle: checker, unchanged interface, outputs within 1e-4 relative, idempotent."""

from __future__ import annotations

import pytest

from onnxopt.bench import zoo
from oracle import assert_rewrite, op_counts

VARIANTS = zoo.variants("tiny", include_real=True)


def _id(kw: dict) -> str:
    return "-".join(str(kw[k]) for k in ("name", "exporter", "opset", "attention") if k in kw)


@pytest.fixture(scope="module", params=VARIANTS, ids=[_id(v) for v in VARIANTS])
def exported(request):
    path = zoo.build(**request.param)
    return path, zoo.sample_feeds(request.param["name"], path)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_level_on_zoo_model(exported, level):
    path, feeds = exported
    assert_rewrite(level, path, feeds)


# The dynamo exports declare value_info (the legacy exporter's do not, so stripping changes nothing).
STRIPPED = [v for v in zoo.variants("tiny") if v["exporter"] == "dynamo"]


@pytest.mark.parametrize("kw", STRIPPED, ids=[_id(v) + "-novi" for v in STRIPPED])
def test_levels_2_and_3_without_value_info(kw):
    """Fusions must not depend on the exporter's shape annotations: with graph.value_info cleared
    every level's result passes the oracle and -O3 gives the same ops as on the original export."""
    path = zoo.build(**kw, strip_value_info=True)
    feeds = zoo.sample_feeds(kw["name"], path)
    assert_rewrite(2, path, feeds)
    fused = assert_rewrite(3, path, feeds)
    original = assert_rewrite(3, zoo.build(**kw), feeds)
    assert op_counts(fused) == op_counts(original)
