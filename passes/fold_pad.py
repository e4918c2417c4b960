"""Zero padding folding (-O2, every target): a Pad in front of a Conv becomes the Conv's pads.

    Conv(Pad(x, p, mode="constant", value=0), W, b; pads=q) = Conv(x, W, b; pads=q + p[spatial])

TF-style "same" padding is exported as an explicit Pad before each strided Conv (EfficientNet-Lite
has 17). onnxruntime folds such a Pad itself at session creation, but only when the two are
adjacent: int8 quantization puts QuantizeLinear / DequantizeLinear between them, the Conv is then
no QDQ pattern and runs in float. Folding before quantization keeps the Conv quantizable.

Preconditions (onnxscript's fuse_pad_into_conv rule checks them; refusals are reported): constant
mode with a constant zero value, constant pads (and axes), no padding on the batch and channel
axes, no negative pads, a known input rank.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.rules.common import fuse_pad_into_conv_rule

from onnxopt.passes.base import RewritePass
from onnxopt.passes.registry import register


@register("fold_pad", level=2, stage="fusion", order=5)
class FoldPadPass(RewritePass):
    """Pad(constant 0, spatial axes) -> Conv becomes Conv with larger pads."""

    def __init__(self) -> None:
        super().__init__([fuse_pad_into_conv_rule])

    def apply(self, model: ir.Model) -> int:
        # The rule reads the Pad input's rank from its shape, which exports often leave unset; a
        # Conv's input has the rank of its weight, [C_out, C_in / group, *kernel]. That rank-only
        # shape is lent to the rule and taken back afterwards.
        lent = []
        for node in model.graph:
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            pad, w = node.inputs[0].producer() if node.inputs[0] is not None else None, node.inputs[1]
            if pad is None or pad.op_type != "Pad" or not pad.inputs or pad.inputs[0] is None:
                continue
            rank = len(w.shape) if w is not None and w.shape is not None else None
            if pad.inputs[0].shape is None and rank is not None:
                pad.inputs[0].shape = ir.Shape([None] * rank)
                lent.append(pad.inputs[0])
        try:
            return super().apply(model)
        finally:
            for value in lent:
                value.shape = None
