"""The one differential oracle every pass and level test goes through.

`assert_rewrite(what, model, ...)` compiles `model` with a level (int) or a single pass (its
registered name, run at -O0 so nothing else interferes), then checks, independently of onnxopt's
own verifier:
  1. onnx.checker full check of the result;
  2. graph input and output names, element types and shapes unchanged;
  3. expected op counts (`expect_ops`, exact) and ops that must be gone (`absent_ops`);
  4. outputs close to the original in onnxruntime with graph optimizations disabled
     (max |got - ref| <= rtol * max|ref|, per output);
  5. compiling the result again with the same options modifies nothing (idempotence).
It returns the compiled ModelProto for further, test-specific checks.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort

import onnxopt
from onnxopt import load, verify
from onnxopt.passes import registry


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_ort(proto: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    sess = _session(proto)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def op_counts(proto: onnx.ModelProto) -> collections.Counter:
    counts = collections.Counter()

    def walk(graph):
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            counts[key] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)
    return counts


def _interface(proto: onnx.ModelProto):
    def describe(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        return (v.name, t.elem_type, tuple(dims) if t.HasField("shape") else None)

    return [describe(v) for v in proto.graph.input], [describe(v) for v in proto.graph.output]


def options_for(what) -> dict:
    """A level, or one pass alone, on the default target if the pass runs there, else on one it runs on."""
    if isinstance(what, int):
        return {"opt_level": what}
    targets = registry.get(what).targets
    return {"opt_level": 0, "enable": [what], **({} if "cpu" in targets else {"target": min(targets)})}


def assert_rewrite(
    what: int | str,
    model: onnx.ModelProto | str,
    feeds: dict | None = None,
    *,
    expect_ops: dict[str, int] | None = None,
    absent_ops: tuple[str, ...] = (),
    expect_fired: bool | None = None,
    rtol: float = 1e-4,
    **options,
) -> onnx.ModelProto:
    original = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    opts = {**options_for(what), **options}
    result = onnxopt.compile(original, verify_outputs=False, **opts)
    compiled = result.model

    onnx.checker.check_model(compiled, full_check=True)
    assert _interface(compiled) == _interface(original), "model interface changed"

    counts = op_counts(compiled)
    for op, n in (expect_ops or {}).items():
        assert counts.get(op, 0) == n, f"expected {n} {op}, got {counts.get(op, 0)}: {dict(counts)}"
    for op in absent_ops:
        assert counts.get(op, 0) == 0, f"{op} should be gone: {dict(counts)}"
    if expect_fired is not None and isinstance(what, str):
        rec = next(p for p in result.report["passes"] if p["name"] == what)
        assert bool(rec["fired"]) == expect_fired, f"{what} fired {rec['fired']} times, expected fired={expect_fired}"

    if feeds is None:
        feeds = verify.synthesize_feeds(load.load(original))
    ref, got = run_ort(original, feeds), run_ort(compiled, feeds)
    assert ref.keys() == got.keys()
    for name in ref:
        r, g = ref[name], got[name]
        assert r.shape == g.shape and r.dtype == g.dtype, name
        if np.issubdtype(r.dtype, np.inexact):
            scale = max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-6)
            err = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
            assert err <= rtol * scale, f"output {name}: max abs error {err:.3g} > {rtol} * {scale:.3g}"
        else:
            np.testing.assert_array_equal(g, r, err_msg=name)

    again = onnxopt.compile(compiled, verify_outputs=False, **opts)
    changed = [p["name"] for p in again.report["passes"] if p["modified"]]
    assert not changed, f"not idempotent: a second run changed the model in {changed}"
    return compiled
