"""Plugin passes: graph surgery written by users, run by the pipeline like a built-in pass.

A plugin is a function registered with a name, a level, a stage and targets:

    import onnx_graphsurgeon as gs
    from onnxopt.passes.plugins import plugin_pass

    @plugin_pass("drop_my_noop", level=1, stage="cleanup")
    def drop_my_noop(graph: gs.Graph) -> int:      # returns how many rewrites it made
        ...

`over="graphsurgeon"` (the default) hands the function an `onnx_graphsurgeon.Graph` of the model
(weights as numpy constants) and takes the graph back after `cleanup().toposort()`;
`over="onnx_ir"` hands it the `onnx_ir.Model` itself, to rewrite in place. Either way the pass is
verified, counted and reported like every other one: a plugin that changes the outputs fails the
compile with a message that names it.

Plugins are found in two places: functions decorated in the user's own script (registered when the
script imports this module and runs the decorator), and installed packages that declare an entry
point in the group `onnxopt.passes` (`load_installed()`, called once when onnxopt.passes is
imported). A package that fails to import is remembered and the next compile refuses with one line
naming it, rather than running without the passes it was meant to add.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable

import onnx_ir as ir

from onnxopt.passes.base import OptPass
from onnxopt.passes.registry import TARGETS, register

ENTRY_POINT_GROUP = "onnxopt.passes"
OVER = ("graphsurgeon", "onnx_ir")

# (entry point, error) of installed plugins that could not be loaded.
load_errors: list[tuple[str, str]] = []


def plugin_pass(name: str, *, level: int, stage: str = "fusion", targets: Iterable[str] = TARGETS,
                order: int = 90, over: str = "graphsurgeon"):
    """Register `fn(graph) -> int` as the pass `name` (see the module docstring)."""
    if over not in OVER:
        raise ValueError(f"over must be one of {OVER}, got {over!r}")

    def decorate(fn: Callable):
        doc = (fn.__doc__ or f"plugin pass {name}").strip()
        cls = type(f"Plugin_{name}", (_PluginPass,), {"function": staticmethod(fn), "over": over, "__doc__": doc})
        register(name, level=level, stage=stage, targets=targets, order=order)(cls)
        return fn

    return decorate


class _PluginPass(OptPass):
    function: Callable
    over: str

    def apply(self, model: ir.Model) -> int:
        if self.over == "onnx_ir":
            return int(self.function(model) or 0)
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(ir.serde.serialize_model(model))
        fired = int(self.function(graph) or 0)
        if fired:
            graph.cleanup().toposort()
            rewritten = ir.serde.deserialize_model(gs.export_onnx(graph))
            # The graph carries the opset imports; functions travel beside it.
            model.graph = rewritten.graph
            model.functions.clear()
            model.functions.update(rewritten.functions)
        return fired


def load_installed() -> None:
    """Import every installed package's `onnxopt.passes` entry point (each registers its passes)."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not break `import onnxopt.passes`
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            load_errors.append((f"{entry.name} = {entry.value}", f"{type(exc).__name__}: {first}"))
