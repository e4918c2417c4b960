"""Run a list of registered passes over a model and record, per pass, what it did.

Passes of the "cleanup" stage feed each other (folding exposes dead code and duplicates, removing a
no-op exposes folding), so that stage is repeated until a round changes nothing; its records sum
the rounds. Every other pass runs once; each is idempotent on its own.
"""

from __future__ import annotations

import itertools
import time

import onnx_ir as ir

from onnxopt.passes import PassInfo, opset_forms
from onnxopt.passes.base import MAX_DECLINED_LISTED, OptPass

MAX_CLEANUP_ROUNDS = 4


def _record(info: PassInfo) -> dict:
    return {
        "name": info.name,
        "level": info.level,
        "stage": info.stage,
        "fired": 0,
        "modified": False,
        "time_s": 0.0,
        "declined_count": 0,
        "declined": [],
    }


def _run_one(info: PassInfo, model: ir.Model, rec: dict, output_names: list[str], options: dict) -> bool:
    p = info.factory()
    if isinstance(p, OptPass):
        # Passes that need compile options (calibration data, fidelity targets) take them here.
        p.configure(options)
    start = time.perf_counter()
    result = p(model)
    keep_interface(model, output_names)
    if result.modified:
        # Library rewrites build the newest form of an op; write it as the model's opset has it.
        opset_forms.legalize(model)
    rec["time_s"] += time.perf_counter() - start
    fired = getattr(p, "fired", int(result.modified))
    rec["fired"] += fired
    rec["modified"] = rec["modified"] or bool(result.modified)
    declined = getattr(p, "declined", [])
    # Only the last run's declines are current: earlier rounds may have declined what later fired.
    rec["declined_count"] = len(declined)
    rec["declined"] = [d.as_dict() for d in declined[:MAX_DECLINED_LISTED]]
    details = p.details if isinstance(p, OptPass) else None
    if details:
        rec["details"] = details  # e.g. int8 scales, excluded layers, held-out fidelity
    return bool(result.modified)


def keep_interface(model: ir.Model, output_names: list[str]) -> None:
    """Graph output names are public API: restore them if a pass merged or renamed outputs.

    A rewrite may make two outputs one value (CSE of equal outputs) or route an input straight to
    an output; OutputFixPass inserts the Identity nodes ONNX then needs, and the original names are
    given back, first taking a name back from any internal value that borrowed it.
    """
    _fix_outputs(model.graph, output_names)
    for sub in model.graph.subgraphs():
        _fix_outputs(sub, None)
    wrong = [(v, n) for v, n in zip(model.graph.outputs, output_names) if v.name != n]
    if not wrong:
        return
    taken = {n for _, n in wrong}
    for node in model.graph:
        for value in node.outputs:
            if value.name in taken and not value.is_graph_output():
                value.name = f"{value.name}.internal"
    for value, name in wrong:
        value.name = name


def _fix_outputs(graph: ir.Graph, names: list[str] | None) -> None:
    """ONNX needs each graph output to be a distinct value produced in the graph, except that a
    graph input may be an output under its own name (the model's interface; onnx_ir's OutputFixPass
    would rename that input). An Identity goes in where a pass made a value a second output, or routed
    an input to an output of another name (`names`: the main graph's output names; None in subgraphs,
    whose names are not public)."""
    seen: set[ir.Value] = set()
    for i, value in enumerate(graph.outputs):
        passthrough = names is not None and value.is_graph_input() and value.name != names[i]
        if value not in seen and not passthrough:
            seen.add(value)
            continue
        node = ir.node("Identity", inputs=[value])
        alias = node.outputs[0]
        alias.name = f"{value.name}.output{i}"
        alias.shape, alias.type = value.shape, value.type
        graph.append(node)
        graph.outputs[i] = alias


def run(model: ir.Model, infos: list[PassInfo], options: dict | None = None) -> list[dict]:
    output_names = [v.name for v in model.graph.outputs]
    records = []
    for stage, group in itertools.groupby(infos, key=lambda i: i.stage):
        group = list(group)
        recs = [_record(i) for i in group]
        records.extend(recs)
        rounds = MAX_CLEANUP_ROUNDS if stage == "cleanup" else 1
        for _ in range(rounds):
            changed = [_run_one(info, model, rec, output_names, options or {}) for info, rec in zip(group, recs)]
            if not any(changed):
                break
    for rec in records:
        rec["time_s"] = round(rec["time_s"], 4)
        # Candidates the pass looked at: those it rewrote plus those it declined (with reasons).
        rec["matched"] = rec["fired"] + rec["declined_count"]
    return records
