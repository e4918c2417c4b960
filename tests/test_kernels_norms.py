"""The numpy references in kernels/norms.py and kernels/activations.py against onnxruntime's own
kernels: each kernel runs as a one-node model (onnxruntime optimizations off) on random inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxopt.kernels import activations, catalogue, norms

MS = "com.microsoft"


def run_node(op, inputs, n_outputs=1, domain="", opset=17, **attrs):
    """Run one node; `inputs` is a list of arrays or None (an omitted optional input)."""
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in zip(names, inputs)
        if a is not None
    ]
    outputs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op, names, outputs, domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "g", graph_inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports, ir_version=9)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {n: a for n, a in zip(names, inputs) if a is not None})


def close(got, want, rtol=2e-6):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(float(np.max(np.abs(want))), 1e-6)
    err = float(np.max(np.abs(got - want)))
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"


@pytest.fixture(params=[(2, 5, 32), (3, 7, 48), (6, 64)], ids=lambda s: "x".join(map(str, s)))
def case(request):
    rng = np.random.default_rng(sum(request.param))
    shape = request.param
    d = shape[-1]
    # An offset and a scale, so mean subtraction and the variance both matter.
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)
    skip = rng.standard_normal(shape).astype(np.float32)
    vec = lambda: rng.standard_normal(d).astype(np.float32)  # noqa: E731
    return x, skip, vec(), vec(), vec()


def test_layer_normalization_matches_onnx(case):
    x, _, gamma, beta, _ = case
    for eps in (1e-5, 1e-12):
        got = run_node("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=eps)[0]
        close(got, norms.layer_normalization(x, gamma, beta, eps))
    got = run_node("LayerNormalization", [x, gamma], axis=-1, epsilon=1e-5)[0]
    close(got, norms.layer_normalization(x, gamma, None, 1e-5))


def test_simplified_layer_normalization_matches_ort_and_rms_normalization(case):
    x, _, gamma, _, _ = case
    want = norms.simplified_layer_normalization(x, gamma, 1e-6)
    # onnxruntime registers SimplifiedLayerNormalization in the ai.onnx domain (a contrib op).
    close(run_node("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=1e-6)[0], want)
    close(run_node("RMSNormalization", [x, gamma], opset=23, axis=-1, epsilon=1e-6)[0], want)


def test_skip_layer_normalization_matches_ort(case):
    x, skip, gamma, beta, bias = case
    for args in ([x, skip, gamma, beta, bias], [x, skip, gamma, beta, None], [x, skip, gamma, None, None]):
        got = run_node("SkipLayerNormalization", args, n_outputs=4, domain=MS, epsilon=1e-5)
        want = norms.skip_layer_normalization(*args, epsilon=1e-5)
        for g, w in zip(got, want):
            close(g, w)


def test_skip_simplified_layer_normalization_matches_ort(case):
    x, skip, gamma, _, bias = case
    for args in ([x, skip, gamma, bias], [x, skip, gamma, None]):
        got = run_node("SkipSimplifiedLayerNormalization", args, n_outputs=4, domain=MS, epsilon=1e-6)
        out, _, inv_rms, total = norms.skip_simplified_layer_normalization(*args, epsilon=1e-6)
        close(got[0], out)
        close(got[2], inv_rms)
        close(got[3], total)


def test_self_skip_is_layer_norm_with_quarter_epsilon(case):
    """SkipLayerNormalization(x, x, eps=4e) == LayerNormalization(x, eps=e): the form -O3 emits
    for a LayerNorm without residual below opset 17 (see passes/layernorm.py)."""
    x, _, gamma, beta, _ = case
    got = run_node("SkipLayerNormalization", [x, x, gamma, beta], domain=MS, epsilon=4e-12)[0]
    close(got, norms.layer_normalization(x, gamma, beta, 1e-12))
    got = run_node("SkipSimplifiedLayerNormalization", [x, x, gamma], domain=MS, epsilon=4e-6)[0]
    close(got, norms.simplified_layer_normalization(x, gamma, 1e-6))


def test_gelu_family_matches_ort(case):
    x, _, _, _, bias = case
    x = x / 2  # mostly within the range where the approximations differ from each other
    close(run_node("Gelu", [x], domain=MS)[0], activations.gelu(x))
    close(run_node("Gelu", [x], opset=20)[0], activations.gelu(x))
    close(run_node("BiasGelu", [x, bias], domain=MS)[0], activations.bias_gelu(x, bias))
    close(run_node("FastGelu", [x, bias], domain=MS)[0], activations.fast_gelu(x, bias))
    close(run_node("FastGelu", [x], domain=MS)[0], activations.fast_gelu(x))
    close(run_node("Gelu", [x], opset=20, approximate="tanh")[0], activations.gelu_tanh(x))
    close(run_node("QuickGelu", [x], domain=MS, alpha=1.702)[0], activations.quick_gelu(x))
    close(run_node("QuickGelu", [x], domain=MS, alpha=1.0)[0], activations.quick_gelu(x, 1.0))


def test_gelu_references_are_different_functions():
    """The references are not interchangeable: the oracle can tell the approximations apart."""
    x = np.linspace(-4, 4, 101).astype(np.float32)
    exact = activations.gelu(x).astype(np.float64)
    assert np.max(np.abs(activations.fast_gelu(x) - exact)) > 1e-4
    assert np.max(np.abs(activations.quick_gelu(x) - exact)) > 1e-2
    assert float(activations.gelu(np.float32(1.0))) == pytest.approx(0.8413447460685429, rel=1e-7)


@pytest.mark.parametrize(
    "op, domain",
    [
        ("SkipLayerNormalization", MS),
        ("SkipSimplifiedLayerNormalization", MS),
        ("SimplifiedLayerNormalization", ""),
        ("Gelu", MS),
        ("BiasGelu", MS),
        ("FastGelu", MS),
    ],
)
def test_catalogue_names_these_references(op, domain):
    ref = catalogue.reference(op, domain)
    assert ref.__module__ in ("onnxopt.kernels.norms", "onnxopt.kernels.activations")
