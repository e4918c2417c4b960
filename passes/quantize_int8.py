"""Post-training int8 quantization: QDQ around Conv, ConvTranspose, MatMul and Gemm.

Rewrite, for a layer y = op(x, W[, b]) with constant W (and b):

    y = op(DQ(Q(x, s_x, z_x)), DQ(W_q, s_w, axis=c)[, DQ(b_q, s_x * s_w)])

* W_q = round(W / s_w) per output channel c, symmetric int8 in [-127, 127], or [-63, 63] with
  reduce_range: the default for the ``cpu`` target on an x86 host without VNNI, whose u8 x s8
  kernels saturate a 16-bit pair sum with 8-bit weights (kernels/quantize.py; the caller decides,
  ``int8_reduce_range``);
* x: an activation range [lo, hi] from calibration (``entropy`` — TensorRT's KL threshold on a
  2048-bin |x| histogram —, ``minmax`` or ``percentile``, math in ``onnxopt.kernels.calibration``);
  u8 with a zero point for the ``cpu``/``generic`` targets (x86 integer kernels are u8 x s8),
  s8 symmetric for ``cuda``/``tensorrt``; one Q/DQ pair per activation, shared by its quantized
  consumers;
* b (Conv, Gemm): int32 with scale s_x * s_w, what onnxruntime's QDQ Conv fusion requires (a
  channel whose bias would overflow, a dead channel left by BatchNorm folding, gets a larger s_w);
  corrected for the weight rounding: b - (DQ(W_q) - W) E[x], E[x] the per-channel mean of the
  layer's input over the calibration data (kernels/quantize.py, weight_bias_correction).

onnxruntime (graph optimizations on) turns DQ -> MatMul into MatMulIntegerToFloat and
DQ -> Conv -> Q into QLinearConv; with optimizations off the QDQ graph runs as float ops on the
dequantized values, which is how fidelity is measured here and in verification.

Preconditions (else the layer stays float and is declined with the reason): W constant (not an
overridable initializer), float32 activation, Gemm without transA, ConvTranspose with group 1,
opset >= 13 (per-axis QuantizeLinear). MatMuls of two activations (attention scores) stay float.
A com.microsoft Attention kernel holds its Q/K/V projection internally: it is not QDQ-able and
stays float (declined, reported). With --int8, -O3's attention fusion therefore emits
MultiHeadAttention and leaves the (merged) projection outside as a MatMul, which is quantized. LayerNorm, Softmax, GELU and residual additions are never quantized (they are not
candidates).

Fidelity control: the float reference outputs of the calibration samples are kept (for at most
``FIT_SAMPLES`` of them). If the quantized model's worst cosine against them is below
``int8_min_cosine``, each activation's range is chosen between the method's and the observed
one by the output error with only its layers quantized (clipping outliers is right for most
tensors and ruinous for some), each layer's own error is measured (1 - cosine with only that
layer quantized), and the worst layers go back to float, one by one, until the target holds. Every
fifth sample is held out of the histograms and of that selection; the fidelity on the held-out
samples is what the report states. Per-layer errors are measured on the QDQ graph run as float
ops (what the QDQ graph means); the fidelity checks for the ``cpu`` target run onnxruntime with its
graph optimizations on (``make_kernel_session``), i.e. the integer kernels the user will run, so a
kernel that differs from the QDQ meaning on this host cannot pass unseen. The report gives both.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import calibration, quantize
from onnxopt.passes import calibration_data
from onnxopt.passes.base import OptPass
from onnxopt.passes.calibration_data import CalibrationError
from onnxopt.passes._lib.graph import constant_array
from onnxopt.kernels.metrics import cosine
from onnxopt.passes.registry import register

LAYER_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Every HOLDOUT_EVERY-th sample is held out of the histograms to measure fidelity on.
HOLDOUT_EVERY = 5
# Samples whose feeds and float outputs are kept: for layer selection and for the held-out figure.
FIT_SAMPLES = 16
HELDOUT_SAMPLES = 32
MS_FUSED_WITH_PROJECTIONS = ("Attention", "QAttention", "PackedAttention")


@dataclasses.dataclass
class Layer:
    node: ir.Node
    x: ir.Value
    w: ir.Value
    axis: int  # per-channel axis of W
    b: ir.Value | None = None
    # Filled in when the QDQ nodes exist:
    x_dq: ir.Value | None = None
    w_dq: ir.Value | None = None
    b_dq: ir.Value | None = None
    error: float | None = None  # 1 - cosine with only this layer quantized
    # int32 bias state: the (corrected) float bias, the weight scales, the code and scale initializers.
    b_float: np.ndarray | None = None
    w_scale: np.ndarray | None = None
    b_codes: tuple[ir.Value, ir.Value] | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    def enable(self, on: bool) -> None:
        self.node.replace_input_with(0, self.x_dq if on else self.x)
        self.node.replace_input_with(1, self.w_dq if on else self.w)
        if self.b is not None and self.b_dq is not None:
            self.node.replace_input_with(2, self.b_dq if on else self.b)


@dataclasses.dataclass
class Activation:
    """A quantized activation: its statistics, its shared scale / zero point and the layers it feeds."""
    value: ir.Value
    hist: calibration.AbsHistogram
    scale: ir.Value
    zero_point: ir.Value
    act_type: str
    layers: list[Layer]
    range: tuple[float, float] = (0.0, 0.0)
    chosen_by: str = ""

    def set_range(self, lo: float, hi: float) -> bool:
        """Quantize over [lo, hi]: new scale and zero point, and the int32 biases that use the scale.
        False (nothing changed) when a bias would not fit in int32 at that scale."""
        scale, zp = quantize.activation_params(lo, hi, self.act_type)
        biases = []
        for layer in self.layers:
            if layer.b_codes is not None:
                qb = quantize.bias_int32(layer.b_float, scale, layer.w_scale)
                if qb is None:
                    return False
                biases.append((layer.b_codes, qb))
        self.scale.const_value = ir.tensor(np.array(scale, dtype=np.float32), name=self.scale.name)
        self.zero_point.const_value = ir.tensor(np.array(zp), name=self.zero_point.name)
        for (bq_val, sb_val), (bq, sb) in biases:
            bq_val.const_value = ir.tensor(bq, name=bq_val.name)
            sb_val.const_value = ir.tensor(sb, name=sb_val.name)
        self.range = (float(lo), float(hi))
        return True

    def describe(self) -> dict:
        scale = float(self.scale.const_value.numpy())
        lo, hi = self.range
        return {"scale": scale, "zero_point": int(self.zero_point.const_value.numpy()), "range": [lo, hi],
                "observed": [self.hist.min, self.hist.max], "threshold": max(-lo, hi)}


def _new_initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _session(model: ir.Model, make_session):
    """make_session on the model as it stands, unused initializers (float weights of quantized
    layers, int8 weights of float ones, kept to toggle layers) left out: onnxruntime drops unused
    initializers and then fails to find them among the external ones."""
    graph = model.graph
    unused = [(n, v) for n, v in graph.initializers.items()
              if not v.uses() and not v.is_graph_input() and not v.is_graph_output()]
    for name, _ in unused:
        graph.initializers.pop(name)
    try:
        return make_session(model)
    finally:
        for _, value in unused:
            graph.register_initializer(value)


def _channel_bias(layer: "Layer") -> np.ndarray | None:
    """The layer's constant bias if it is per output channel (what per-channel scales can match)."""
    if layer.b is None:
        return None
    b = constant_array(layer.b)
    w = constant_array(layer.w)
    return b if b is not None and w is not None and b.shape == (w.shape[layer.axis],) else None


