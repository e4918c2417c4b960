"""The model cut into consecutive segments, so that a variant that differs from some node on is run
from the cut before that node instead of from the model's inputs.

Pruning runs the same model many times with different consumer weights: each group's sensitivity
(only that group's consumers changed: everything before them is the dense model's) and each step of
the sequential refit (only the consumers from the current group on differ from the previous step).
A `Chain` holds one onnxruntime session per segment; the values live across a cut (its boundary: the
residual stream between transformer layers, a feature map between CNN blocks) are a segment's inputs,
and a caller keeps them per sample as a *state*, advancing it segment by segment.

Cuts are placed, for each requested node position, at the position between it and the previous one
where the boundary is smallest in bytes (at the probe shapes), latest on ties: a small state to keep
per sample, and the re-run that starts there is short. Values that do not depend on a graph input
(constant subexpressions) never cross a cut: each segment recomputes the ones it needs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._lib.graph import remove_dead, session_of


@dataclasses.dataclass
class Segment:
    """Nodes at positions [start, stop): reads the boundary `inputs`, gives `outputs`."""

    start: int
    stop: int
    inputs: list[str]
    outputs: list[str]
    session: object
    feeds: frozenset  # the external feeds (weights given as graph inputs) it takes
    state_after: list[str]  # the state after it: the next boundary (the graph outputs after the last)


def live_ranges(graph: ir.Graph, exclude=frozenset()) -> dict[str, tuple[int, int]]:
    """For every value that depends on a graph input (graph inputs in `exclude` aside): (position of
    its producer, -1 for a graph input; last position that reads it, len(graph) for a graph output)."""
    nodes = list(graph)
    end = len(nodes)
    varying = {v.name for v in graph.inputs if v.name not in exclude}
    born = {name: -1 for name in varying}
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        reads = [v.name for v in node.inputs if v is not None and v.name in varying]
        for name in reads:
            last[name] = i
        if reads:
            for v in node.outputs:
                varying.add(v.name)
                born[v.name] = i
    for v in graph.outputs:
        if v.name in born:
            last[v.name] = end
    return {n: (born[n], last[n]) for n in born if n in last}


def boundary(ranges: dict[str, tuple[int, int]], position: int) -> list[str]:
    """The values live across the cut before node `position`: produced before it, read at or after."""
    return sorted(n for n, (b, e) in ranges.items() if b < position <= e)


def place_cuts(ranges: dict[str, tuple[int, int]], positions: list[int], nbytes, slack: float = 1.0,
               cap: float = float("inf")) -> list[int]:
    """One cut per requested position p (sorted, distinct): the latest position in (previous p, p]
    whose boundary has the fewest bytes, or at most `slack` times as many and at most `cap` bytes
    (a later cut holds a wider state, but a re-run that starts there is shorter, and a cut right
    before p has p's inputs in the state itself)."""
    n = max([e for _, e in ranges.values()] + list(positions) + [0]) + 2
    size = np.zeros(n + 1)
    for name, (b, e) in ranges.items():  # live over positions b+1 .. e
        size[b + 1] += nbytes(name)
        size[min(e, n) + 1] -= nbytes(name)
    size = np.cumsum(size)
    cuts, prev = [], -1
    for p in sorted(set(positions)):
        window = np.arange(max(prev + 1, 0), p + 1)
        least = float(size[window].min())
        ok = size[window] <= max(least, min(slack * least, cap))
        best = int(window[ok][-1])
        if best > 0 and (not cuts or best > cuts[-1]):
            cuts.append(int(best))
        prev = p
    return cuts


def _segment_model(model: ir.Model, inputs: list[str], outputs: list[str], types: dict) -> ir.Model:
    """A copy of `model` computing `outputs` from the values `inputs` (graph inputs of the copy in
    place of whatever produced them), everything upstream of them removed."""
    clone = model.clone()
    graph = clone.graph
    by_name = {v.name: v for node in graph for v in node.outputs}
    by_name.update({v.name: v for v in graph.inputs})
    graph.outputs.clear()
    graph.outputs.extend(by_name[n] for n in outputs)
    old_inputs = list(graph.inputs)
    new_inputs = []
    for name in inputs:
        old = by_name[name]
        if old.is_graph_input():
            new_inputs.append(old)
            continue
        dtype = types.get(name)
        vtype = old.type or (ir.TensorType(ir.DataType.from_numpy(dtype)) if dtype is not None else None)
        new = ir.Value(type=vtype, shape=old.shape)
        old.replace_all_uses_with(new)
        old.name = f"{name}/onnxopt.cut"
        new.name = name
        new_inputs.append(new)
    for node in reversed(list(graph)):
        remove_dead(graph, node)
    graph.inputs.clear()
    keep = set(map(id, new_inputs))
    graph.inputs.extend(new_inputs + [v for v in old_inputs if id(v) not in keep and v.uses()])
    return clone


class Chain:
    """Sessions of the consecutive segments of `model` cut at `cuts` (node positions); `wanted` are
    values a caller may ask for besides the graph outputs (every segment gives those it produces).
    `external` names graph inputs that are fed by the caller on every run (weights), never part
    of a state."""

    def __init__(self, model: ir.Model, cuts: list[int], wanted, make_session, types: dict,
                 external=frozenset()) -> None:
        graph = model.graph
        self.ranges = live_ranges(graph, exclude=external)
        self.inputs = [v.name for v in graph.inputs if v.name not in external]
        self.outputs = [v.name for v in graph.outputs]
        nodes = list(graph)
        born = {v.name: i for i, node in enumerate(nodes) for v in node.outputs}
        wanted = set(wanted) | set(self.outputs)
        edges = [0, *[c for c in cuts if 0 < c < len(nodes)], len(nodes)]
        self.segments: list[Segment] = []
        for start, stop in zip(edges, edges[1:]):
            ins = boundary(self.ranges, start) if start else [n for n in self.inputs if n in self.ranges]
            after = boundary(self.ranges, stop) if stop < len(nodes) else []
            outs = sorted({n for n in set(after) | wanted if start <= born.get(n, -2) < stop})
            if not outs:  # nothing live is computed here (e.g. only constants): the state passes on
                self.segments.append(Segment(start, stop, ins, [], None, frozenset(), after))
                continue
            seg = _segment_model(model, ins, outs, types)
            self.segments.append(Segment(start, stop, ins, outs, session_of(seg, make_session, []),
                                         frozenset(v.name for v in seg.graph.inputs) - set(ins),
                                         after if stop < len(nodes) else list(self.outputs)))

    def index(self, position: int) -> int:
        """The segment whose start is the last one at or before node `position`."""
        return max(i for i, s in enumerate(self.segments) if s.start <= position)

    def start(self, feed: dict) -> dict:
        """The state before segment 0: the sample's graph inputs."""
        return {n: feed[n] for n in self.inputs if n in feed}

    def advance(self, state: dict, first: int, last: int, feeds: dict, seen: dict | None = None) -> dict:
        """The state before segment `last`, from `state` (before segment `first`), running the
        segments in between with the external `feeds`; values of `seen`'s keys met on the way (in
        a state or an output) are filled in."""
        for seg in self.segments[first:last]:
            got = seg.session.run(seg.outputs, {**{n: state[n] for n in seg.inputs},
                                                **{n: feeds[n] for n in seg.feeds}}) if seg.session else []
            values = {**state, **dict(zip(seg.outputs, got))}
            if seen is not None:
                for n in seen:
                    if seen[n] is None and n in values:
                        seen[n] = values[n]
            state = {n: values[n] for n in seg.state_after if n in values}
        return state

    def run(self, state: dict, first: int, feeds: dict, names: list[str]) -> list[np.ndarray]:
        """The values `names` from `state` (before segment `first`), running only as many segments
        as it takes."""
        seen = {n: state.get(n) for n in names}
        i = first
        while any(v is None for v in seen.values()):
            if i >= len(self.segments):
                missing = [n for n, v in seen.items() if v is None]
                raise KeyError(f"values not produced after segment {first}: {missing}")
            state = self.advance(state, i, i + 1, feeds, seen)
            i += 1
        return [seen[n] for n in names]
