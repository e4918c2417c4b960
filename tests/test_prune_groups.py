"""Dependency groups of the new kinds: attention heads of unfused exports (legacy and dynamo,
eager and SDPA, merged QKV after -O2), com.microsoft MultiHeadAttention heads, Concat and Split
of channels. For each: zeroing the units gives the same outputs as removing them, the prune pass
through the oracle, and a negative test per decline reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import onnxopt
from onnxopt.bench import zoo
from onnxopt.passes.prune import groups as G

from oracle import assert_rewrite, op_counts, run_ort
from test_prune import _f, _groups, _model, _zero_equals_remove

RNG = np.random.default_rng(1)

# (exporter, opset, attention, level): the forms the zoo's tiny BERT comes in, as -O0 / -O1 / -O2 leave them.
FORMS = [("legacy", 14, "eager", 0), ("legacy", 14, "eager", 1), ("legacy", 13, "sdpa", 1), ("legacy", 17, "sdpa", 2),
         ("dynamo", 18, "eager", 1), ("dynamo", 18, "sdpa", 1), ("dynamo", 18, "sdpa", 2), ("legacy", 14, "eager", 2)]


def _bert(exporter, opset, attention, level):
    proto = onnx.load(zoo.build("bert", size="tiny", exporter=exporter, opset=opset, attention=attention))
    feeds = zoo.sample_feeds("bert", proto)
    return onnxopt.compile(proto, opt_level=level, verify_outputs=False).model, feeds


def _heads(groups):
    return [g for g in groups if g.kind == "heads"]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f[0]}{f[1]}-{f[2]}-O{f[3]}")
def test_unfused_heads_zero_equals_remove(form):
    proto, feeds = _bert(*form)
    _, groups = _groups(proto, feeds)
    heads = _heads(groups)
    assert len(heads) == 2 and all(not g.reason and g.units == 4 and g.unit == 16 for g in heads), \
        [(g.describe(), g.reason) for g in groups]
    # Q, K and V produced together (three MatMuls, or one merged MatMul split in three), Wo consumes.
    assert all(len(g.producers) in (1, 3) and len(g.consumers) == 1 and g.core for g in heads)
    _zero_equals_remove(proto, feeds, "heads")


# ---- hand-written attention blocks ------------------------------------------------------------

D, H, S = 16, 4, 5
DH = D // H


def _dead_heads_weights(dead=(1, 3)):
    w = {n: RNG.normal(size=(D, D)) / 3 for n in ("wq", "wk", "wv", "wo")}
    w.update({n: RNG.normal(size=D) / 3 for n in ("bq", "bk", "bv", "bo")})
    for h in dead:  # heads whose output projection rows are zero: removing them changes nothing
        w["wo"][h * DH:(h + 1) * DH] = 0.0
    return w


def unfused_attention(dynamic=True, dead=(1, 3), head_entry=None):
    """Q/K/V MatMul+Add -> Reshape [B, S, H, dh] (target a Concat of Shape/Gather pieces and
    constants, like torch's legacy export with dynamic axes) -> Transpose -> scores -> Softmax ->
    context -> Transpose -> Reshape [B, S, H*dh] -> output MatMul+Add."""
    w = _dead_heads_weights(dead)
    w.update({"i0": np.array(0), "i1": np.array(1), "ax": np.array([0]), "heads": np.array([H]),
              "dh": np.array([DH]), "hid": np.array([D]), "scale": np.array(1 / np.sqrt(DH))})
    ints = {"i0", "i1", "ax", "heads", "dh", "hid"}
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Gather", ["shp", "i0"], ["b"], axis=0),
             helper.make_node("Gather", ["shp", "i1"], ["s"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax"], ["bu"]), helper.make_node("Unsqueeze", ["s", "ax"], ["su"]),
             helper.make_node("Concat", ["bu", "su", head_entry or "heads", "dh"], ["split_shape"], axis=0),
             helper.make_node("Concat", ["bu", "su", "hid"], ["merge_shape"], axis=0)]
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}m"]),
                  helper.make_node("Add", [f"{n}m", f"b{n}"], [f"{n}a"]),
                  helper.make_node("Reshape", [f"{n}a", "split_shape"], [f"{n}r"])]
    nodes += [helper.make_node("Transpose", ["qr"], ["qt"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["vr"], ["vt"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qt", "kt"], ["sc"]),
              helper.make_node("Mul", ["sc", "scale"], ["scs"]),
              helper.make_node("Softmax", ["scs"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ct"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ct", "merge_shape"], ["cm"]),
              helper.make_node("MatMul", ["cm", "wo"], ["om"]),
              helper.make_node("Add", ["om", "bo"], ["y"])]
    dims = ["batch", "seq", D] if dynamic else [1, S, D]
    graph = helper.make_graph(nodes, "g", [_f("x", dims)], [_f("y", dims)],
                              [onnx.numpy_helper.from_array(a.astype(np.int64 if k in ints else np.float32), k)
                               for k, a in w.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _x(n=1):
    return [{"x": RNG.normal(size=(1, S, D)).astype(np.float32)} for _ in range(n)]


def test_unfused_attention_zero_equals_remove_dynamic_shapes():
    _zero_equals_remove(unfused_attention(), _x()[0], "heads")


def test_explicit_head_counts_rewritten():
    """Targets Concat(B, S, 4, dh) and Concat(B, S, 16) (explicit counts, not -1): the head
    entries become the kept counts, in private Concats; the -1 forms of the exporters need none."""
    proto = unfused_attention()
    feeds = _x()[0]
    model, groups = _groups(proto, feeds)
    (g,) = _heads(groups)
    G.apply(model.graph, g, G.unit_channels(g, [0, 2, 3]))
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    targets = [[int(np.ravel(G.constant_array(v))[0]) if G.constant_array(v) is not None else None
                for v in node.inputs[1].producer().inputs] for node in g.reshapes]
    assert sorted(targets, key=len) == [[None, None, 12]] + [[None, None, 3, DH]] * 3, targets
    assert run_ort(out, feeds)["y"].shape == (1, S, D)


def test_prune_unfused_heads_oracle():
    """Half of the heads are dead (zero output rows): pruning half the MACs removes exactly them,
    and the pruned model computes what the original does (the oracle, at -O0 with prune)."""
    proto = unfused_attention()
    out = assert_rewrite("prune", proto, _x()[0], idempotent=False, prune=0.5, prune_round=1,
                         calibration_data=_x(20))
    w = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert sorted(a.shape for k, a in w.items() if a.ndim == 2) == sorted([(D, D // 2)] * 3 + [(D // 2, D)])
    assert any(a.tolist() == [2] for a in w.values() if a.dtype == np.int64 and a.ndim == 1)


def test_declines_head_count_computed():
    """The head entry of the split target is computed from the input's shape (x's hidden size
    divided by 4): it does not follow the kept heads, and it cannot be rewritten."""
    proto = unfused_attention(head_entry="hc")
    extra = [helper.make_node("Gather", ["shp", "i2"], ["hidden"], axis=0),
             helper.make_node("Div", ["hidden", "four"], ["hq"]),
             helper.make_node("Unsqueeze", ["hq", "ax"], ["hc"])]
    for k, n in enumerate(extra):
        proto.graph.node.insert(3 + k, n)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(2, np.int64), "i2"),
                                    onnx.numpy_helper.from_array(np.array(4, np.int64), "four")])
    _, groups = _groups(proto, _x()[0])
    reasons = [g.reason for g in groups if g.reason]
    assert any("entry 2 of its target is computed by Unsqueeze" in r for r in reasons), reasons
    assert not _heads([g for g in groups if not g.reason])


def test_declines_head_count_read_as_a_value():
    """Shape(Q)[1] (the head count) scales the scores: it would change with the kept heads."""
    proto = unfused_attention()
    g = proto.graph
    nodes = list(g.node)
    mul = next(n for n in nodes if n.op_type == "Mul")
    extra = [helper.make_node("Shape", ["qt"], ["qshape"]), helper.make_node("Gather", ["qshape", "i1"], ["hcount"], axis=0),
             helper.make_node("Cast", ["hcount"], ["hf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Mul", ["scs0", "hf"], ["scs"])]
    mul.output[0] = "scs0"
    at = nodes.index(mul) + 1
    del g.node[:]
    g.node.extend(nodes[:at] + extra + nodes[at:])
    _, groups = _groups(proto, _x()[0])
    reasons = [x.reason for x in groups if x.reason]
    assert any("the shape of 'qt' is read by" in r and "would change with the units" in r for r in reasons), reasons


def test_declines_softmax_over_heads():
    proto = unfused_attention()
    next(n for n in proto.graph.node if n.op_type == "Softmax").attribute[0].i = 1
    _, groups = _groups(proto, _x()[0])
    assert any("Softmax" in x.reason and "normalizes over the units' axis" in x.reason for x in groups if x.reason)


def test_declines_channels_contracted_with_an_activation():
    """x W -> m; m m^T contracts m's channels with an activation: not heads, nothing to slice."""
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Transpose", ["m"], ["mt"], perm=[0, 2, 1]),
                    helper.make_node("MatMul", ["m", "mt"], ["y"])],
                   [_f("x", [1, S, D])], [_f("y", [1, S, S])], {"w": RNG.normal(size=(D, 8))})
    _, groups = _groups(proto, _x()[0])
    assert any("contracts the channels with an activation" in x.reason for x in groups if x.reason)


