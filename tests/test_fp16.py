"""--fp16 (passes/fp16.py): lossy, so not through the exact oracle. Each test checks one promise:
the interface is unchanged (unless --fp16-io), no Cast feeds a Cast, precision islands and ops the
target lacks in float16 run in float32, constants are clamped to the float16 range, tiny epsilons
keep their op in float32, and outputs stay finite with cosine >= 0.999 on zoo models, MiniLM on
real sentences and EfficientNet-Lite0 on real photos."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import verify
from onnxopt.bench import zoo
from onnxopt.bench.experiments import fp16_bench
from onnxopt.kernels import fp16_support
from onnxopt.kernels.fp16_support import to_fp16_array
from onnxopt.passes.fp16 import Fp16Pass

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT

def _fp16_record(result):
    return next(r for r in result.report["passes"] if r["name"] == "fp16")


def _adjacent_casts(graph: ir.Graph) -> list[str]:
    return [n.name for n in graph if n.op_type == "Cast" and n.inputs[0].producer() is not None
            and n.inputs[0].producer().op_type == "Cast"]


def _run(model: ir.Model, feeds: dict) -> dict:
    # onnxruntime with graph optimizations off, weights attached the way compile() verifies
    return verify.run(model, feeds)


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


# ---- zoo models: interface, Casts, fidelity ------------------------------------------------------

ZOO = [
    ("bert", dict(exporter="legacy", opset=14, attention="eager")),
    ("bert", dict(exporter="dynamo", attention="sdpa")),
    ("gpt2", dict(exporter="legacy", opset=14, attention="eager")),
    ("vit", dict(exporter="legacy", opset=14, attention="eager")),
    ("resnet", dict(exporter="legacy", opset=13)),
    ("mobilenetv2", dict(exporter="legacy", opset=14)),
]


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("name,kw", ZOO, ids=[f"{n}-{k['exporter']}" for n, k in ZOO])
def test_zoo_interface_casts_fidelity(name, kw, target):
    path = zoo.build(name, size="tiny", **kw)
    proto = onnx.load(str(path))  # weights in memory, so the checker sees them
    for level in (2, 3):
        res = onnxopt.compile(proto, opt_level=level, target=target, fp16=True)
        exact = onnxopt.compile(proto, opt_level=level, target=target)
        assert res.report["signature"] == exact.report["signature"]
        assert not _adjacent_casts(res.ir_model.graph)
        onnx.checker.check_model(res.model, full_check=True)
        ver = res.report["verification"]
        assert ver["ok"] and ver["lossy"]
        # Our own run on the zoo's realistic feeds, not only the synthesized ones.
        feeds = zoo.sample_feeds(name, path)
        ref, got = _run(exact.ir_model, feeds), _run(res.ir_model, feeds)
        for k in ref:
            assert got[k].dtype == ref[k].dtype and np.isfinite(got[k]).all()
            assert verify.cosine(ref[k], got[k]) >= 0.999, (name, level, target, k)
        if target == "cuda":
            # float16 compute: every MatMul/Conv/Gemm on a float16-capable target runs in float16
            for node in res.ir_model.graph:
                if node.op_type in ("MatMul", "Conv", "Gemm"):
                    assert node.outputs[0].dtype == F16, (name, node.name)


def test_islands_run_fp32_and_compute_fp16_on_cuda():
    # -O1 keeps the decomposed LayerNorm (ReduceMean, Pow) and Softmax of BERT.
    path = zoo.build("bert", size="tiny", exporter="legacy", opset=14, attention="eager")
    res = onnxopt.compile(str(path), opt_level=1, target="cuda", fp16=True)
    g = res.ir_model.graph
    islands = [n for n in g if n.op_type in ("Softmax", "ReduceMean", "Pow")]
    assert len(islands) >= 10
    for n in islands:
        assert all(v.dtype == F32 for v in n.outputs), n.name
        assert n.inputs[0].dtype == F32, n.name
    assert sum(n.outputs[0].dtype == F16 for n in g if n.op_type == "MatMul") == sum(
        1 for n in g if n.op_type == "MatMul")
    reasons = {d["reason"] for d in _fp16_record(res)["declined"]}
    assert "precision island: Softmax stays float32" in reasons
    assert not _adjacent_casts(g)


def test_fused_kernels_cpu_keeps_fp32_islands_cuda_fp16():
    """-O3: onnxruntime CPU has no float16 Attention/BiasGelu, CUDA has (catalogue)."""
    path = zoo.build("bert", size="tiny", exporter="legacy", opset=14, attention="eager")
    cpu = onnxopt.compile(str(path), opt_level=3, target="cpu", fp16=True)
    cuda = onnxopt.compile(str(path), opt_level=3, target="cuda", fp16=True)
    for res, want in ((cpu, F32), (cuda, F16)):
        fused = [n for n in res.ir_model.graph if n.op_type in ("Attention", "BiasGelu")]
        assert fused and all(n.outputs[0].dtype == want for n in fused)
    reasons = {d["reason"] for d in _fp16_record(cpu)["declined"]}
    assert "target cpu has no float16 kernel for com.microsoft.Attention" in reasons
    # CUDA: only the interface Casts remain (ids are int64, so just the two outputs' Casts)
    assert sum(n.op_type == "Cast" for n in cuda.ir_model.graph) <= 3


def test_file_about_half_and_idempotent(tmp_path):
    path = zoo.build("resnet", size="tiny", exporter="legacy", opset=13)
    res = onnxopt.compile(str(path), opt_level=2, target="cpu", fp16=True)
    exact = onnxopt.compile(str(path), opt_level=2, target="cpu")
    a, b = res.save(tmp_path / "h.onnx"), exact.save(tmp_path / "f.onnx")
    assert os.path.getsize(a) < 0.75 * os.path.getsize(b)  # tiny model: graph text is a large share

    def weight_bytes(m):
        return sum(v.const_value.nbytes for v in m.graph.initializers.values())

    assert weight_bytes(res.ir_model) <= 0.55 * weight_bytes(exact.ir_model)
    p = Fp16Pass()
    p.configure({"target": "cpu", "fp16_io": False})
    assert not p(res.ir_model).modified


# ---- hand-written models: preconditions ----------------------------------------------------------

def _weight(name, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal((n, n)) / 4).astype(np.float32), name)


def _sandwich(middle_nodes, inits, n=16):
    """x -> MatMul(w_in) -> h ... middle ... -> m -> MatMul(w_out) -> y: float16-capable compute on
    both sides, so the middle's precision is decided by the pass, not by the float32 interface."""
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"]), *middle_nodes,
             helper.make_node("MatMul", ["m", "w_out"], ["y"])]
    return _model(nodes, [_vi("x", [2, n])], [_vi("y", [2, n])], [_weight("w_in"), _weight("w_out", seed=1), *inits])


