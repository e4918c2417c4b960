"""The model cut into segments (passes/prune/segments.py): live ranges and cut placement on hand-made
graphs, and a chain of segment sessions giving the whole model's values on real exports."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import onnxopt
from onnxopt.bench import zoo
from onnxopt.passes.prune import segments as SEG

from oracle import run_ort
from test_prune import _f, _groups, _model, _ort_session

RNG = np.random.default_rng(3)


def _wide_narrow():
    """x -> wide (8x) -> narrow -> wide -> narrow, each narrow value also kept for a residual Add at
    the end of its block; a Shape of x (input-dependent) read at the very end."""
    d, w = 4, 32
    inits = {"w1": RNG.normal(size=(d, w)), "w2": RNG.normal(size=(w, d)), "w3": RNG.normal(size=(d, w)),
             "w4": RNG.normal(size=(w, d)), "c": RNG.normal(size=(d,))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]),         # 0
             helper.make_node("Relu", ["h1"], ["r1"]),                # 1
             helper.make_node("MatMul", ["r1", "w2"], ["n1"]),        # 2
             helper.make_node("Add", ["n1", "x"], ["s1"]),            # 3
             helper.make_node("Neg", ["c"], ["negc"]),                # 4: constant subexpression
             helper.make_node("MatMul", ["s1", "w3"], ["h2"]),        # 5
             helper.make_node("Relu", ["h2"], ["r2"]),                # 6
             helper.make_node("MatMul", ["r2", "w4"], ["n2"]),        # 7
             helper.make_node("Add", ["n2", "s1"], ["s2"]),           # 8
             helper.make_node("Add", ["s2", "negc"], ["y"])]          # 9
    return _model(nodes, [_f("x", [2, d])], [_f("y", [2, d])],
                  {k: v.astype(np.float32) for k, v in inits.items()})


def test_live_ranges_and_cuts_at_the_narrow_points():
    model = ir.serde.deserialize_model(_wide_narrow())
    ranges = SEG.live_ranges(model.graph)
    assert ranges["x"] == (-1, 3) and ranges["s1"] == (3, 8) and ranges["y"] == (9, 10)
    assert "negc" not in ranges  # constant: recomputed where needed, never cut across
    assert SEG.boundary(ranges, 5) == ["s1"]
    assert SEG.boundary(ranges, 7) == ["r2", "s1"]
    shapes = {"h1": 32, "r1": 32, "h2": 32, "r2": 32}
    nbytes = lambda n: 4.0 * shapes.get(n, 4) * 2  # noqa: E731
    # Asked to cut before each block's narrowing MatMul (2, 7): the cut for 7 moves back to 5 (only
    # s1 live), the one for 2 to the model's inputs (x is smaller than r1 + x): no cut there.
    assert SEG.place_cuts(ranges, [2, 7], nbytes) == [5]
    assert SEG.place_cuts(ranges, [1, 3], nbytes) == [3]  # window (1, 3]: n1 + x at 3 beat r1 + x
    assert SEG.place_cuts(ranges, [6], nbytes) == [5]
    # With slack, the cuts stay right before the asked positions when the state there is at most that
    # many times the narrowest (288 bytes against 32) and within the cap.
    assert SEG.place_cuts(ranges, [2, 7], nbytes, slack=10.0) == [2, 7]
    assert SEG.place_cuts(ranges, [2, 7], nbytes, slack=8.0) == [5]
    assert SEG.place_cuts(ranges, [2, 7], nbytes, slack=10.0, cap=100.0) == [5]


def test_chain_of_hand_made_graph_equals_whole():
    proto = _wide_narrow()
    model = ir.serde.deserialize_model(proto)
    feeds = {"x": RNG.normal(size=(2, 4)).astype(np.float32)}
    types = _groups(proto, feeds, types=True)
    chain = SEG.Chain(model, [2, 5], ["r2"], _ort_session, types)
    assert [(s.start, s.stop) for s in chain.segments] == [(0, 2), (2, 5), (5, 10)]
    assert chain.segments[2].inputs == ["s1"]
    want = run_ort(proto, feeds)["y"]
    st = chain.start(feeds)
    np.testing.assert_allclose(chain.run(st, 0, {}, ["y"])[0], want, rtol=1e-6)
    mid = chain.advance(st, 0, 2, {})
    assert sorted(mid) == ["s1"]
    r2, y = chain.run(mid, 2, {}, ["r2", "y"])
    np.testing.assert_allclose(y, want, rtol=1e-6)
    assert r2.shape == (2, 32)


FORMS = [("legacy", 14, "eager", 0), ("dynamo", 18, "sdpa", 1), ("legacy", 17, "sdpa", 3)]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f[0]}{f[1]}-{f[2]}-O{f[3]}")
def test_chain_of_bert_export_equals_whole_and_cuts_between_layers(form):
    """A real export cut before every group the pruner finds: the chain gives the whole model's
    outputs, and no state is much larger than the residual stream (cuts land between layers), besides
    the inputs of a group's consumers when its cut lies right before them (CUT_SLACK)."""
    from onnxopt.passes.prune import structured as S

    exporter, opset, attention, level = form
    proto = onnx.load(zoo.build("bert", size="tiny", exporter=exporter, opset=opset, attention=attention))
    feeds = zoo.sample_feeds("bert", proto)
    proto = onnxopt.compile(proto, opt_level=level, verify_outputs=False).model
    model, groups = _groups(proto, feeds)
    shapes = _groups(proto, feeds, shapes=True)[1]
    types = _groups(proto, feeds, types=True)
    ok = [g for g in groups if not g.reason and g.units >= 2]
    assert len(ok) >= 4
    position = {id(n): i for i, n in enumerate(model.graph)}
    cuts = [min(position[id(c.node)] for c in g.consumers) for g in ok]
    nbytes = lambda n: float(np.prod(shapes.get(n, (0,)))) * types[n].itemsize if n in types else 0.0  # noqa: E731
    tuner = S._Tuner(model, [c for g in ok for c in g.consumers], _ort_session, cuts, types, nbytes)
    chain = tuner.chain
    assert len(chain.segments) >= len(ok)
    want = run_ort(proto, feeds)
    outs = [o.name for o in proto.graph.output]
    for name, got in zip(outs, tuner.run(feeds, None, outs)):
        np.testing.assert_allclose(got, want[name], rtol=1e-4, atol=1e-5)
    stream = max(a.nbytes for a in want.values() if a.ndim == 3)  # the last hidden state
    for seg in chain.segments[1:]:
        assert sum(nbytes(n) for n in seg.inputs if n not in tuner.acts) <= 2.5 * stream, (seg.start, seg.inputs)
        assert sum(nbytes(n) for n in seg.inputs) <= S.CUT_SLACK * stream, (seg.start, seg.inputs)