# ---- com.microsoft MultiHeadAttention ------------------------------------------------------------


def mha(dead=(1, 3), attention_bias=False):
    """Q/K/V MatMuls -> MultiHeadAttention(q, k, v, packed bias [3D]) -> output MatMul + Add."""
    w = _dead_heads_weights(dead)
    w["bqkv"] = np.concatenate([w.pop("bq"), w.pop("bk"), w.pop("bv")])
    ins = ["qm", "km", "vm", "bqkv"] + (["", "ab"] if attention_bias else [])
    if attention_bias:
        w["ab"] = RNG.normal(size=(1, H, S, S))
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}m"]) for n in "qkv"]
    nodes += [helper.make_node("MultiHeadAttention", ins, ["ctx"], domain="com.microsoft", num_heads=H),
              helper.make_node("MatMul", ["ctx", "wo"], ["om"]), helper.make_node("Add", ["om", "bo"], ["y"])]
    return _model(nodes, [_f("x", [1, S, D])], [_f("y", [1, S, D])], w, ms=True)


def test_mha_zero_equals_remove():
    _zero_equals_remove(mha(), _x()[0], "heads")


def test_mha_of_an_export_zero_equals_remove():
    """-O3 without the packed-QKV stage: merged Q/K/V MatMul -> Split -> MultiHeadAttention."""
    proto = onnx.load(zoo.build("bert", size="tiny", exporter="legacy", opset=14, attention="eager"))
    feeds = zoo.sample_feeds("bert", proto)
    proto = onnxopt.compile(proto, opt_level=3, disable=["attention_qkv"], verify_outputs=False).model
    assert op_counts(proto)["com.microsoft.MultiHeadAttention"] == 2
    _, groups = _groups(proto, feeds)
    assert [(g.units, len(g.mha)) for g in _heads(groups) if not g.reason] == [(4, 1), (4, 1)]
    _zero_equals_remove(proto, feeds, "heads")