def test_op_the_target_lacks_stays_fp32():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", [2, 16])], [_vi("y", [2, 16])],
                   [_weight("w")])
    cpu = onnxopt.compile(model, opt_level=0, target="cpu", fp16=True)
    mm = next(n for n in cpu.ir_model.graph if n.op_type == "MatMul")
    assert mm.outputs[0].dtype == F32 and mm.inputs[0].dtype == F32 and mm.inputs[1].dtype == F32
    # the weight is still stored in float16 (file size) and cast to float32 for the fp32 kernel
    w = cpu.ir_model.graph.initializers["w"]
    assert w.dtype == F16 and mm.inputs[1].producer().op_type == "Cast"
    assert _fp16_record(cpu)["declined"][0]["reason"] == "target cpu has no float16 kernel for MatMul"
    assert not fp16_support.runs_fp16("cpu", "MatMul")
    assert cpu.report["verification"]["ok"]
    # the same op for cuda computes in float16
    cuda = onnxopt.compile(_sandwich([helper.make_node("Relu", ["h"], ["m"])], []), opt_level=0,
                           target="cuda", fp16=True)
    assert all(n.outputs[0].dtype == F16 for n in cuda.ir_model.graph if n.op_type in ("MatMul", "Relu"))
    # Erf has float16 on cuda, not on onnxruntime CPU: in a cuda-compiled sandwich it is fp16,
    # in a cpu-compiled one everything around it is fp32 (no Cast pair around a lone op)
    erf = _sandwich([helper.make_node("Erf", ["h"], ["m"])], [])
    res = onnxopt.compile(erf, opt_level=0, target="cpu", fp16=True)
    assert all(v.dtype == F32 for n in res.ir_model.graph if n.op_type != "Cast" for v in n.outputs)