def _depthwise(layer: "Layer") -> bool:
    """A Conv with one input channel per group."""
    w = layer.w.shape
    return layer.node.op_type == "Conv" and w is not None and len(w) > 1 and w[1] == 1 and \
        layer.node.attributes.get_int("group", 1) > 1


def _float_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in outputs.items() if np.issubdtype(v.dtype, np.floating)}


# order 10: before other lossy passes (an fp16 cast first would leave no float32 layer to quantize).
@register("quantize_int8", level=0, stage="lossy", flag="int8", order=10)
class QuantizeInt8Pass(OptPass):
    """Post-training int8 QDQ quantization of Conv/ConvTranspose/MatMul/Gemm, calibrated, fidelity-controlled."""

    def __init__(self) -> None:
        super().__init__()
        self.options: dict = {}
        self.details: dict = {}

    def configure(self, options: dict) -> None:
        self.options = dict(options)

    # ---- candidates -------------------------------------------------------------------------

    def _candidates(self, model: ir.Model) -> list[Layer]:
        layers = []
        for node in model.graph:
            if node.domain == "com.microsoft" and node.op_type in MS_FUSED_WITH_PROJECTIONS:
                self.decline("quantize_int8", node, "fused com.microsoft Attention holds its Q/K/V projection "
                             "internally (not QDQ-able); it stays float — compile the unfused model with --int8, which "
                             "keeps the projection outside the attention kernel")
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in LAYER_OPS:
                continue
            layer = self._layer(node)
            if layer is not None:
                layers.append(layer)
        return layers

    def _layer(self, node: ir.Node) -> Layer | None:
        rule = f"quantize_{node.op_type}"
        inputs = list(node.inputs)
        if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
            self.decline(rule, node, "missing input")
            return None
        x, w = inputs[0], inputs[1]
        if x.producer() is not None and x.producer().op_type == "DequantizeLinear":
            self.decline(rule, node, "already quantized (input comes from DequantizeLinear)")
            return None
        # Conv, MatMul and Gemm take x and W of one type T: an untyped x with a float32 W is float32.
        if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
            self.decline(rule, node, f"activation is {x.dtype}, not float32")
            return None
        if constant_array(x) is not None:
            self.decline(rule, node, "first input is a constant (constant folding's job)")
            return None
        wa = constant_array(w)
        if wa is None:
            reason = ("both operands are activations (e.g. attention scores); kept float"
                      if not w.is_graph_input() or w.const_value is None else
                      "weight is a graph input (overridable initializer); kept float")
            self.decline(rule, node, reason)
            return None
        if wa.dtype != np.float32:
            self.decline(rule, node, f"weight is {wa.dtype}, not float32")
            return None
        if x.dtype is None:
            x.dtype = ir.DataType.FLOAT
        b = inputs[2] if len(inputs) > 2 else None
        if node.op_type == "MatMul":
            if wa.ndim != 2:
                self.decline(rule, node, f"weight has rank {wa.ndim}; per-channel QDQ needs a 2-D MatMul weight")
                return None
            return Layer(node, x, w, axis=1)
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0):
                self.decline(rule, node, "Gemm with transA=1")
                return None
            axis = 0 if node.attributes.get_int("transB", 0) else 1
            if b is not None and constant_array(b) is None:
                self.decline(rule, node, "bias is not a constant")
                return None
            return Layer(node, x, w, axis=axis, b=b)
        # Conv / ConvTranspose
        if wa.ndim < 3:
            self.decline(rule, node, f"weight has rank {wa.ndim}")
            return None
        if b is not None and constant_array(b) is None:
            self.decline(rule, node, "bias is not a constant")
            return None
        if node.op_type == "ConvTranspose":
            if node.attributes.get_int("group", 1) != 1:
                self.decline(rule, node, "ConvTranspose with group > 1 (output channels are not one weight axis)")
                return None
            return Layer(node, x, w, axis=1, b=b)
        return Layer(node, x, w, axis=0, b=b)

    # ---- calibration ------------------------------------------------------------------------

    def _calibrate(self, model: ir.Model, acts: list[ir.Value], mean_axes: dict[str, int], source, make_session):
        """|x| histograms of `acts`, per-channel sums of those in `mean_axes` (name -> channel axis),
        kept samples for fidelity; one streamed pass over the data."""
        graph = model.graph
        inputs = {v.name for v in graph.inputs}
        out_names = [v.name for v in graph.outputs]
        added = [v for v in acts if v.name not in inputs and not v.is_graph_output()]
        for v in added:
            graph.outputs.append(v)
        try:
            session = _session(model, make_session)
        finally:
            for v in added:
                graph.outputs.remove(v)
        # Activations that are graph inputs come from the feed; those that are outputs already are fetched once.
        act_names = [v.name for v in acts if v.name not in inputs and v.name not in out_names]
        hists = {v.name: calibration.AbsHistogram() for v in acts}
        sums: dict[str, list] = {name: [0.0, 0] for name in mean_axes}  # channel sum, count per channel
        fit, heldout = [], []
        n_calib = n_held = 0
        t_run = 0.0
        t0 = time.perf_counter()
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm ships with the dependencies
            tqdm = None
        stream = iter(source)
        if tqdm is not None:
            stream = tqdm(stream, total=source.count, desc="onnxopt: calibrating", unit="sample",
                          file=sys.stderr, disable=None, leave=False)
        for k, feed in enumerate(stream):
            held = k % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
            names = out_names if held else out_names + act_names
            t = time.perf_counter()
            values = session.run(names, feed)
            t_run += time.perf_counter() - t
            outs = dict(zip(names, values))
            ref = _float_outputs({n: outs[n] for n in out_names})
            if held:
                n_held += 1
                if len(heldout) < HELDOUT_SAMPLES:
                    heldout.append((feed, ref))
                continue
            n_calib += 1
            for v in acts:
                data = feed[v.name] if v.name in inputs else outs[v.name]
                try:
                    hists[v.name].update(data)
                except ValueError:
                    raise CalibrationError(f"calibration sample {k} gives NaN or infinite values at {v.name!r}") from None
                if v.name in mean_axes:
                    channels = np.moveaxis(np.asarray(data, dtype=np.float64), mean_axes[v.name], -1)
                    channels = channels.reshape(-1, channels.shape[-1])
                    sums[v.name][0] += channels.sum(axis=0)
                    sums[v.name][1] += channels.shape[0]
            if len(fit) < FIT_SAMPLES:
                fit.append((feed, ref))
        if n_calib < 1 or n_held < 1:
            raise CalibrationError(f"calibration data has {n_calib + n_held} sample(s), {calibration_data.MIN_SAMPLES} needed")
        timing = {"total_s": round(time.perf_counter() - t0, 4), "inference_s": round(t_run, 4)}
        means = {name: total / count for name, (total, count) in sums.items()}
        return hists, means, fit, heldout, {"calibration": n_calib, "held_out": n_held}, timing

    # ---- fidelity ---------------------------------------------------------------------------

    def _fidelity(self, model: ir.Model, samples, make_session) -> list[float]:
        """Worst cosine over the float outputs, per sample."""
        session = _session(model, make_session)
        cosines = []
        for feed, ref in samples:
            got = dict(zip(list(ref), session.run(list(ref), feed)))
            cosines.append(min((cosine(ref[n], got[n]) for n in ref), default=1.0))
        return cosines

    def _choose_range(self, model: ir.Model, act: Activation, fit, make_session, method: str) -> None:
        """Quantize `act` over whichever of its candidate ranges (the method's, the observed one) gives
        the smaller output error with only its layers quantized; with one layer, that error is the
        layer's. KL and percentile thresholds clip outliers, which is right for most tensors and
        ruinous for a few (MiniLM's pooler input, clipped by KL at 1.17 of 5.77, cost 0.214 of cosine;
        over its observed range 0.0004), so the choice is measured, not assumed."""
        candidates = [(method, act.range)]
        observed = (min(act.hist.min, 0.0), max(act.hist.max, 0.0))
        if not np.allclose(observed, act.range, rtol=1e-3, atol=0.0):
            candidates.append(("minmax", observed))
        for layer in act.layers:
            layer.enable(True)
        errors = []
        for name, (lo, hi) in candidates:
            if act.set_range(lo, hi):
                errors.append((1.0 - min(self._fidelity(model, fit, make_session)), name, (lo, hi)))
        for layer in act.layers:
            layer.enable(False)
        error, name, (lo, hi) = min(errors, key=lambda e: e[0])
        act.set_range(lo, hi)
        act.chosen_by = name if len(errors) == 1 else f"{name}, output error {error:.3g} (" + ", ".join(
            f"{n} {e:.3g}" for e, n, _ in errors if n != name) + ")"
        if len(act.layers) == 1:
            act.layers[0].error = error

    # ---- the pass ---------------------------------------------------------------------------

    def apply(self, model: ir.Model) -> int:
        opts = self.options
        method = opts.get("calibration_method") or "entropy"
        if method not in calibration.METHODS:
            raise CalibrationError(f"unknown calibration method {method!r} (choose from {', '.join(calibration.METHODS)})")
        min_cos = float(opts.get("int8_min_cosine", 0.99))
        if not 0.0 <= min_cos <= 1.0:
            raise CalibrationError(f"--int8-min-cosine must be in [0, 1] (got {min_cos})")
        target = opts.get("target", "cpu")
        act_type = "int8" if target in ("cuda", "tensorrt") else "uint8"
        reduce_range = bool(opts.get("int8_reduce_range", False))
        make_session = opts.get("make_session")
        if make_session is None:
            raise CalibrationError("int8 quantization needs a session factory (options['make_session'])")
        # Fidelity is checked on what runs: onnxruntime's CPU integer kernels for the cpu target; other
        # targets' kernels are not on this machine, so there the QDQ meaning is what can be measured.
        check_session = (opts.get("make_kernel_session") if target == "cpu" else None) or make_session
        # Bad data fails here, before any graph work.
        source = calibration_data.open_source(opts.get("calibration_data"), model, opts.get("calibration_samples"))
        opset = model.opset_imports.get("", 0)
        graph = model.graph
        weight_type = "int8 per-channel symmetric" + (", 7-bit range [-63, 63] (reduce_range)" if reduce_range else "")
        self.details = {"method": method, "activation_type": act_type, "weight_type": weight_type,
                        "reduce_range": reduce_range, "min_cosine": min_cos,
                        "fidelity_measured_on": ("onnxruntime CPU integer kernels (graph optimizations on)"
                                                 if check_session is not make_session else
                                                 "the QDQ graph run as float ops (onnxruntime optimizations off)"), "layers": [], "excluded": [], "scales": {}, "bias_corrected": 0}
        if opset < 13:
            self.decline("quantize_int8", None, f"model opset {opset} < 13: per-channel QuantizeLinear needs opset 13")
            return 0
        layers = self._candidates(model)
        if not layers:
            return 0
        # Earlier passes may leave unused initializers for the finalize stage; onnxruntime drops them
        # before taking external initializers and then fails on the missing name, so drop them now.
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
                graph.initializers.pop(name)
        acts: list[ir.Value] = []
        for layer in layers:
            if all(layer.x is not a for a in acts):
                acts.append(layer.x)

        # Input channel means for bias correction: layers with a constant per-channel bias.
        mean_axes = {lyr.x.name: (1 if lyr.node.op_type == "Conv" else -1) for lyr in layers
                     if lyr.node.op_type in ("Conv", "Gemm") and _channel_bias(lyr) is not None}
        hists, means, fit, heldout, counts, timing = self._calibrate(model, acts, mean_axes, source, make_session)
        self.details["samples"] = counts
        self.details["calibration_time_s"] = timing

        # Activation Q/DQ pairs.
        act_dq: dict[int, tuple[ir.Value, float]] = {}
        activations: list[Activation] = []
        new_nodes: list[ir.Node] = []
        first = next(iter(graph))
        for v in acts:
            h = hists[v.name]
            lo, hi = calibration.activation_range(h, method, unsigned=act_type == "uint8")
            scale, zp = quantize.activation_params(lo, hi, act_type)
            s_val = _new_initializer(graph, np.array(scale, dtype=np.float32), f"{v.name}.int8_scale")
            z_val = _new_initializer(graph, np.array(zp), f"{v.name}.int8_zero_point")
            activations.append(Activation(v, h, s_val, z_val, act_type, [lyr for lyr in layers if lyr.x is v],
                                          (float(lo), float(hi)), chosen_by=method))
            q = ir.Node("", "QuantizeLinear", [v, s_val, z_val], name=f"{v.name}.QuantizeLinear", num_outputs=1)
            q.outputs[0].name = f"{v.name}.int8"
            dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s_val, z_val], name=f"{v.name}.DequantizeLinear",
                         num_outputs=1)
            dq.outputs[0].name = f"{v.name}.int8_dq"
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = v.shape
            producer = v.producer()
            if producer is None:
                graph.insert_before(first, [q, dq])
            else:
                graph.insert_after(producer, [q, dq])
            new_nodes += [q, dq]
            act_dq[id(v)] = (dq.outputs[0], float(scale))

        # Weight (and bias) DQs, one weight per initializer even if shared.
        weight_dq: dict[int, tuple[ir.Value, np.ndarray, np.ndarray]] = {}  # DQ output, scales, W'
        for layer in layers:
            layer.x_dq, s_x = act_dq[id(layer.x)]
            key = id(layer.w)
            ba = _channel_bias(layer)
            if key not in weight_dq:
                floor = quantize.bias_scale_floor(ba, s_x) if ba is not None else None
                wq, sw = quantize.per_channel_weight(constant_array(layer.w), layer.axis, min_scale=floor,
                                                     reduce_range=reduce_range and not _depthwise(layer))
                base = layer.w.name
                wq_val = _new_initializer(graph, wq, f"{base}.int8")
                sw_val = _new_initializer(graph, sw, f"{base}.int8_scale")
                wz_val = _new_initializer(graph, np.zeros(sw.shape, dtype=np.int8), f"{base}.int8_zero_point")
                dq = ir.Node("", "DequantizeLinear", [wq_val, sw_val, wz_val], name=f"{base}.DequantizeLinear",
                             attributes=[ir.AttrInt64("axis", layer.axis)], num_outputs=1)
                dq.outputs[0].name = f"{base}.int8_dq"
                dq.outputs[0].dtype = ir.DataType.FLOAT
                dq.outputs[0].shape = layer.w.shape
                graph.insert_before(layer.node, dq)
                new_nodes.append(dq)
                weight_dq[key] = (dq.outputs[0], sw, quantize.dequantize(wq, sw, 0, axis=layer.axis))
            layer.w_dq, sw, w_deq = weight_dq[key]
            if ba is not None:
                if layer.x.name in means:
                    # Subtract the mean output shift that rounding the weights causes.
                    group = layer.node.attributes.get_int("group", 1) if layer.node.op_type == "Conv" else 1
                    ba = ba - quantize.weight_bias_correction(constant_array(layer.w), w_deq, means[layer.x.name],
                                                              layer.axis, group)
                qb = quantize.bias_int32(ba, s_x, sw)
                if qb is not None:
                    self.details["bias_corrected"] += layer.x.name in means
                    bq, sb = qb
                    layer.b_float, layer.w_scale = ba, sw
                    base = f"{layer.b.name}.{layer.name}"
                    bq_val = _new_initializer(graph, bq, f"{base}.int32")
                    sb_val = _new_initializer(graph, sb, f"{base}.int32_scale")
                    bz_val = _new_initializer(graph, np.zeros(sb.shape, dtype=np.int32), f"{base}.int32_zero_point")
                    dq = ir.Node("", "DequantizeLinear", [bq_val, sb_val, bz_val], name=f"{base}.DequantizeLinear",
                                 attributes=[ir.AttrInt64("axis", 0)], num_outputs=1)
                    dq.outputs[0].name = f"{base}.int32_dq"
                    dq.outputs[0].dtype = ir.DataType.FLOAT
                    dq.outputs[0].shape = layer.b.shape
                    graph.insert_before(layer.node, dq)
                    new_nodes.append(dq)
                    layer.b_dq = dq.outputs[0]
                    layer.b_codes = (bq_val, sb_val)
            layer.enable(True)

        # Fidelity control on the calibration samples.
        cos = self._fidelity(model, fit, check_session)
        fit_min = min(cos)
        self.details["fidelity_all_quantized"] = {"calibration_min_cosine": fit_min}
        if fit_min < min_cos:
            for layer in layers:
                layer.enable(False)
            for act in activations:
                self._choose_range(model, act, fit, make_session, method)
            for layer in layers:
                if layer.error is None:  # an activation feeding several layers: measure each alone
                    layer.enable(True)
                    layer.error = 1.0 - min(self._fidelity(model, fit, make_session))
                    layer.enable(False)
            for layer in layers:
                layer.enable(True)
            fit_min = min(self._fidelity(model, fit, check_session))
            self.details["fidelity_ranges_chosen"] = {"calibration_min_cosine": fit_min}
            order = sorted(layers, key=lambda lyr: lyr.error, reverse=True)
            for layer in order:
                if fit_min >= min_cos:
                    break
                layer.enable(False)
                self.details["excluded"].append({"node": layer.name, "op": layer.node.op_type,
                                                 "error": layer.error})
                if any(lyr.node.inputs[1] is lyr.w_dq for lyr in layers):
                    fit_min = min(self._fidelity(model, fit, check_session))
                else:
                    fit_min = 1.0
        kept = [lyr for lyr in layers if lyr.node.inputs[1] is lyr.w_dq]
        for act in activations:
            self.details["scales"][act.value.name] = act.describe() | {"chosen_by": act.chosen_by}
        for layer in layers:
            self.details["layers"].append({"node": layer.name, "op": layer.node.op_type, "input": layer.x.name,
                                           "quantized": layer in kept, "error": layer.error})
        held = self._fidelity(model, heldout, check_session)
        self.details["fidelity"] = {
            "calibration_min_cosine": fit_min,
            "held_out_min_cosine": min(held),
            "held_out_mean_cosine": float(np.mean(held)),
            "held_out_samples": len(held),
        }
        if check_session is not make_session:
            self.details["fidelity"]["held_out_min_cosine_qdq_float"] = min(self._fidelity(model, heldout, make_session))
        self._remove_unused(graph, new_nodes, layers)
        self.details["quantized"] = len(kept)
        self.details["float"] = len(layers) - len(kept)
        return len(kept)

    @staticmethod
    def _remove_unused(graph: ir.Graph, new_nodes: list[ir.Node], layers: list[Layer]) -> None:
        for node in reversed(new_nodes):
            if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
        candidates = {id(v): v for v in [lyr.w for lyr in layers] + [lyr.b for lyr in layers if lyr.b is not None]}
        for node in new_nodes:
            for v in node.inputs:
                if v is not None and v.const_value is not None:
                    candidates[id(v)] = v
        for v in candidates.values():
            if not v.uses() and not v.is_graph_input() and not v.is_graph_output() and v.name in graph.initializers:
                graph.initializers.pop(v.name)
