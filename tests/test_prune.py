"""Structured pruning: dependency groups (zeroing == removing), declines with reasons, the pass
end to end through the CLI and the library, and the numpy math."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import CompileError
from onnxopt.kernels import pruning as K
from onnxopt.passes.prune import groups as G

from oracle import run_ort

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=17, ms=False):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    m = helper.make_model(graph, opset_imports=ops)
    m.ir_version = 8
    return m


def _f(name, shape):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def cnn_residual():
    """conv1 -> relu -> [conv2 -> relu -> dw -> relu -> conv3] + conv1 residual -> SE gate -> conv4 -> GAP -> Flatten -> Gemm."""
    c = 8
    inits = {"w1": RNG.normal(size=(c, 3, 3, 3)), "b1": RNG.normal(size=c), "w2": RNG.normal(size=(16, c, 1, 1)),
             "b2": RNG.normal(size=16), "wd": RNG.normal(size=(16, 1, 3, 3)), "bd": RNG.normal(size=16),
             "w3": RNG.normal(size=(c, 16, 1, 1)), "b3": RNG.normal(size=c), "s": RNG.normal(size=(1, c, 1, 1)),
             "wse1": RNG.normal(size=(4, c, 1, 1)), "wse2": RNG.normal(size=(c, 4, 1, 1)),
             "w4": RNG.normal(size=(16, c, 3, 3)), "wg": RNG.normal(size=(5, 16 * 4 * 4)), "bg": RNG.normal(size=5)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
        helper.make_node("Clip", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "wd", "bd"], ["d"], group=16, pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["d"], ["r3"]),
        helper.make_node("Conv", ["r3", "w3", "b3"], ["c3"]),
        helper.make_node("Add", ["c3", "r1"], ["res"]),
        helper.make_node("Mul", ["res", "s"], ["scaled"]),
        helper.make_node("GlobalAveragePool", ["scaled"], ["sq"]),
        helper.make_node("Conv", ["sq", "wse1"], ["e1"]),
        helper.make_node("Relu", ["e1"], ["e1r"]),
        helper.make_node("Conv", ["e1r", "wse2"], ["e2"]),
        helper.make_node("Sigmoid", ["e2"], ["gate"]),
        helper.make_node("Mul", ["scaled", "gate"], ["gated"]),
        helper.make_node("Conv", ["gated", "w4"], ["c4"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c4"], ["r4"]),
        helper.make_node("MaxPool", ["r4"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["fl"]),
        helper.make_node("Gemm", ["fl", "wg", "bg"], ["y"], transB=1),
    ]
    return _model(nodes, [_f("x", [1, 3, 8, 8])], [_f("y", [1, 5])], inits)


def ffn(act="Gelu"):
    d, h = 16, 24
    inits = {"w1": RNG.normal(size=(d, h)) / 4, "b1": RNG.normal(size=h), "w2": RNG.normal(size=(h, d)) / 4,
             "b2": RNG.normal(size=d)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Erf", ["a1"], ["e"]), helper.make_node("Mul", ["a1", "e"], ["g"]),
             helper.make_node("MatMul", ["g", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["y"])]
    return _model(nodes, [_f("x", [1, 6, d])], [_f("y", [1, 6, d])], inits)


def fused_attention():
    d, heads, s = 16, 4, 6
    inits = {"wqkv": RNG.normal(size=(d, 3 * d)) / 4, "bqkv": RNG.normal(size=3 * d) / 4,
             "wo": RNG.normal(size=(d, d)) / 4, "bo": RNG.normal(size=d)}
    nodes = [helper.make_node("Attention", ["x", "wqkv", "bqkv"], ["att"], domain="com.microsoft", num_heads=heads),
             helper.make_node("MatMul", ["att", "wo"], ["m"]), helper.make_node("Add", ["m", "bo"], ["y"])]
    return _model(nodes, [_f("x", [1, s, d])], [_f("y", [1, s, d])], inits, ms=True)


def _groups(proto, feeds, shapes=False, types=False):
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    values = [v for n in graph for v in n.outputs]
    for v in values:
        if not v.is_graph_output():
            graph.outputs.append(v)
    got = run_ort(ir.serde.serialize_model(model), feeds)
    for v in values:
        if v in graph.outputs and v.name not in [o.name for o in proto.graph.output]:
            graph.outputs.remove(v)
    found = {k: a.shape for k, a in got.items()}
    found.update({k: a.shape for k, a in feeds.items()})
    if types:
        return {k: a.dtype for k, a in [*got.items(), *feeds.items()]}
    if shapes:
        return model, found
    return model, G.find_groups(graph, lambda v: found.get(v.name) if v is not None else None)


def _zero_equals_remove(proto, feeds, kind):
    model, groups = _groups(proto, feeds)
    ref = run_ort(proto, feeds)
    tested = 0
    for i, g in enumerate(groups):
        if g.reason or g.kind != kind:
            continue
        drop_units = np.arange(0, g.units, 2)
        drop = G.unit_channels(g, drop_units)
        keep = G.unit_channels(g, sorted(set(range(g.units)) - set(drop_units)))
        undo = G.zero(model.graph, g, drop)
        zeroed = run_ort(ir.serde.serialize_model(model), feeds)
        undo()
        assert all(np.allclose(run_ort(ir.serde.serialize_model(model), feeds)[k], ref[k]) for k in ref)
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        _, groups2 = _groups(ir.serde.serialize_model(copy), feeds)
        model2, groups2 = _groups(ir.serde.serialize_model(copy), feeds)
        G.apply(model2.graph, groups2[i], keep)
        pruned = ir.serde.serialize_model(model2)
        onnx.checker.check_model(pruned, full_check=True)
        removed = run_ort(pruned, feeds)
        for k in ref:
            np.testing.assert_allclose(removed[k], zeroed[k], rtol=1e-4, atol=1e-4)
        tested += 1
    assert tested, f"no {kind} group found: {[(g.kind, g.reason) for g in groups]}"


def test_conv_groups_residual_depthwise_se_flatten():
    proto = cnn_residual()
    feeds = {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    _, groups = _groups(proto, feeds)
    kinds = {g.kind: g for g in groups if not g.reason}
    # conv1 + conv3 + the SE expand conv share the residual / gated stream; conv2 feeds the depthwise conv.
    stream = kinds["residual stream"]
    assert {p.node.name or p.node.outputs[0].name for p in stream.producers} == {"c1", "c3", "e2"} or len(stream.producers) == 3
    assert any(g.depthwise for g in groups if not g.reason)
    assert any(c.flatten is not None for g in groups if not g.reason for c in g.consumers)
    _zero_equals_remove(proto, feeds, "residual stream")
    _zero_equals_remove(proto, feeds, "channels")


def test_ffn_neurons_zero_equals_remove():
    _zero_equals_remove(ffn(), {"x": RNG.normal(size=(1, 6, 16)).astype(np.float32)}, "neurons")


def test_fused_attention_heads_zero_equals_remove():
    proto = fused_attention()
    feeds = {"x": RNG.normal(size=(1, 6, 16)).astype(np.float32)}
    _zero_equals_remove(proto, feeds, "heads")


def _more_kinds():
    import test_prune_groups as T

    return [(T.unfused_attention, T._x), (T.mha, T._x), (T.concat_model, T._img), (T.split_model, T._img),
            (T.grouped_model, T._img)]


@pytest.mark.parametrize("build,shape", [(cnn_residual, (1, 3, 8, 8)), (ffn, (1, 6, 16)), (fused_attention, (1, 6, 16))]
                         + _more_kinds(), ids=lambda x: getattr(x, "__name__", ""))
def test_tuner_feeds_equal_physical_pruning(build, shape):
    """What the pass measures in its sessions (consumer rows of removed units zeroed and refitted
    weights given as feeds, through the chain of segments cut before the groups) is what it writes:
    the physically pruned model gives the same outputs, for every group kind."""
    from onnxopt.passes.prune import structured as S

    proto = build()
    feeds = shape()[0] if callable(shape) else {"x": RNG.normal(size=shape).astype(np.float32)}
    model, groups = _groups(proto, feeds)
    ok = [g for g in groups if not g.reason and g.units >= 2]
    position = {id(n): i for i, n in enumerate(model.graph)}
    cuts = [min(position[id(c.node)] for c in g.consumers) for g in ok]
    types = _groups(proto, feeds, types=True)
    tuner = S._Tuner(model, [c for g in ok for c in g.consumers], lambda m: _ort_session(m), cuts, types)
    whole = S._Tuner(model, [c for g in ok for c in g.consumers], lambda m: _ort_session(m), (), types)
    assert len(tuner.chain.segments) >= 2 and len(whole.chain.segments) == 1
    orders = [list(range(0, g.units, 2)) for g in ok]
    fitted, over, j = {}, {}, 0
    for g, order in zip(ok, orders):
        drop = G.unit_channels(g, order)
        for c in g.consumers:
            w = tuner.dense_w[j] * (1.0 + 0.1 * RNG.normal(size=tuner.dense_w[j].shape)).astype(np.float32)
            b = tuner.dense_b[j] + 0.1 if tuner.has_bias(j) else None
            rows = G.consumer_rows(c, drop)
            kept = np.setdiff1d(np.arange(w.shape[0]), rows)
            full = w.copy()
            full[rows] = 0.0
            over.update(tuner.weights(j, full, b))
            fitted[j] = (w[kept], b, None)
            j += 1
    for j, name in enumerate(tuner.acts):  # the chain of segments gives the activations of the whole model
        np.testing.assert_allclose(tuner.run(feeds, over, [name])[0], whole.run(feeds, over, [name])[0],
                                   rtol=1e-5, atol=1e-5)
    outs = [o.name for o in proto.graph.output]
    fed = dict(zip(outs, tuner.run(feeds, over, outs)))
    _, shapes = _groups(proto, feeds, shapes=True)
    S.PrunePass()._apply(model, ok, orders, [len(o) for o in orders], fitted, lambda v: shapes.get(v.name) if v is not None else None)
    written = run_ort(ir.serde.serialize_model(model), feeds)
    for k in outs:
        np.testing.assert_allclose(written[k], fed[k], rtol=1e-4, atol=1e-4)


def _ort_session(model):
    import onnxruntime as ort

    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _decline(nodes, inputs, outputs, inits, feeds, expect):
    proto = _model(nodes, inputs, outputs, inits)
    _, groups = _groups(proto, feeds)
    reasons = [g.reason for g in groups if g.reason]
    assert any(expect in r for r in reasons), reasons


def test_declines_concat_grouped_layernorm_output():
    x = {"x": RNG.normal(size=(1, 4, 6, 6)).astype(np.float32)}
    w = {"w": RNG.normal(size=(8, 4, 1, 1)), "wg": RNG.normal(size=(8, 4, 1, 1))}
    _decline([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Concat", ["c", "k"], ["cc"], axis=1),
              helper.make_node("Conv", ["cc", "w2"], ["y"])],
             [_f("x", [1, 4, 6, 6])], [_f("y", [1, 4, 6, 6])],
             {**w, "k": RNG.normal(size=(1, 8, 6, 6)), "w2": RNG.normal(size=(4, 16, 1, 1))}, x,
             "concatenates a constant")
    # A grouped Conv passes whole groups on, but not with weights that are a graph input.
    _decline([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Conv", ["c", "wg"], ["y"], group=2)],
             [_f("x", [1, 4, 6, 6]), _f("wg", [8, 4, 1, 1])], [_f("y", [1, 8, 6, 6])], {"w": w["w"]},
             {**x, "wg": w["wg"].astype(np.float32)}, "grouped Conv")
    _decline([helper.make_node("Conv", ["x", "w"], ["y"])], [_f("x", [1, 4, 6, 6])], [_f("y", [1, 8, 6, 6])], w, x,
             "graph output")
    t = {"x": RNG.normal(size=(1, 3, 4)).astype(np.float32)}
    _decline([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("ReduceMean", ["m"], ["r"], axes=[-1]),
              helper.make_node("Sub", ["m", "r"], ["s"]), helper.make_node("MatMul", ["s", "w2"], ["y"])],
             [_f("x", [1, 3, 4])], [_f("y", [1, 3, 4])], {"w": RNG.normal(size=(4, 8)), "w2": RNG.normal(size=(8, 4))},
             t, "reduces over the channel axis")
    _decline([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Conv", ["c", "w2"], ["y"], auto_pad="SAME_UPPER")],
             [_f("x", [1, 4, 6, 6])], [_f("y", [1, 4, 6, 6])],
             {"w": RNG.normal(size=(8, 4, 1, 1)), "w2": RNG.normal(size=(4, 8, 3, 3))}, x, "auto_pad")
    _decline([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("LRN", ["c"], ["y"], size=3)],
             [_f("x", [1, 4, 6, 6])], [_f("y", [1, 8, 6, 6])], w, x, "which the grouping does not know")


# ---- the pass -------------------------------------------------------------------------------


def _calib(n=40, shape=(1, 3, 8, 8)):
    return [{"x": RNG.normal(size=shape).astype(np.float32)} for _ in range(n)]


def test_prune_pass_cnn_lossy_oracle():
    proto = cnn_residual()
    result = onnxopt.compile(proto, opt_level=2, prune=0.3, calibration_data=_calib())
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    rec = next(p for p in result.report["passes"] if p["name"] == "prune")
    d = rec["details"]
    assert d["macs_removed_fraction"] >= 0.3
    assert 0.0 < d["fidelity"]["held_out_min_cosine"] <= 1.0
    feeds = _calib(1)[0]
    got = run_ort(out, feeds)["y"]
    assert np.isfinite(got).all()
    # Physically smaller: fewer parameters.
    assert d["params_after"] < d["params_before"]


def test_prune_ffn_kept_multiple_of_round():
    proto = ffn()
    data = [{"x": RNG.normal(size=(1, 6, 16)).astype(np.float32)} for _ in range(30)]
    result = onnxopt.compile(proto, opt_level=2, prune=0.3, prune_round=8, calibration_data=data)
    d = next(p for p in result.report["passes"] if p["name"] == "prune")["details"]
    g = d["groups"][0]
    assert g["kept"] % 8 == 0 and g["kept"] < g["units"]
    # Reconstruction beats plain removal of the same units.
    assert d["fidelity"]["held_out_min_cosine"] > 0.5


def test_refit_improves_over_no_refit():
    """The refitted pruned FFN is closer to the dense one than the same units just zeroed."""
    proto = ffn()
    data = [{"x": RNG.normal(size=(1, 6, 16)).astype(np.float32)} for _ in range(60)]
    result = onnxopt.compile(proto, opt_level=2, prune=0.4, calibration_data=data)
    d = next(p for p in result.report["passes"] if p["name"] == "prune")["details"]
    assert d["fidelity"]["held_out_min_cosine"] > 0.8


def test_nothing_prunable_compiles_and_says_why():
    proto = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_f("x", [1, 4, 6, 6])], [_f("y", [1, 8, 6, 6])],
                   {"w": RNG.normal(size=(8, 4, 1, 1))})
    result = onnxopt.compile(proto, opt_level=2, prune=0.3, calibration_data=_calib(10, (1, 4, 6, 6)))
    d = next(p for p in result.report["passes"] if p["name"] == "prune")["details"]
    assert "nothing prunable" in d["result"] and "graph output" in d["result"]


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.2])
def test_prune_fraction_outside_range(bad):
    with pytest.raises(CompileError, match="strictly between 0 and 1"):
        onnxopt.compile(ffn(), prune=bad, calibration_data=[])


def test_cli_bad_inputs(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(ffn(), path)
    out = tmp_path / "o.onnx"
    assert main([str(path), "-o", str(out), "--prune", "1.2"]) == 1
    assert main([str(path), "-o", str(out), "--prune", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "strictly between 0 and 1" in err and "--prune needs --calibration-data" in err
    assert "Traceback" not in err and not out.exists()
    np.savez(tmp_path / "c.npz", x=RNG.normal(size=(20, 1, 6, 16)).astype(np.float32))
    assert main([str(path), "-o", str(out), "--prune", "0.6", "--prune-min-cosine", "0.99999999",
                 "--calibration-data", str(tmp_path / "c.npz")]) == 1
    err = capsys.readouterr().err
    assert "cannot be met" in err and "held-out min cosine" in err and not out.exists()
    # The 24 neurons go in chunks of 8: budgets 0.6 and 0.45 take the same two chunks, 0.3 and 0.15 the
    # same one; each allocation is tried (and listed) once.
    tried = re.findall(r"(\d+\.\d)% of MACs removed", err)
    assert len(tried) == len(set(tried)) == 2
    assert main([str(path), "-o", str(out), "--prune", "0.3", "--calibration-data", str(tmp_path / "c.npz")]) == 0
    assert "prune: " in capsys.readouterr().out and out.exists()


# ---- kernels --------------------------------------------------------------------------------


def test_im2col_matches_conv():
    x = RNG.normal(size=(2, 3, 7, 6)).astype(np.float32)
    w = RNG.normal(size=(4, 3, 3, 2)).astype(np.float32)
    proto = _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 1, 1], strides=[2, 1])],
                   [_f("x", list(x.shape))], [_f("y", None)], {"w": w})
    y = run_ort(proto, {"x": x})["y"]
    cols = K.im2col(x, (3, 2), (2, 1), (1, 0, 1, 1), (1, 1))
    got = (cols @ w.reshape(4, -1).T).reshape(2, y.shape[2], y.shape[3], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def test_obs_cost_matches_brute_force_refit():
    a = RNG.normal(size=(500, 6)) @ RNG.normal(size=(6, 6))
    w = RNG.normal(size=(6, 3))
    g = a.T @ a / len(a)
    c = K.ObsConsumer(w, g, block=1)
    np.testing.assert_allclose(c.h0, np.linalg.inv(K._damped(g)), rtol=1e-5)  # kept for the refit's prior
    c.h = np.linalg.inv(g)  # undamped, to compare with exact least squares
    cost = c.remove([2])
    keep = [0, 1, 3, 4, 5]
    fit, *_ = np.linalg.lstsq(a[:, keep], a @ w, rcond=None)
    np.testing.assert_allclose(c.w[keep], fit, atol=1e-8)
    np.testing.assert_allclose(c.w[2], 0.0)
    # The refit's prior (one OBS step from the inverse) is the exact least squares over the kept rows.
    for rows in ([2], [1, 4]):
        kept = [r for r in range(6) if r not in rows]
        want, *_ = np.linalg.lstsq(a[:, kept], a @ w, rcond=None)
        got = K.compensated(w, np.linalg.inv(g), np.array(rows))
        np.testing.assert_allclose(got[kept], want, atol=1e-8)
        np.testing.assert_allclose(got[rows], 0.0)
    brute = np.sum((a[:, keep] @ fit - a @ w) ** 2) / len(a) / K.output_energy(w, g)
    assert cost == pytest.approx(brute, rel=1e-6)


def test_ridge_refit_recovers_exact_solution_with_bias():
    a = RNG.normal(size=(400, 5))
    w, b = RNG.normal(size=(5, 2)), RNG.normal(size=2)
    halves = [K.Gram(5, 2, bias=True), K.Gram(5, 2, bias=True)]
    for i, chunk in enumerate(np.array_split(a, 7)):  # streamed
        halves[i % 2].update(chunk, chunk @ w)
    w2, b2, d = K.ridge_refit(halves, b, np.zeros_like(w), np.zeros_like(b), grid=(1e-9,))
    np.testing.assert_allclose(w2, w, atol=1e-4)
    np.testing.assert_allclose(b2, b, atol=1e-4)


def test_ridge_strength_chosen_by_cross_validation():
    """With exact targets the weakest ridge wins; with few rows and noisy targets a stronger one does."""
    a = RNG.normal(size=(400, 5))
    w = RNG.normal(size=(5, 2))
    halves = [K.Gram(5, 2), K.Gram(5, 2)]
    for i, chunk in enumerate(np.array_split(a, 8)):
        halves[i % 2].update(chunk, chunk @ w)
    assert K.ridge_refit(halves, None, np.zeros_like(w), None)[2] == min(K.RIDGE_GRID)
    few = RNG.normal(size=(12, 40))
    prior = RNG.normal(size=(40, 3))
    noisy = [K.Gram(40, 3), K.Gram(40, 3)]
    for i in range(12):
        noisy[i % 2].update(few[i : i + 1], (few[i : i + 1] + RNG.normal(size=(1, 40)) * 3.0) @ prior)
    assert K.ridge_refit(noisy, None, prior, None)[2] > min(K.RIDGE_GRID)


def test_scale_fit_recovers_row_scales_and_bias():
    """When the target is the prior with rows scaled and a bias added, the scale candidate finds them."""
    a = RNG.normal(size=(300, 6))
    prior = RNG.normal(size=(6, 3))
    s, b = RNG.uniform(0.5, 1.5, size=6), RNG.normal(size=3)
    gram = K.Gram(6, bias=True)
    gram.update(a)
    y = a @ (prior * s[:, None]) + b
    target = np.concatenate([a, np.ones((300, 1))], 1).T @ y
    got = K._scale_fit(gram.aa, True, target, np.concatenate([prior, np.zeros((1, 3))]), damp=1e-12)
    np.testing.assert_allclose(got[:-1], prior * s[:, None], atol=1e-6)
    np.testing.assert_allclose(got[-1], b, atol=1e-6)


def test_measured_costs_follow_the_measured_curve():
    from onnxopt.passes.prune.structured import _measured_costs

    costs = [1.0, 1.0, 1.0, 1.0]
    # Measured error 0.1 after two chunks, 0.5 after four: the first two cost 0.05 each, the rest 0.2.
    got = _measured_costs(costs, [(2.0, 0.1), (4.0, 0.5)])
    np.testing.assert_allclose(got, [0.05, 0.05, 0.2, 0.2])
    # Noisy measurements never make a later chunk cheaper than an earlier one.
    assert np.all(np.diff(_measured_costs(costs, [(1.0, 0.3), (3.0, 0.2)])) >= 0)


def test_sample_roles_and_damping():
    """Every fifth sample is held out, the one before validates the sensitivity measurements, the rest
    fit the statistics, and so do the slots past the held-out and validation samples the pass keeps;
    a Gram with fewer rows than features is damped harder."""
    from onnxopt.passes.prune.structured import HELDOUT_SAMPLES, VALIDATION_SAMPLES, _role

    roles = [_role(k) for k in range(10)]
    assert roles.count("held") == 2 and roles.count("validation") == 2 and roles.count("fit") == 6
    roles = [_role(k) for k in range(640)]
    assert roles.count("held") == HELDOUT_SAMPLES and roles.count("validation") == VALIDATION_SAMPLES
    assert _role(5 * VALIDATION_SAMPLES + 3) == "fit" and _role(5 * VALIDATION_SAMPLES - 2) == "validation"
    assert _role(5 * HELDOUT_SAMPLES + 4) == "fit" and _role(5 * HELDOUT_SAMPLES - 1) == "held"
    # BERT at sequence 128 keeps 4 validation samples: the later validation slots fit.
    assert _role(5 * 4 + 3, validation=4) == "fit" and _role(5 * 3 + 3, validation=4) == "validation"
    few, many = K.Gram(100), K.Gram(100)
    few.update(RNG.normal(size=(10, 100)))
    many.update(RNG.normal(size=(1000, 100)))
    assert K.damping(few) == pytest.approx(10 * K.damping(many)) and K.damping(many) == K.DAMP


def test_allocate_reaches_budget_and_prefers_cheap():
    chunks = [[1, 1, 1], [1, 1, 1]]
    costs = [[1.0, 2.0, 3.0], [0.1, 0.2, 10.0]]

    def saving(removed):
        return float(sum(removed))

    assert K.allocate(chunks, costs, saving, 3.0) == [1, 2]


def test_chunk_sizes_keep_multiples():
    sizes = K.chunk_sizes(20, 1, 8, 2)
    assert sizes == [4, 8] and all((20 - sum(sizes[:i])) % 8 in (0, 4) for i in range(3))


def test_prune_then_int8_composes():
    data = [{"x": RNG.normal(size=(1, 6, 16)).astype(np.float32)} for _ in range(30)]
    result = onnxopt.compile(ffn(), opt_level=2, prune=0.3, int8=True, calibration_data=data, int8_min_cosine=0.0)
    names = [p["name"] for p in result.report["passes"] if p["fired"]]
    assert names.index("prune") < names.index("quantize_int8")
    onnx.checker.check_model(result.model, full_check=True)
    assert np.isfinite(run_ort(result.model, data[0])["y"]).all()