def test_constant_clamped_to_fp16_range():
    big = numpy_helper.from_array(np.array([1e6] * 8 + [-1e6] * 7 + [np.inf], np.float32), "big")
    model = _sandwich([helper.make_node("Min", ["h", "big"], ["m"])], [big])
    res = onnxopt.compile(model, opt_level=0, target="cuda", fp16=True)
    arr = res.ir_model.graph.initializers["big"].const_value.numpy()
    assert arr.dtype == np.float16
    np.testing.assert_array_equal(arr, np.array([65504] * 8 + [-65504] * 7 + [np.inf], np.float16))
    assert next(n for n in res.ir_model.graph if n.op_type == "Min").outputs[0].dtype == F16
    np.testing.assert_array_equal(to_fp16_array(np.array([1e6, -1e9], np.float32)), [65504, -65504])
    assert np.isnan(to_fp16_array(np.array([np.nan], np.float32))[0])
    assert res.report["verification"]["ok"]


def test_tiny_epsilon_keeps_its_op_fp32():
    eps = numpy_helper.from_array(np.array(1e-12, np.float32), "eps")
    middle = [helper.make_node("Mul", ["h", "h"], ["sq"]), helper.make_node("Add", ["sq", "eps"], ["v"]),
              helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Div", ["h", "s"], ["m"])]
    res = onnxopt.compile(_sandwich(middle, [eps]), opt_level=0, target="cuda", fp16=True)
    add = next(n for n in res.ir_model.graph if n.op_type == "Add")
    assert add.outputs[0].dtype == F32
    assert res.ir_model.graph.initializers["eps"].dtype == F32
    reasons = [d["reason"] for d in _fp16_record(res)["declined"]]
    assert any("flushes to 0" in r for r in reasons)
    assert not _adjacent_casts(res.ir_model.graph)
    # an epsilon float16 represents does not hold the op back
    eps = numpy_helper.from_array(np.array(1e-3, np.float32), "eps")
    res = onnxopt.compile(_sandwich(middle, [eps]), opt_level=0, target="cuda", fp16=True)
    assert next(n for n in res.ir_model.graph if n.op_type == "Add").outputs[0].dtype == F16


def test_adjacent_casts_in_the_input_are_fused():
    # x -> Cast(float16) -> Cast(float32) -> MatMul: the pair cancels
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["f", "w"], ["y"])]
    model = _model(nodes, [_vi("x", [2, 16])], [_vi("y", [2, 16])], [_weight("w")])
    res = onnxopt.compile(model, opt_level=0, target="cuda", fp16=True)
    g = res.ir_model.graph
    assert not _adjacent_casts(g)
    assert sum(n.op_type == "Cast" for n in g) == 2  # x -> float16 and y -> float32 only


def test_graph_output_also_read_inside():
    # h is a graph output and the next MatMul's input (onnxconverter-common mistypes this case on
    # MiniLM's last_hidden_state -> pooler): the fp16 h feeds the MatMul, a Cast gives the fp32 output
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = _model(nodes, [_vi("x", [2, 16])], [_vi("h", [2, 16]), _vi("y", [2, 16])],
                   [_weight("w1"), _weight("w2", seed=1)])
    res = onnxopt.compile(model, opt_level=0, target="cuda", fp16=True)
    g = res.ir_model.graph
    assert [(v.name, v.dtype) for v in g.outputs] == [("h", F32), ("y", F32)]
    relu = next(n for n in g if n.op_type == "Relu")
    assert relu.inputs[0].dtype == F16 and relu.inputs[0].producer().op_type == "MatMul"
    assert res.report["verification"]["ok"]