def test_prune_mha_heads_oracle():
    out = assert_rewrite("prune", mha(), _x()[0], idempotent=False, prune=0.5, prune_round=1, calibration_data=_x(20))
    node = next(n for n in out.graph.node if n.op_type == "MultiHeadAttention")
    assert helper.get_attribute_value(node.attribute[0]) == 2
    bias = {t.name: t for t in out.graph.initializer}[node.input[3]]
    assert list(bias.dims) == [3 * D // 2]


def test_declines_mha_with_attention_bias():
    _, groups = _groups(mha(attention_bias=True), _x()[0])
    reasons = [g.reason for g in groups if g.reason]
    assert any("has an attention bias or past/present state" in r for r in reasons), reasons
    assert not [g for g in groups if not g.reason and g.kind == "heads"]


# ---- attention fusion after pruning heads ------------------------------------------------------------


def test_attention_fuses_on_layers_with_different_head_counts(tmp_path):
    """Prune a raw export at -O1 so its two layers keep different head counts (dead heads, zero
    output rows: layer 0 heads 1 and 3, layer 1 head 2, are the cheapest), save it, compile that
    at -O3: one Attention per layer with the heads it kept, and the same outputs."""
    proto = onnx.load(zoo.build("bert", size="tiny", exporter="legacy", opset=14, attention="eager"))
    inits = {t.name: t for t in proto.graph.initializer}
    wo = [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and "attention/output/dense" in n.name]
    for name, dead in zip(wo, [(1, 3), (2,)]):
        a = onnx.numpy_helper.to_array(inits[name]).copy()
        for h in dead:
            a[h * 16:(h + 1) * 16] = 0.0
        inits[name].CopyFrom(onnx.numpy_helper.from_array(a, name))
    data = [zoo.sample_feeds("bert", proto, seed=s) for s in range(20)]
    result = onnxopt.compile(proto, opt_level=1, prune=0.16, prune_round=1, calibration_data=data)
    d = next(p for p in result.report["passes"] if p["name"] == "prune")["details"]
    kept = [g["kept"] for g in d["groups"] if g["kind"] == "heads"]
    assert kept == [2, 3], d["groups"]
    path = tmp_path / "pruned.onnx"
    onnx.save(result.model, path)
    fused = assert_rewrite(3, str(path), data[0], expect_ops={"com.microsoft.Attention": 2}, rtol=1e-3)
    heads = [helper.get_attribute_value(a) for n in fused.graph.node if n.op_type == "Attention"
             for a in n.attribute if a.name == "num_heads"]
    assert heads == kept


# ---- Concat, Split and grouped Conv of channels ------------------------------------------------------

IMG = (1, 3, 6, 6)


def _img(n=1):
    return [{"x": RNG.normal(size=IMG).astype(np.float32)} for _ in range(n)]


def _conv_tail(cin, dead, name="c"):
    """The consumer Conv cin -> 4 (3x3) with the input channels `dead` zeroed in its weight."""
    w = RNG.normal(size=(4, cin, 3, 3)) / 3
    w[:, list(dead)] = 0.0
    return helper.make_node("Conv", [name, "wt"], ["y"], pads=[1, 1, 1, 1]), w


def concat_model(dead=(1, 7, 12, 13), twice=False):
    """Conv 3 -> 6 and Conv 3 -> 10, Concat along channels (offsets 0 and 6), Relu, Conv 16 -> 4."""
    tail, wt = _conv_tail(12 if twice else 16, dead)
    inits = {"wa": RNG.normal(size=(6, 3, 3, 3)), "ba": RNG.normal(size=6), "wb": RNG.normal(size=(10, 3, 1, 1)), "wt": wt}
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wb"], ["b"]),
             helper.make_node("Concat", ["a", "a"] if twice else ["a", "b"], ["cat"], axis=1),
             helper.make_node("Relu", ["cat"], ["c"]), tail]
    return _model(nodes, [_f("x", list(IMG))], [_f("y", [1, 4, 6, 6])], inits)


