"""The one differential oracle every pass and level test goes through.

`assert_rewrite(what, model, ...)` compiles `model` with a level (int) or a single pass (its
registered name, run at -O0 so nothing else interferes), then checks, independently of onnxopt's
own verifier:
  1. onnx.checker full check of the result;
  2. graph input and output names, element types and shapes unchanged;
  3. expected op counts (`expect_ops`, exact) and ops that must be gone (`absent_ops`);
  4. outputs close to the original in onnxruntime with graph optimizations disabled
     (max |got - ref| <= rtol * max|ref|, per output);
  5. compiling the result again with the same options modifies nothing (idempotence; a lossy
     pass that removes a fraction on every run, like `prune`, passes idempotent=False).
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
    idempotent: bool = True,
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

    if not idempotent:
        return compiled
    again = onnxopt.compile(compiled, verify_outputs=False, **opts)
    changed = [p["name"] for p in again.report["passes"] if p["modified"]]
    assert not changed, f"not idempotent: a second run changed the model in {changed}"
    return compiled


def padded_feeds(name: str, path) -> dict:
    """Zoo sample feeds, batch 2, the second row's attention_mask (if any) ending in zeros (padding)."""
    from onnxopt.bench import zoo

    feeds = zoo.sample_feeds(name, path, batch=2)
    if "attention_mask" in feeds:
        mask = feeds["attention_mask"].copy()
        mask[1, -(mask.shape[1] // 3):] = 0
        feeds["attention_mask"] = mask
    return feeds


def parse(text: str) -> onnx.ModelProto:
    """An ONNX text model (onnx.parser), checked: the fixtures of precondition tests."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def declined(report: dict, name: str) -> list[str]:
    """The reasons pass `name` gave for the candidates it declined."""
    return [d["reason"] for p in report["passes"] if p["name"] == name for d in p["declined"]]


def canonical_text(proto: onnx.ModelProto) -> str:
    """onnx.printer text of the main graph with every name that is not the interface's replaced by
    its position (values in order of definition, initializers in order of first use), node names and
    value_info dropped: two graphs that compute the same way print the same."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        for name in node.input:
            if name in inits and name not in keep and name not in names:
                names[name] = f"w{sum(n.startswith('w') for n in names.values())}"
        for name in node.output:
            if name and name not in keep:
                names[name] = f"v{sum(n.startswith('v') for n in names.values())}"
    rename = lambda n: names.get(n, n)  # noqa: E731
    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    used = [t for t in graph.initializer if t.name in names or t.name in keep]
    for t in used:
        t.name = rename(t.name)
    del graph.initializer[:]
    graph.initializer.extend(sorted(used, key=lambda t: t.name))
    del graph.value_info[:]
    graph.name = "g"
    model.producer_name = model.producer_version = ""
    return onnx.printer.to_text(graph)


def assert_rewrites_to(what: int | str, before: str, expected: str, **options) -> onnx.ModelProto:
    """TVM-style Before/Expected: `what` (a pass alone, or a level) turns the ONNX text `before`
    into exactly `expected` (compared as canonical_text), and the rewrite passes the oracle."""
    compiled = assert_rewrite(what, parse(before), **options)
    got, want = canonical_text(compiled), canonical_text(parse(expected))
    assert got == want, f"rewrite differs from the expected graph:\n--- got\n{got}\n--- expected\n{want}"
    return compiled