def test_fp16_io_changes_interface_on_purpose():
    path = zoo.build("cnn", size="tiny", exporter="legacy", opset=13)
    res = onnxopt.compile(str(path), opt_level=2, target="cuda", fp16=True, fp16_io=True)
    sig = res.report["signature"]
    assert sig["inputs"][0]["dtype"] == str(F16) and sig["outputs"][0]["dtype"] == str(F16)
    assert res.report["verification"]["ok"]
    assert not any(n.op_type == "Cast" for n in res.ir_model.graph)  # float16 end to end
    # on cpu the same model keeps fp32 compute: the float16 interface is cast at the edges
    res = onnxopt.compile(str(path), opt_level=2, target="cpu", fp16=True, fp16_io=True)
    assert res.report["signature"]["inputs"][0]["dtype"] == str(F16)
    assert res.report["verification"]["ok"]


def test_control_flow_declined():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "t", [], [_vi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "e", [], [_vi("e", [2])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    zero = numpy_helper.from_array(np.array(0, np.float32), "zero")
    model = _model(nodes, [_vi("x", [2])], [_vi("y", [2])], [zero])
    res = onnxopt.compile(model, opt_level=0, target="cuda", fp16=True)
    rec = _fp16_record(res)
    assert rec["fired"] == 0 and "control flow" in rec["declined"][0]["reason"]


# ---- real weights ----------------------------------------------------------------------------------

def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / m.sum(1)


def test_minilm_real_sentences():
    feeds = fp16_bench.sentence_feeds()  # 20 varied English sentences, the checkpoint's tokenizer
    path = zoo.build("minilm")
    exact = onnxopt.compile(str(path), opt_level=3, target="cpu", verify_outputs=False)
    ref = fp16_bench.mean_pool(_run(exact.ir_model, feeds)["last_hidden_state"], feeds["attention_mask"])
    sizes = []
    for level, target in ((2, "cpu"), (3, "cpu"), (3, "cuda")):
        res = onnxopt.compile(str(path), opt_level=level, target=target, fp16=True)
        assert res.report["verification"]["ok"]
        got = _run(res.ir_model, feeds)["last_hidden_state"]
        assert got.dtype == np.float32 and np.isfinite(got).all()
        emb = fp16_bench.mean_pool(got, feeds["attention_mask"])
        cos = [verify.cosine(a, b) for a, b in zip(ref, emb)]
        assert min(cos) >= 0.999, (level, target, min(cos))
        sizes.append(sum(v.const_value.nbytes for v in res.ir_model.graph.initializers.values()))
    full = sum(v.const_value.nbytes for v in exact.ir_model.graph.initializers.values())
    assert max(sizes) <= 0.51 * full


def test_efficientnet_real_photos():
    x = fp16_bench.photo_batch(fp16_bench.PHOTOS[:4])  # astronaut, coffee, chelsea, rocket
    path = zoo.build("efficientnet_lite0")
    exact = onnxopt.compile(str(path), opt_level=2, target="cpu", verify_outputs=False)
    ref = _run(exact.ir_model, {"input": x})["logits"]
    for target in ("cpu", "cuda"):
        res = onnxopt.compile(str(path), opt_level=2, target=target, fp16=True)
        got = _run(res.ir_model, {"input": x})["logits"]
        assert np.isfinite(got).all()
        assert min(verify.cosine(a, b) for a, b in zip(ref, got)) >= 0.999
        assert (ref.argmax(1) == got.argmax(1)).all()
        assert not _adjacent_casts(res.ir_model.graph)


@pytest.mark.parametrize("op,domain,n_in,expect", [
    ("MatMul", "", 2, "cast"), ("Reshape", "", 0, "fp16"), ("Softmax", "", 1, "cast"),
    ("SkipLayerNormalization", "com.microsoft", 3, "fp16"), ("Attention", "com.microsoft", 3, "cast"),
])
def test_cpu_support_data_matches_a_fresh_probe(op, domain, n_in, expect):
    from onnx import TensorProto as TP

    ins = [TP.FLOAT16, TP.INT64] if op == "Reshape" else [TP.FLOAT16] * n_in
    attrs = {"num_heads": 2} if op == "Attention" else {}
    assert fp16_bench._probe_one(op, domain, ins, [TP.FLOAT16], attrs) == expect
    assert fp16_support.runs_fp16("cpu", op, domain) == (expect == "fp16")
