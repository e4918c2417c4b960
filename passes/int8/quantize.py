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
dequantized values, which is how the control below ranks its choices. For the cpu target,
`lower_int8` (lower.py) then writes the MatMuls' integer kernels itself, with their bias Adds and
the attention block folded in, which onnxruntime's own fusion leaves as separate kernels.

Preconditions (else the layer stays float and is declined with the reason): W constant (not an
overridable initializer), float32 activation, Gemm without transA, ConvTranspose with group 1,
opset >= 13 (per-axis QuantizeLinear). MatMuls of two activations (attention scores) stay float.
A com.microsoft Attention kernel holds its Q/K/V projection internally: it is not QDQ-able. With
--int8, -O3's attention fusion therefore emits MultiHeadAttention and leaves the (merged) projection
outside as a MatMul, which is quantized, and `unpack_attention` (passes/attention/unpack.py) takes
the projection out of an Attention the input model already has; one it declines stays float
(declined here too, reported). LayerNorm, Softmax, GELU and residual additions are never quantized (they are not
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

import time

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import calibration, fidelity, quantize
from onnxopt.passes.int8 import calibration_data
from onnxopt.passes.base import OptPass
from onnxopt.passes.int8.calibration_data import CalibrationError
from onnxopt.passes._lib.graph import constant_array
from onnxopt.passes.registry import register
from onnxopt.passes.int8 import qdq, statistics
from onnxopt.passes.int8.control import MARGIN_RULES, _Act, _EvalGraph, _Samples
from onnxopt.passes.int8.layers import (
    LAYER_OPS, VALIDATION_KEPT, FIT_SAMPLES, MS_FUSED_WITH_PROJECTIONS, Layer, Activation, _new_initializer, _session, _channel_bias, _depthwise, _float_outputs,
)

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
                             "internally (not QDQ-able); it stays float (unpack_attention, which takes the projection "
                             "out, declined it with its reason or does not run for this target)")
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
        One streamed pass over the data, shard by shard (statistics.calibrate_shard), on this process
        or the shard runner's workers, the shards' statistics merged in shard order."""
        t0 = time.perf_counter()
        st = statistics.calibrate({**self.options, "make_session": make_session}, model, acts, mean_axes, source,
                                  plan, top1, lambda done: self._progress("calibrating", done, source.count))
        n_calib, n_val, validation = st.calibration, st.held, st.validation
        if n_calib < 1 or n_calib + n_val < calibration_data.MIN_SAMPLES:
            raise CalibrationError(f"calibration data has {n_calib + n_val} sample(s), {calibration_data.MIN_SAMPLES} needed")
        timing = {"total_s": round(time.perf_counter() - t0, 4), "inference_s": round(st.inference_s, 4)}
        means = {name: sums.mean() for name, sums in st.sums.items()}
        counts = {"calibration": n_calib, "validation": n_val, "validation_kept": len(validation)}
        if n_val == 0:
            counts["not_split"] = (f"{n_calib} sample(s) are too few to split (a validation part needs "
                                   f"{calibration_data.MIN_VALIDATION} of at least {2 * calibration_data.MIN_VALIDATION}): "
                                   "fidelity was controlled and measured on the calibration samples")
        elif n_val < calibration_data.MIN_VALIDATION:
            counts["small_validation"] = f"only {n_val} validation sample(s) (an iterable of unknown length: every fifth)"
        top = (np.concatenate(st.margins), np.concatenate(st.ties)) if st.margins else (None, None)
        return st.hists, means, st.fit, validation, counts, timing, top

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
        for act in activations:
            v = act.value
            name, (lo, hi) = candidates[id(act)][0]
            scale, zp = quantize.activation_params(lo, hi, act_type)
            s_val = _new_initializer(graph, np.array(scale, dtype=np.float32), f"{v.name}.int8_scale")
            z_val = _new_initializer(graph, np.array(zp), f"{v.name}.int8_zero_point")
            real.append(Activation(v, act.hist, s_val, z_val, act_type, act.layers, (lo, hi), chosen_by=name))
            q, dq = qdq.activation_pair(graph, v, s_val, z_val)
            new_nodes += [q, dq]
            act_dq[id(v)] = (dq.outputs[0], float(scale))

        weight_dq: dict[int, ir.Value] = {}  # one weight DQ per initializer even if shared
        for layer in layers:
            layer.x_dq, _ = act_dq[id(layer.x)]
            key = id(layer.w)
            if key not in weight_dq:
                wq, sw, _ = weight_q[key]
                base = layer.w.name
                dq, _, _ = qdq.constant_dq(graph, wq, sw, layer.w, base, "int8", layer.axis, layer.node)
                new_nodes.append(dq)
                weight_dq[key] = dq.outputs[0]
            layer.w_dq = weight_dq[key]
            if layer.b_float is not None:
                _, s_x = act_dq[id(layer.x)]
                bq, sb = quantize.bias_int32(layer.b_float, s_x, layer.w_scale)
                base = f"{layer.b.name}.{layer.name}"
                dq, bq_val, sb_val = qdq.constant_dq(graph, bq, sb, layer.b, base, "int32", 0, layer.node)
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