def split_model(opset=17, dead=(2, 9, 10, 15), consumers=1, direct=False):
    """Conv 3 -> 16, Split [8, 8] (attribute before opset 13, input, or num_outputs at 18),
    Relu and Sigmoid, Concat in the other order, Conv 16 -> 4 (or each half to its own Conv)."""
    tail, wt = _conv_tail(16, dead)
    inits = {"wp": RNG.normal(size=(16, 3, 3, 3)), "bp": RNG.normal(size=16), "wt": wt, "w1": RNG.normal(size=(4, 8, 1, 1)),
             "w2": RNG.normal(size=(4, 8, 1, 1))}
    split = (helper.make_node("Split", ["p"], ["s1", "s2"], axis=1, split=[8, 8]) if opset < 13 else
             helper.make_node("Split", ["p"], ["s1", "s2"], axis=1, num_outputs=2) if opset >= 18 else
             helper.make_node("Split", ["p", "sizes"], ["s1", "s2"], axis=1))
    if 13 <= opset < 18:
        inits["sizes"] = np.array([8, 8])
    nodes = [helper.make_node("Conv", ["x", "wp", "bp"], ["p"], pads=[1, 1, 1, 1]), split,
             helper.make_node("Relu", ["s1"], ["r1"]), helper.make_node("Sigmoid", ["s2"], ["r2"])]
    if consumers == 1:
        nodes += [helper.make_node("Concat", ["r2", "r1"], ["c"], axis=1), tail]
        if direct:  # a second consumer reads p in its own channel order
            inits["wd"] = RNG.normal(size=(4, 16, 1, 1))
            tail.output[0] = "y0"
            nodes += [helper.make_node("Conv", ["p", "wd"], ["yd"]), helper.make_node("Add", ["y0", "yd"], ["y"])]
    else:
        nodes += [helper.make_node("Conv", ["r1", "w1"], ["y1"]), helper.make_node("Conv", ["r2", "w2"], ["y2"]),
                  helper.make_node("Add", ["y1", "y2"], ["y"])]
    m = _model(nodes, [_f("x", list(IMG))], [_f("y", [1, 4, 6, 6])], inits, opset=opset)
    for t in m.graph.initializer:
        if t.name == "sizes":
            t.CopyFrom(onnx.numpy_helper.from_array(np.array([8, 8], np.int64), "sizes"))
    return m


