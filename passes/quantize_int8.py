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

Fidelity control, decided on samples the thresholds never saw: the calibration data is split
(calibration_data.split_plan: a fixed 20 %, at least 4, every fifth sample; fewer than 8 samples are
not split and the report says so); histograms, ranges and bias means come from the calibration part
only, and the float outputs of (at most ``VALIDATION_KEPT``) validation samples are kept. If the
quantized model misses the target of ``int8_metric`` (cosine, top1 or rel-error, onnxopt.kernels.fidelity,
with its margin rule) on them, each activation's range is chosen between the method's and the observed
one by the output error with only its layers quantized (clipping outliers is right for most tensors
and ruinous for some), each layer's own error is measured, and the k worst layers go back to float,
k found by bisection. All of this runs in one onnxruntime session where every choice is a fed mask
(``_EvalGraph``), the validation samples batched into one run where the model allows, instead of a
session per choice (MiniLM's compile went from 63-78 s to about 40 s on 2 cores). Those runs are the
QDQ graph run as float ops; the final check for the ``cpu`` target runs onnxruntime with its graph
optimizations on (``make_kernel_session``), i.e. the integer kernels the user will run, and excludes
more layers if those miss the target, so a kernel that differs from the QDQ meaning on this host
cannot pass unseen. The report gives the figures on the validation and the calibration parts.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import calibration, fidelity, quantize
from onnxopt.passes import calibration_data
from onnxopt.passes.base import OptPass
from onnxopt.passes.calibration_data import CalibrationError
from onnxopt.passes._lib.graph import constant_array, session_of
from onnxopt.passes.registry import register

LAYER_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Samples whose feeds and float outputs are kept: validation samples for the fidelity control (its
# decisions and the figure reported), calibration samples for the calibration figure. The split itself
# is calibration_data.split_plan's.
VALIDATION_KEPT = 32
FIT_SAMPLES = 16
# Validation samples the ranking runs use (range choice, each layer's own error): an order needs fewer
# samples than a decision, and these runs are most of the control's time. Decisions use all kept.
RANK_SAMPLES = 4
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
    # Unused initializers (float weights of quantized layers, int8 weights of float ones, kept to
    # toggle layers) are left out of the session.
    return session_of(model, make_session)


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
        self.details: dict = {}

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

    def _calibrate(self, model: ir.Model, acts: list[ir.Value], mean_axes: dict[str, int], source, make_session,
                   plan: calibration_data.Split, top1: bool):
        """|x| histograms of `acts` and per-channel sums of those in `mean_axes` (name -> channel axis)
        over the calibration part; feeds and float outputs of (at most FIT_SAMPLES) calibration and
        (at most VALIDATION_KEPT) validation samples; for top1, every sample's float top-2 margins.
        One streamed pass over the data."""
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
        fit, validation, margins, ties = [], [], [], []
        n_calib = n_val = 0
        t_run = 0.0
        t0 = time.perf_counter()
        for k, feed in enumerate(source):
            held = plan.is_validation(k)
            names = out_names if held else out_names + act_names
            t = time.perf_counter()
            values = session.run(names, feed)
            t_run += time.perf_counter() - t
            outs = dict(zip(names, values))
            ref = _float_outputs({n: outs[n] for n in out_names})
            if top1 and ref:
                m, tie = fidelity.top2_margins(ref)
                margins.append(m)
                ties.append(tie)
            self._progress("calibrating", k + 1, source.count)
            if held:
                n_val += 1
                if len(validation) < VALIDATION_KEPT:
                    validation.append((feed, ref))
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
        if n_calib < 1 or n_calib + n_val < calibration_data.MIN_SAMPLES:
            raise CalibrationError(f"calibration data has {n_calib + n_val} sample(s), {calibration_data.MIN_SAMPLES} needed")
        timing = {"total_s": round(time.perf_counter() - t0, 4), "inference_s": round(t_run, 4)}
        means = {name: total / count for name, (total, count) in sums.items()}
        counts = {"calibration": n_calib, "validation": n_val, "validation_kept": len(validation)}
        if n_val == 0:
            counts["not_split"] = (f"{n_calib} sample(s) are too few to split (a validation part needs "
                                   f"{calibration_data.MIN_VALIDATION} of at least {2 * calibration_data.MIN_VALIDATION}): "
                                   "fidelity was controlled and measured on the calibration samples")
        elif n_val < calibration_data.MIN_VALIDATION:
            counts["small_validation"] = f"only {n_val} validation sample(s) (an iterable of unknown length: every fifth)"
        top = (np.concatenate(margins), np.concatenate(ties)) if margins else (None, None)
        return hists, means, fit, validation, counts, timing, top

    def _progress(self, stage: str, done: int, total: int | None) -> None:
        callback = self.options.get("progress")
        if callback is not None:
            callback(stage, done, total)

    # ---- fidelity control -------------------------------------------------------------------

    def _control(self, ev: "_EvalGraph", metric, layers: list[Layer], activations: list["Activation"],
                 candidates: dict[int, list], method: str) -> tuple[dict[int, int], list[Layer], int, dict]:
        """Range choice and layer exclusion on the validation part, through one session (`ev`).

        Returns (range choice per activation, layers ordered worst first, how many of them go back
        to float, the figures of the steps). Each step is one batched run of the validation samples."""
        choice = {id(a): 0 for a in activations}
        on = {id(lyr): True for lyr in layers}
        steps = {}
        first = ev.summary(choice, on)
        steps["all_quantized"] = first
        if first["ok"]:
            return choice, [], 0, steps
        order = self._rank(ev, metric, layers, activations, candidates, choice, method)
        on = {id(lyr): True for lyr in layers}
        ranged = ev.summary(choice, on)
        steps["ranges_chosen"] = ranged
        if ranged["ok"]:
            return choice, order, 0, steps

        def ok(k: int) -> bool:
            excluded = {id(lyr) for lyr in order[:k]}
            return ev.summary(choice, {id(lyr): id(lyr) not in excluded for lyr in layers})["ok"]

        # Smallest k for which excluding the k worst layers meets the target (all float always does):
        # a bisection, log2(layers) runs, not one run per excluded layer.
        lo, hi = 0, len(order)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        return choice, order, hi, steps

    def _rank(self, ev, metric, layers, activations, candidates, choice, method) -> list[Layer]:
        """Choose each activation's range (the method's or the observed one) by the output error with
        only its layers quantized, measure each layer's own error, and order the layers worst first.
        KL and percentile thresholds clip outliers, which is right for most tensors and ruinous for a
        few (MiniLM's pooler input, clipped by KL at 1.17 of 5.77, cost 0.214 of cosine; over its
        observed range 0.0004), so the choice is measured, not assumed."""
        off = {id(lyr): False for lyr in layers}
        for act in activations:
            alone = off | {id(lyr): True for lyr in act.layers}
            errors = []
            for j, (name, _) in enumerate(candidates[id(act)]):
                errors.append((ev.loss({**choice, id(act): j}, alone), j, name))
            error, j, name = min(errors)
            choice[id(act)] = j
            act.chosen_by = name if len(errors) == 1 else f"{name}, output error {error:.3g} (" + ", ".join(
                f"{n} {e:.3g}" for e, _, n in errors if n != name) + ")"
            if len(act.layers) == 1:
                act.layers[0].error = error
            else:  # an activation feeding several layers: measure each alone
                for layer in act.layers:
                    layer.error = ev.loss(choice, off | {id(layer): True})
        return sorted(layers, key=lambda lyr: lyr.error, reverse=True)

    # ---- the pass ---------------------------------------------------------------------------

    def _settings(self) -> tuple[str, float]:
        """The metric and its target, checked."""
        opts = self.options
        name = opts.get("int8_metric") or "cosine"
        if name not in fidelity.METRICS:
            raise CalibrationError(f"unknown --int8-metric {name!r} (choose from {', '.join(fidelity.METRICS)})")
        min_cos = float(opts.get("int8_min_cosine", fidelity.DEFAULT_TARGETS["cosine"]))
        if not 0.0 <= min_cos <= 1.0:
            raise CalibrationError(f"--int8-min-cosine must be in [0, 1] (got {min_cos})")
        target = opts.get("int8_target")
        target = (min_cos if name == "cosine" else fidelity.DEFAULT_TARGETS[name]) if target is None else float(target)
        if name == "rel-error" and not target >= 0.0:
            raise CalibrationError(f"--int8-target for rel-error is a maximum relative error >= 0 (got {target})")
        if name != "rel-error" and not 0.0 <= target <= 1.0:
            raise CalibrationError(f"--int8-target for {name} must be in [0, 1] (got {target})")
        return name, target

    def apply(self, model: ir.Model) -> int:
        opts = self.options
        method = opts.get("calibration_method") or "entropy"
        if method not in calibration.METHODS:
            raise CalibrationError(f"unknown calibration method {method!r} (choose from {', '.join(calibration.METHODS)})")
        metric_name, target_value = self._settings()
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
        plan = calibration_data.split_plan(source.count)
        opset = model.opset_imports.get("", 0)
        graph = model.graph
        weight_type = "int8 per-channel symmetric" + (", 7-bit range [-63, 63] (reduce_range)" if reduce_range else "")
        self.details = {"method": method, "activation_type": act_type, "weight_type": weight_type,
                        "reduce_range": reduce_range, "metric": metric_name, "target": target_value,
                        "min_cosine": target_value if metric_name == "cosine" else None,
                        "margin_rule": MARGIN_RULES[metric_name],
                        "fidelity_measured_on": ("onnxruntime CPU integer kernels (graph optimizations on)"
                                                 if check_session is not make_session else
                                                 "the QDQ graph run as float ops (onnxruntime optimizations off)"),
                        "layers": [], "excluded": [], "scales": {}, "bias_corrected": 0}
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
        hists, means, fit, validation, counts, timing, top = self._calibrate(
            model, acts, mean_axes, source, make_session, plan, metric_name == "top1")
        self.details["samples"] = counts
        self.details["calibration_time_s"] = timing
        metric = fidelity.Metric(metric_name, target_value, *top)
        t_control = time.perf_counter()

        # Ranges (the method's, and the observed one as the alternative), weights and biases, in numpy.
        ranges: dict[str, list] = {}
        for v in acts:
            h = hists[v.name]
            lo, hi = calibration.activation_range(h, method, unsigned=act_type == "uint8")
            ranges[v.name] = [(method, (float(lo), float(hi)))]
            observed = (min(h.min, 0.0), max(h.max, 0.0)) if h.total else (0.0, 0.0)
            if not np.allclose(observed, (lo, hi), rtol=1e-3, atol=0.0):
                ranges[v.name].append(("minmax", observed))
        weight_q: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # W_q, scales, W'
        for layer in layers:
            s_x, _ = quantize.activation_params(*ranges[layer.x.name][0][1], act_type)
            ba = _channel_bias(layer)
            key = id(layer.w)
            if key not in weight_q:
                floor = quantize.bias_scale_floor(ba, s_x) if ba is not None else None
                wq, sw = quantize.per_channel_weight(constant_array(layer.w), layer.axis, min_scale=floor,
                                                     reduce_range=reduce_range and not _depthwise(layer))
                weight_q[key] = (wq, sw, quantize.dequantize(wq, sw, 0, axis=layer.axis))
            _, sw, w_deq = weight_q[key]
            if ba is not None:
                if layer.x.name in means:
                    # Subtract the mean output shift that rounding the weights causes.
                    group = layer.node.attributes.get_int("group", 1) if layer.node.op_type == "Conv" else 1
                    ba = ba - quantize.weight_bias_correction(constant_array(layer.w), w_deq, means[layer.x.name],
                                                              layer.axis, group)
                if quantize.bias_int32(ba, s_x, sw) is not None:
                    self.details["bias_corrected"] += layer.x.name in means
                    layer.b_float, layer.w_scale = ba, sw
        for v in acts:  # a range at whose scale some bias would not fit in int32 is no candidate
            mine = [lyr for lyr in layers if lyr.x is v and lyr.b_float is not None]
            ranges[v.name] = [(n, r) for k, (n, r) in enumerate(ranges[v.name]) if k == 0 or all(
                quantize.bias_int32(lyr.b_float, quantize.activation_params(*r, act_type)[0], lyr.w_scale) is not None
                for lyr in mine)]

        # Fidelity control on the validation part, in one session where every choice is a fed mask.
        samples = validation or fit
        activations = [_Act(v, [lyr for lyr in layers if lyr.x is v], hists[v.name]) for v in acts]
        candidates = {id(a): ranges[a.value.name] for a in activations}
        ev = _EvalGraph(model, layers, activations, candidates, weight_q, act_type, make_session,
                        _Samples(samples, model), metric, self._progress)
        try:
            choice, order, k, steps = self._control(ev, metric, layers, activations, candidates, method)
            self.details["control_steps"] = steps
            excluded = {id(lyr) for lyr in order[:k]}

            # The QDQ graph itself, with the chosen ranges and layers.
            qdq = self._insert_qdq(model, layers, activations, candidates, choice, weight_q, act_type)
            for layer in layers:
                layer.enable(id(layer) not in excluded)
            check = _Samples(samples, model, batch=ev.samples.batch is not None)
            final = check.summary(metric, _session(model, check_session))
            if not final["ok"] and check_session is not make_session:
                # The integer kernels miss what the QDQ meaning meets: more layers go back to float.
                if not order:
                    order = self._rank(ev, metric, layers, activations, candidates, choice, method)
                    for act, real in zip(activations, qdq):
                        real.set_range(*candidates[id(act)][choice[id(act)]][1])
                        real.chosen_by = act.chosen_by
                while not final["ok"] and k < len(order):
                    order[k].enable(False)
                    excluded.add(id(order[k]))
                    k += 1
                    final = check.summary(metric, _session(model, check_session))
            on = {id(lyr): id(lyr) not in excluded for lyr in layers}
            qdq_float = ev.summary(choice, on)
            self.details["evaluations"] = ev.runs
            self.details["control_times_s"] = {k: round(v, 3) for k, v in ev.time_s.items()}
        finally:
            ev.close()
        for act, real in zip(activations, qdq):
            real.chosen_by = act.chosen_by or real.chosen_by
        self.details["excluded"] = [{"node": lyr.name, "op": lyr.node.op_type, "error": lyr.error}
                                    for lyr in order[:k]]
        kept = [lyr for lyr in layers if id(lyr) not in excluded]
        for act in qdq:
            self.details["scales"][act.value.name] = act.describe() | {"chosen_by": act.chosen_by}
        for layer in layers:
            self.details["layers"].append({"node": layer.name, "op": layer.node.op_type, "input": layer.x.name,
                                           "quantized": layer in kept, "error": layer.error})
        calib = _Samples(fit, model, batch=ev.samples.batch is not None).summary(metric, _session(model, check_session))
        self.details["fidelity"] = {
            "metric": metric_name, "target": target_value, "ok": final["ok"],
            "validation": final, "calibration": calib, "validation_qdq_float": qdq_float,
            "decided_on": "validation" if validation else "calibration (too few samples to split)",
        }
        self.details["control_time_s"] = round(time.perf_counter() - t_control, 4)
        self._remove_unused(graph, self._new_nodes, layers)
        self.details["quantized"] = len(kept)
        self.details["float"] = len(layers) - len(kept)
        return len(kept)

    def _insert_qdq(self, model, layers, activations, candidates, choice, weight_q, act_type) -> list["Activation"]:
        """Activation Q/DQ pairs at the chosen ranges, weight and int32 bias DQs; every layer rewired
        to them (`Layer.enable` switches a layer back)."""
        graph = model.graph
        self._new_nodes = new_nodes = []
        act_dq: dict[int, tuple[ir.Value, float]] = {}
        real: list[Activation] = []
        first = next(iter(graph))
        for act in activations:
            v = act.value
            name, (lo, hi) = candidates[id(act)][0]
            scale, zp = quantize.activation_params(lo, hi, act_type)
            s_val = _new_initializer(graph, np.array(scale, dtype=np.float32), f"{v.name}.int8_scale")
            z_val = _new_initializer(graph, np.array(zp), f"{v.name}.int8_zero_point")
            real.append(Activation(v, act.hist, s_val, z_val, act_type, act.layers, (lo, hi), chosen_by=name))
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

        weight_dq: dict[int, ir.Value] = {}  # one weight DQ per initializer even if shared
        for layer in layers:
            layer.x_dq, _ = act_dq[id(layer.x)]
            key = id(layer.w)
            if key not in weight_dq:
                wq, sw, _ = weight_q[key]
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
                weight_dq[key] = dq.outputs[0]
            layer.w_dq = weight_dq[key]
            if layer.b_float is not None:
                _, s_x = act_dq[id(layer.x)]
                bq, sb = quantize.bias_int32(layer.b_float, s_x, layer.w_scale)
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
        for act, r in zip(activations, real):
            j = choice[id(act)]
            if j:
                name, (lo, hi) = candidates[id(act)][j]
                r.set_range(lo, hi)  # candidates were checked to fit their biases
        return real
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
