"""The int8 fidelity control's machinery: one evaluation graph in which each activation's range (as
a scale and zero point) and each layer's int8/float choice is a fed input, the validation samples
batched where the model allows, and the margin rules the control enforces (onnxopt.kernels.fidelity).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import calibration, fidelity, quantize
from onnxopt.passes._lib.graph import constant_array
from onnxopt.passes.int8.layers import RANK_SAMPLES, Layer, _new_initializer, _session


@dataclasses.dataclass
class _Act:
    """An activation to quantize during the fidelity control (before its Q/DQ nodes exist)."""
    value: ir.Value
    layers: list[Layer]
    hist: calibration.AbsHistogram
    chosen_by: str = ""


MARGIN_RULES = {
    "cosine": f"every validation sample's cosine >= target and the {fidelity.MARGIN_QUANTILE:g} quantile of a "
              "log-normal fitted to their 1 - cosine >= target",
    "rel-error": f"every validation sample's relative error <= target and the {fidelity.MARGIN_QUANTILE:g} quantile "
                 "of a log-normal fitted to them <= target",
    "top1": "top-1 agreement on the validation rows (near-ties apart) >= target and the agreement predicted "
            "from the float top-2 margins of all samples and the largest validation logit RMS error >= target",
}


class _Samples:
    """Kept samples (feed, float reference outputs) run through a session: as one batch when every
    input has a dynamic first axis and the samples agree on the other axes (much faster than one run
    per sample), else one run per sample."""

    def __init__(self, samples: list, model: ir.Model, batch: bool = True) -> None:
        self.feeds = [f for f, _ in samples]
        self.refs = [r for _, r in samples]
        self.names = list(self.refs[0]) if self.refs else []
        self.batch: dict | None = None
        self.sizes: list[int] = []
        dynamic = all(v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int)
                      for v in model.graph.inputs if v.const_value is None)
        if batch and dynamic and len(self.feeds) > 1:
            keys = list(self.feeds[0])
            same = all(list(f) == keys and all(
                f[k].ndim >= 1 and f[k].shape[1:] == self.feeds[0][k].shape[1:] and f[k].dtype == self.feeds[0][k].dtype
                for k in keys) for f in self.feeds)
            if same and keys:
                self.sizes = [f[keys[0]].shape[0] for f in self.feeds]
                if all([f[k].shape[0] for k in keys] == [n] * len(keys) for f, n in zip(self.feeds, self.sizes)):
                    self.batch = {k: np.concatenate([f[k] for f in self.feeds]) for k in keys}

    def head(self, n: int) -> "_Samples":
        """The first n samples, batched alike."""
        out = object.__new__(_Samples)
        out.feeds, out.refs, out.names, out.sizes = self.feeds[:n], self.refs[:n], self.names, self.sizes[:n]
        out.batch = None if self.batch is None else {k: v[: sum(out.sizes)] for k, v in self.batch.items()}
        return out

    def run(self, session, extra: dict | None = None) -> list[dict]:
        extra = extra or {}
        if self.batch is not None:
            outs = session.run(self.names, {**self.batch, **extra})
            if all(o.ndim and o.shape[0] == sum(self.sizes) for o in outs):
                cuts = np.cumsum(self.sizes)[:-1]
                parts = [np.split(o, cuts) for o in outs]
                return [dict(zip(self.names, row)) for row in zip(*parts)]
            self.batch = None  # the model does not keep samples apart along the first axis
        return [dict(zip(self.names, session.run(self.names, {**f, **extra}))) for f in self.feeds]

    def summary(self, metric, session, extra: dict | None = None) -> dict:
        return metric.summary(self.refs, self.run(session, extra))


class _EvalGraph:
    """The model in one onnxruntime session (optimizations off) where every quantization choice is a
    fed scalar mask, so the fidelity control runs the validation part once per configuration
    instead of building a session per configuration:

        d_a = DQ(Q(x_a; s_a, z_a)) - x_a       one per activation; its range's scale and zero point fed
        layer(x_a + m_l d_a, W + m_l (W' - W), b + m_l (b' - b))   m_l: the layer is quantized

    (W' the dequantized int8 weight, b' the corrected bias). With m_l = 1 this is
    what the QDQ graph means (up to the int32 rounding of the bias, far below the activation step);
    with m_l = 0 it is the float layer. The graph is rewritten only while the session is built."""

    PREFIX = "onnxopt.int8_eval"

    def __init__(self, model, layers, activations, candidates, weight_q, act_type, make_session, samples: _Samples,
                 metric, progress) -> None:
        self.layers, self.activations, self.candidates = layers, activations, candidates
        self.samples, self.metric, self.progress = samples, metric, progress
        self.runs = 0
        self.summaries: dict = {}
        self.time_s = {"build": 0.0, "ranking": 0.0, "decisions": 0.0}
        t0 = time.perf_counter()
        graph = model.graph
        nodes: list[ir.Node] = []
        masks: list[ir.Value] = []
        inits: list[ir.Value] = []
        p = self.PREFIX

        def op(op_type, ins, name, dtype=ir.DataType.FLOAT):
            node = ir.Node("", op_type, ins, name=name, num_outputs=1)
            node.outputs[0].name = name
            if dtype is not None:
                node.outputs[0].dtype = dtype
            return node

        def mask(name):
            v = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
            graph.inputs.append(v)
            masks.append(v)
            return v

        def const(array, name):
            v = _new_initializer(graph, array, name)
            inits.append(v)
            return v

        def scalar(name, dtype):
            v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape([]))
            graph.inputs.append(v)
            masks.append(v)
            return v

        zp_type = ir.DataType.UINT8 if act_type == "uint8" else ir.DataType.INT8
        first = next(iter(graph))
        delta = {}
        for i, act in enumerate(activations):
            # The range is chosen by feeding its scale and zero point: one Q/DQ per activation.
            x = act.value
            s, z = scalar(f"{p}.a{i}.scale", ir.DataType.FLOAT), scalar(f"{p}.a{i}.zero_point", zp_type)
            q = op("QuantizeLinear", [x, s, z], f"{p}.a{i}.q", dtype=None)
            dq = op("DequantizeLinear", [q.outputs[0], s, z], f"{p}.a{i}.dq")
            d = op("Sub", [dq.outputs[0], x], f"{p}.a{i}.d")
            group = [q, dq, d]
            if x.producer() is None:
                graph.insert_before(first, group)
            else:
                graph.insert_after(x.producer(), group)
            nodes += group
            delta[id(x)] = d.outputs[0]
        self.params = {id(a): [quantize.activation_params(lo, hi, act_type) for _, (lo, hi) in candidates[id(a)]]
                       for a in activations}
        dws: dict[int, ir.Value] = {}
        for i, layer in enumerate(layers):
            m = mask(f"{p}.l{i}")
            key = id(layer.w)
            if key not in dws:
                dws[key] = const((weight_q[key][2] - constant_array(layer.w)).astype(np.float32), f"{p}.l{i}.dw")
            mx = op("Mul", [m, delta[id(layer.x)]], f"{p}.l{i}.mx")
            ax = op("Add", [layer.x, mx.outputs[0]], f"{p}.l{i}.x")
            mw = op("Mul", [m, dws[key]], f"{p}.l{i}.mw")
            aw = op("Add", [layer.w, mw.outputs[0]], f"{p}.l{i}.w")
            group = [mx, ax, mw, aw]
            if layer.b_float is not None:
                db = const((layer.b_float - constant_array(layer.b)).astype(np.float32), f"{p}.l{i}.db")
                mb = op("Mul", [m, db], f"{p}.l{i}.mb")
                ab = op("Add", [layer.b, mb.outputs[0]], f"{p}.l{i}.b")
                group += [mb, ab]
            graph.insert_before(layer.node, group)
            nodes += group
            layer.node.replace_input_with(0, ax.outputs[0])
            layer.node.replace_input_with(1, aw.outputs[0])
            if layer.b_float is not None:
                layer.node.replace_input_with(2, ab.outputs[0])
        try:
            self.session = _session(model, make_session)
        finally:
            for layer in layers:
                layer.node.replace_input_with(0, layer.x)
                layer.node.replace_input_with(1, layer.w)
                if layer.b_float is not None:
                    layer.node.replace_input_with(2, layer.b)
            for node in reversed(nodes):
                graph.remove(node, safe=True)
            for v in masks:
                graph.inputs.remove(v)
            for v in inits:
                graph.initializers.pop(v.name)
        # The batched run must give the per-sample float outputs with every mask 0, else one run per sample.
        if samples.batch is not None:
            try:
                got = samples.run(self.session, self.masks({id(a): -1 for a in activations}, {}))
                if not all(_close(r[n], g[n]) for r, g in zip(samples.refs, got) for n in samples.names):
                    samples.batch = None
            except Exception:  # noqa: BLE001 - e.g. a Reshape that pins the batch: run per sample
                samples.batch = None
        self.rank_samples = samples.head(RANK_SAMPLES)
        self.time_s["build"] = time.perf_counter() - t0

    def masks(self, choice: dict[int, int], on: dict[int, bool]) -> dict[str, np.ndarray]:
        p, feed = self.PREFIX, {}
        for i, act in enumerate(self.activations):
            scale, zp = self.params[id(act)][max(choice[id(act)], 0)]
            feed[f"{p}.a{i}.scale"] = np.array(scale, dtype=np.float32)
            feed[f"{p}.a{i}.zero_point"] = np.array(zp)
        for i, layer in enumerate(self.layers):
            feed[f"{p}.l{i}"] = np.array(float(on.get(id(layer), False)), dtype=np.float32)
        return feed

    def _run(self, samples: _Samples, choice, on) -> list[dict]:
        self.runs += 1
        self.progress("fidelity control", self.runs, None)
        return samples.run(self.session, self.masks(choice, on))

    def summary(self, choice, on) -> dict:
        """The metric's figures on the kept validation samples (a decision; remembered per configuration)."""
        key = (tuple(choice[id(a)] for a in self.activations), tuple(bool(on.get(id(lyr))) for lyr in self.layers))
        if key not in self.summaries:
            t = time.perf_counter()
            self.summaries[key] = self.metric.summary(self.samples.refs, self._run(self.samples, choice, on))
            self.time_s["decisions"] += time.perf_counter() - t
        return self.summaries[key]

    def loss(self, choice, on) -> float:
        """The ranking loss on the first RANK_SAMPLES of them."""
        t = time.perf_counter()
        out = self.metric.loss(self.rank_samples.refs, self._run(self.rank_samples, choice, on))
        self.time_s["ranking"] += time.perf_counter() - t
        return out

    def close(self) -> None:
        self.session = None


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-3) -> bool:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        return False
    scale = np.linalg.norm(a64.ravel())
    return bool(np.linalg.norm((a64 - b64).ravel()) <= rtol * max(scale, 1e-30))