def grouped_model(groups=4, per_out=2, dead=(2, 3, 6, 7), cut=False):
    """Conv 3 -> 8, Relu, grouped Conv 8 -> groups * per_out (3x3, `groups` groups), Relu,
    Conv -> 4; with `cut`, a second grouped Conv of 2 groups of 3 after one of 3 groups of 2."""
    c = groups * per_out
    tail, wt = _conv_tail(c, dead)
    inits = {"wa": RNG.normal(size=(8 if not cut else 6, 3, 1, 1)), "wg": RNG.normal(size=(c, (8 if not cut else 6) // groups, 3, 3)),
             "bg": RNG.normal(size=c), "wt": wt}
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wg", "bg"], ["g"], group=groups, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["g"], ["c"] if not cut else ["g1"]), tail]
    if cut:
        inits["wg2"] = RNG.normal(size=(6, 3, 1, 1))
        nodes.insert(4, helper.make_node("Conv", ["g1", "wg2"], ["c"], group=2))
    return _model(nodes, [_f("x", list(IMG))], [_f("y", [1, 4, 6, 6])], inits)


def test_concat_zero_equals_remove():
    _, groups = _groups(concat_model(), _img()[0])
    (g,) = [g for g in groups if not g.reason]
    assert g.kind == "concatenated channels" and g.units == 16 and len(g.producers) == 2
    _zero_equals_remove(concat_model(), _img()[0], "concatenated channels")


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_zero_equals_remove(opset):
    _zero_equals_remove(split_model(opset), _img()[0], "concatenated channels")


@pytest.mark.parametrize("groups,per_out", [(4, 2), (8, 2)])
def test_grouped_conv_zero_equals_remove(groups, per_out):
    """Groups of 2 inputs and 2 outputs, and depthwise with multiplier 2: whole groups go."""
    proto = grouped_model(groups, per_out)
    _, found = _groups(proto, _img()[0])
    (g,) = [g for g in found if not g.reason]
    assert g.units == groups and g.depthwise
    _zero_equals_remove(proto, _img()[0], "channels")


@pytest.mark.parametrize("model,kind", [(concat_model, "Concat"), (split_model, "Split"), (grouped_model, "grouped")])
def test_prune_channel_kinds_oracle(model, kind):
    """A quarter (half for grouped Conv: two of four groups) of the channels are dead: pruning as
    many MACs removes exactly them, outputs unchanged (oracle at -O0 with prune)."""
    frac = 0.5 if kind == "grouped" else 0.25
    out = assert_rewrite("prune", model(), _img()[0], idempotent=False, prune=frac, prune_round=1, calibration_data=_img(20))
    w = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    tail = next(n for n in out.graph.node if n.output[0] == "y")
    assert w[tail.input[1]].shape[1] == (4 if kind == "grouped" else 12)
    if kind == "grouped":
        conv = next(n for n in out.graph.node if n.op_type == "Conv" and len(n.input) == 3)
        assert [a.i for a in conv.attribute if a.name == "group"] == [2]
    if kind == "Split":
        split = next(n for n in out.graph.node if n.op_type == "Split")
        # The consumer reads Concat(s2, s1): its dead inputs 2, 9, 10, 15 are s1's 1, 2, 7 and s2's 2.
        assert w[split.input[1]].tolist() == [5, 7]


@pytest.mark.parametrize("model,reason", [
    (lambda: concat_model(dead=(), twice=True), "reads a unit twice"),
    (lambda: split_model(consumers=2), "reads 8 of the group's 16 units (e.g. one side of a Split)"),
    (lambda: grouped_model(groups=3, per_out=2, dead=(), cut=True), "cut through its groups"),
    (lambda: split_model(direct=True), "reads the units in another order than"),
])
def test_declines_channel_kinds(model, reason):
    _, groups = _groups(model(), _img()[0])
    reasons = [g.reason for g in groups if g.reason]
    assert any(reason in r for r in reasons), reasons
    assert not [g for g in groups if not g.reason and g.units > 1 and g.kind != "channels"]


# ---- more exports at -O1: GPT-2 (causal, Conv1D), ViT, ResNet with BatchNormalization, the dynamo CNN
# (BatchNormalization, and x.view(n, -1) -> Linear: a Reshape flattening the channels) ------------------------


@pytest.mark.parametrize("name,exporter,opset,level,kind", [
    ("gpt2", "legacy", 14, 1, "heads"), ("gpt2", "dynamo", 18, 1, "heads"), ("gpt2", "dynamo", 18, 3, "heads"),
    ("vit", "dynamo", 18, 1, "heads"), ("resnet", "legacy", 13, 1, "channels"), ("resnet", "legacy", 13, 1, "residual stream"),
    ("cnn", "dynamo", 18, 1, "channels"), ("mobilenetv2", "legacy", 14, 1, "channels")])
def test_more_exports_zero_equals_remove(name, exporter, opset, level, kind):
    """GPT-2 -O3 fuses into an Attention without a bias input; MobileNetV2 at -O1 has TF-style Pad
    before every depthwise Conv and BatchNormalization after it."""
    proto = onnx.load(zoo.build(name, size="tiny", exporter=exporter, opset=opset, attention="eager"))
    feeds = zoo.sample_feeds(name, proto)
    proto = onnxopt.compile(proto, opt_level=level, verify_outputs=False).model
    _zero_equals_remove(proto, feeds, kind)


def test_declines_pad_of_the_channels():
    proto = _model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Pad", ["c", "pads"], ["p"]),
                    helper.make_node("Conv", ["p", "w2"], ["y"])],
                   [_f("x", list(IMG))], [_f("y", [1, 4, 6, 6])],
                   {"w": RNG.normal(size=(8, 3, 1, 1)), "w2": RNG.normal(size=(4, 10, 1, 1))})
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "pads"))
    _, groups = _groups(proto, _img()[0])
    assert groups[0].reason == "Pad '' pads the channel axis"


