"""A demo onnxopt plugin: one graph-surgery pass written with onnx-graphsurgeon."""

import onnx_graphsurgeon as gs

from onnxopt.passes.plugins import plugin_pass


@plugin_pass("demo_double_neg", level=1, stage="cleanup")
def double_neg(graph: gs.Graph) -> int:
    """Neg(Neg(x)) = x: the outer Neg becomes Identity(x), which -O1 then removes."""
    fired = 0
    for node in graph.nodes:
        inner = node.inputs[0].inputs[0] if node.op == "Neg" and node.inputs[0].inputs else None
        if inner is not None and inner.op == "Neg":
            node.op, node.inputs = "Identity", [inner.inputs[0]]
            fired += 1
    return fired
