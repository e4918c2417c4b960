"""Every level -O0..-O3 on every zoo model (tiny sizes, all exporters, plus the real-weight models),
through the oracle: checker, unchanged interface, outputs within 1e-4 relative, idempotent."""

from __future__ import annotations

import pytest

from onnxopt.bench import zoo
from oracle import assert_rewrite

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
