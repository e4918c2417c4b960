"""Every ONNX backend test-suite model that onnxruntime can load compiles at -O3 and matches its
stored outputs, or is refused with a one-line reason that is not an onnxopt defect (see
tests/backend_suite.py; about 30 s on 2 cores)."""

from __future__ import annotations

import backend_suite

# Refusals that are the model's or onnxruntime's doing, not onnxopt's: none are expected today.
ACCEPTED_REFUSALS: tuple[str, ...] = ()


def test_backend_suite_models_match_or_are_refused_for_a_reason():
    results = backend_suite.run_all()
    counted = {k: v for k, v in results.items() if v[0] not in ("not-loadable", "ort-differs")}
    assert len(counted) >= 100, f"only {len(counted)} models onnxruntime can load: is the onnx wheel's data missing?"
    defects = {k: v for k, v in counted.items() if v[0] in ("mismatch", "invalid")}
    assert not defects, defects
    for name, (status, why) in counted.items():
        if status == "refused":
            assert "\n" not in why and any(r in why for r in ACCEPTED_REFUSALS), f"{name}: {why}"