def test_batchnorm_passes_channels_and_declines_computed_statistics():
    """-O1 keeps BatchNormalization: per channel, its four constants sliced. A scale that is a
    graph input cannot be sliced: declined."""
    def model(scale_input):
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
                 helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
                 helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"])]
        inits = {"w": RNG.normal(size=(8, 3, 1, 1)), "s": RNG.normal(size=8), "b": RNG.normal(size=8),
                 "m": RNG.normal(size=8), "v": RNG.uniform(0.5, 2, size=8), "w2": RNG.normal(size=(4, 8, 1, 1))}
        inputs = [_f("x", list(IMG))] + ([_f("s", [8])] if scale_input else [])
        if scale_input:
            del inits["s"]
        return _model(nodes, inputs, [_f("y", [1, 4, 6, 6])], inits)

    _zero_equals_remove(model(False), _img()[0], "channels")
    _, groups = _groups(model(True), {**_img()[0], "s": np.ones(8, np.float32)})
    assert [g.reason for g in groups][0] == "scale, bias, mean and variance of BatchNormalization '' is not a constant"


def test_declines_layernorm_over_the_channels():
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["m"]),
                    helper.make_node("LayerNormalization", ["m", "s", "b"], ["n"], axis=-1),
                    helper.make_node("MatMul", ["n", "w2"], ["y"])],
                   [_f("x", [1, S, D])], [_f("y", [1, S, D])],
                   {"w": RNG.normal(size=(D, 8)), "s": np.ones(8), "b": np.zeros(8), "w2": RNG.normal(size=(8, D))})
    _, groups = _groups(proto, _x()[0])
    assert [g.reason for g in groups][0] == "LayerNormalization '' normalizes over the channel axis"
