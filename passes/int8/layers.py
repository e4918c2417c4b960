"""What int8 works on: the layers it quantizes (Conv/ConvTranspose/MatMul/Gemm with their activation,
weight and bias), the activations with their ranges, and the initializers the pass owns."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import calibration, quantize
from onnxopt.passes._lib.graph import constant_array, fresh_name, session_of


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
    """An initializer this pass owns: never shared with an equal one (unlike passes/_lib's
    new_initializer), because Activation.set_range rewrites scales, zero points and bias codes in
    place after the fidelity control; named `name` or `name.N`, never a name already taken."""
    name = fresh_name(graph, name)
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
