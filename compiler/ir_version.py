"""The rule old IR versions impose on initializers.

Before IR version 4 every initializer had to be a graph input as well (it was the input's default
value). Passes create initializers (folded constants, fused weights, lifted Constant nodes) that
are not inputs, and must not be: an input is part of the model's interface. So a model below IR 4
whose compiled graph has such initializers is moved to IR 4 on purpose, which changes nothing it
computes (IR 4 only relaxed that rule), and the report says so. Initializers that were inputs
stay inputs.
"""

from __future__ import annotations

import onnx_ir as ir

FIRST_FREE_INITIALIZERS = 4


def conform(model: ir.Model) -> dict | None:
    """Upgrade `model.ir_version` to 4 when it is lower and an initializer is not a graph input;
    return what was done (for the report), or None."""
    if model.ir_version is None or model.ir_version >= FIRST_FREE_INITIALIZERS:
        return None
    inputs = {v.name for v in model.graph.inputs}
    extra = sorted(name for name in model.graph.initializers if name not in inputs)
    if not extra:
        return None
    before = model.ir_version
    model.ir_version = FIRST_FREE_INITIALIZERS
    return {"from": before, "to": FIRST_FREE_INITIALIZERS,
            "reason": f"IR {before} needs every initializer to be a graph input; {len(extra)} created by the "
                      f"passes are not (e.g. {extra[0]!r}), and making them inputs would change the interface"}
