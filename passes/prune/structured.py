"""Structured pruning after export: calibrated, allocated by sensitivity, reconstructed in closed form.

Rewrite: for each dependency group (passes/prune/groups.py: Conv output channels, FFN neurons,
attention heads of a fused Attention), the units not kept are physically removed from every tensor
of the group, and every consumer of the group is refitted:

    W_c', b_c' = argmin sum_x ||W_c'^T a_pruned(x) + b_c' - (W_c^T a_dense(x) + b_c)||^2 + lam ||[W_c'; b_c'] - [W_c; b_c]_kept||^2

a ridge least squares (Conv through im2col) whose bias column compensates the mean of what was
removed; inputs a_pruned come from the model with every earlier group already pruned and refitted
(sequential), targets from the dense model. Gram matrices are accumulated over the calibration
stream in float64 (fixed memory) and solved in float64 (kernels/pruning.py).

Which units: within a group, removed greedily at their Optimal Brain Surgeon cost on the dense
inputs (the consumer output error after the best refit, relative to the consumer's output energy),
in chunks that keep the channel count a multiple of `prune_round` (default 8). Across groups: each
group's costs are scaled by its measured sensitivity (the model's output error when its cheapest
half is zeroed, divided by the consumer error that predicts), then chunks are taken by the least
cost per MAC saved until `prune` (a fraction) of the prunable MACs is removed, keeping at least
`MIN_KEEP` of every group. MACs are counted per layer at the calibration shapes, attention's
score and context products included.

Fidelity: every fifth calibration sample is held out of all statistics; the report gives the
worst cosine of the float outputs over them (min and mean over samples). With `prune_min_cosine`
the budget backs off (3/4, 1/2, 1/4 of it) until the held-out min cosine holds, else an error says
what was reached. Preconditions: float32 weights, opset >= 13; groups that do not qualify are
declined with the reason.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import pruning as K
from onnxopt.kernels.metrics import cosine
from onnxopt.passes.int8 import calibration_data
from onnxopt.passes.prune import groups as G
from onnxopt.passes.base import OptPass
from onnxopt.passes.int8.calibration_data import CalibrationError
from onnxopt.passes._lib.graph import constant_array, session_of
from onnxopt.passes.registry import register

HOLDOUT_EVERY = 5
FIT_SAMPLES = 8
HELDOUT_SAMPLES = 32
# Smallest fraction of a group's units that is always kept.
MIN_KEEP = 0.1
# Sensitivity is measured with this fraction of a group's units zeroed.
PROBE_FRACTION = 0.5
BACKOFF = (0.75, 0.5, 0.25)


def _float_outputs(names, values):
    return {n: v for n, v in zip(names, values) if np.issubdtype(v.dtype, np.floating)}


def _session(model: ir.Model, make_session, extra: list[ir.Value]):
    return session_of(model, make_session, extra)


def _cosines(session, samples) -> list[float]:
    out = []
    for feed, ref in samples:
        names = list(ref)
        got = dict(zip(names, session.run(names, feed)))
        out.append(min((cosine(ref[n], got[n]) for n in names), default=1.0))
    return out


def _conv_attrs(node: ir.Node, w_shape):
    k = tuple(w_shape[2:])
    a = node.attributes
    strides = tuple(a.get_ints("strides", (1,) * len(k)))
    dil = tuple(a.get_ints("dilations", (1,) * len(k)))
    pads = tuple(a.get_ints("pads", (0,) * 2 * len(k)))
    return k, strides, pads, dil


def _rows(c: G.Consumer, x: np.ndarray) -> np.ndarray:
    """The consumer's input rows (im2col patches for a Conv)."""
    if c.kind != "conv":
        return x.reshape(-1, x.shape[-1]) if c.kind == "matmul" else x.reshape(x.shape[0], -1)
    w = constant_array(c.node.inputs[1])
    k, s, p, d = _conv_attrs(c.node, w.shape)
    if len(k) == 2:
        return K.im2col(x, k, s, (p[0], p[1], p[2], p[3]), d)
    return K.im2col(x[..., None], (k[0], 1), (s[0], 1), (p[0], 0, p[1], 0), (d[0], 1))


def _macs(node: ir.Node, shape_of) -> float:
    """Multiply-accumulates of one run at the probe shapes."""
    op = node.op_type
    out = shape_of(node.outputs[0])
    if out is None:
        return 0.0
    if op == "Conv":
        w = node.inputs[1].shape
        return float(np.prod(out)) * float(np.prod(list(w)[1:]))
    if op in ("MatMul", "Gemm"):
        x = shape_of(node.inputs[0])
        k = x[-1] if op == "MatMul" else (x[0] if node.attributes.get_int("transA", 0) else x[-1])
        return float(np.prod(out)) * float(k)
    if op == "Attention":
        x = shape_of(node.inputs[0])
        w = node.inputs[1].shape
        tokens = float(np.prod(x[:-1]))
        seq = float(x[-2])
        # QKV projection, then scores and context: 2 * seq * D per token.
        return tokens * float(w[0]) * float(w[1]) + 2.0 * tokens * seq * float(w[1]) / 3.0
    if op == "MultiHeadAttention":  # scores and context: 2 * key length * D per query token
        q, k = shape_of(node.inputs[0]), shape_of(node.inputs[1])
        return 2.0 * float(np.prod(q[:-1])) * float(k[-2]) * float(q[-1]) if q is not None and k is not None else 0.0
    return 0.0


def _layer_nodes(group: G.Group):
    """(node, role) of every layer whose MACs scale with the group's kept fraction."""
    return ([(p.node, "out") for p in group.producers] + [(c.node, "in") for c in group.consumers]
            + [(n, "dw") for n in group.depthwise] + [(n, "core") for n in group.core])


# order 5: before int8 and fp16 (prune, then quantize).
@register("prune", level=0, stage="lossy", flag="prune", order=5)
class PrunePass(OptPass):
    """Structured pruning of channels, FFN neurons and attention heads; calibrated and reconstructed."""

    def __init__(self) -> None:
        super().__init__()
        self.details: dict = {}

    # ---- data ---------------------------------------------------------------------------------

    def _stream(self, model, desc: str):
        """A fresh pass over the calibration samples: (index, held out?, feed)."""
        source = calibration_data.open_source(self._data, model, self.options.get("calibration_samples"))
        it = iter(source)
        try:
            from tqdm import tqdm

            it = tqdm(it, total=source.count, desc=f"onnxopt: prune {desc}", unit="sample", file=sys.stderr,
                      disable=None, leave=False)
        except ImportError:  # pragma: no cover
            pass
        for k, feed in enumerate(it):
            yield k, k % HOLDOUT_EVERY == HOLDOUT_EVERY - 1, feed

    # ---- the pass -----------------------------------------------------------------------------

    def apply(self, model: ir.Model) -> int:
        opts = self.options
        fraction = opts.get("prune")
        if fraction is None:
            return 0
        t0 = time.perf_counter()
        round_to = int(opts.get("prune_round") or 8)
        min_cos = opts.get("prune_min_cosine")
        # Data passes run onnxruntime with its optimizations on (fetched values stay exact enough).
        make_session = opts.get("make_kernel_session") or opts.get("make_session")
        if make_session is None:
            raise CalibrationError("pruning needs a session factory (options['make_session'])")
        data = opts.get("calibration_data")
        # A one-shot iterator is read once into memory; paths and sequences are re-read per pass.
        if data is not None and not isinstance(data, (str, bytes)) and not hasattr(data, "__len__") \
                and not hasattr(data, "__fspath__") and not isinstance(data, dict):
            data = list(data)
        self._data = data
        calibration_data.open_source(data, model, opts.get("calibration_samples"))  # bad data fails here
        self.details = {"requested": fraction, "round": round_to, "min_cosine": min_cos, "groups": [],
                        "declined_groups": []}
        graph = model.graph
        params_before = sum(v.const_value.size for v in graph.initializers.values() if v.const_value is not None)

        # Probe: concrete shapes of every value, and the reference outputs of fit / held-out samples.
        values = [v for node in graph for v in node.outputs if v.name]
        probe = _session(model, make_session, values)
        out_names = [v.name for v in graph.outputs]
        shapes: dict[str, tuple] = {}
        fit, held = [], []
        for k, is_held, feed in self._stream(model, "probe"):
            if k == 0:
                names = out_names + [v.name for v in values if v.name not in out_names]
                got = probe.run(names, feed)
                shapes = {n: tuple(a.shape) for n, a in zip(names, got)}
                shapes.update({n: tuple(np.shape(a)) for n, a in feed.items()})
                outs = got[: len(out_names)]
            elif (is_held and len(held) < HELDOUT_SAMPLES) or (not is_held and len(fit) < FIT_SAMPLES):
                outs = probe.run(out_names, feed)
            else:
                continue
            ref = _float_outputs(out_names, outs)
            (held if is_held else fit).append((feed, ref))
        del probe
        if not held or not fit:
            raise CalibrationError(f"pruning needs at least {HOLDOUT_EVERY} calibration samples "
                                   f"(every {HOLDOUT_EVERY}th is held out to measure fidelity)")

        def shape_of(v):
            return shapes.get(v.name) if v is not None else None

        groups = G.find_groups(graph, shape_of)
        ok = []
        for g in groups:
            if g.reason:
                self.decline("prune", g.start, g.reason)
                self.details["declined_groups"].append({"group": g.describe(), "reason": g.reason})
            elif g.units < 2:
                self.decline("prune", g.start, f"{g.describe()}: a single unit")
            else:
                ok.append(g)
        total_macs = sum(_macs(n, shape_of) for n in graph)
        self.details["model_macs"] = total_macs
        if not ok:
            self.details["result"] = "nothing prunable: " + ("; ".join(sorted({g.reason for g in groups if g.reason}))
                                                           or "no Conv, MatMul, Gemm or Attention layer")
            return 0

        # Statistics on the dense model: Gram of every consumer's input rows.
        consumers = {id(c.node): c for g in ok for c in g.consumers}
        cvals = {id(c.node): c.node.inputs[0] for c in consumers.values()}
        grams: dict[int, K.Gram] = {}
        stats = _session(model, make_session, list(cvals.values()))
        names = [v.name for v in cvals.values()]
        for k, is_held, feed in self._stream(model, "statistics"):
            if is_held:
                continue
            got = dict(zip(names, stats.run(names, feed)))
            for key, c in consumers.items():
                rows = _rows(c, got[cvals[key].name])
                if key not in grams:
                    grams[key] = K.Gram(rows.shape[1])
                grams[key].update(rows)
        del stats

        # Order within groups (OBS) and chunk costs; sensitivity of each group.
        chunks, costs, orders = [], [], []
        for g in ok:
            floor = max(1, math.ceil(MIN_KEEP * g.units))
            sizes = K.chunk_sizes(g.units, g.unit, round_to, floor)
            obs = [K.ObsConsumer(G.consumer_matrix(c).astype(np.float64), grams[id(c.node)].mean(), c.block * g.unit)
                   for c in g.consumers]
            order, cost = K.obs_order(obs, g.units, sizes)
            chunks.append(sizes)
            costs.append(cost)
            orders.append(order)
        factors = []
        for g, order, sizes in zip(ok, orders, chunks):
            n = 0
            for s in sizes:
                if n >= PROBE_FRACTION * g.units:
                    break
                n += s
            if n == 0:
                factors.append(1.0)
                continue
            drop = G.unit_channels(g, order[:n])
            proxy = sum(K.zeroing_cost(G.consumer_matrix(c).astype(np.float64), grams[id(c.node)].mean(),
                                       G.consumer_rows(c, drop)) for c in g.consumers)
            undo = G.zero(graph, g, drop)
            try:
                err = float(np.mean([1.0 - c for c in _cosines(_session(model, make_session, []), fit)]))
            finally:
                undo()
            factors.append(max(err, 1e-9) / max(proxy, 1e-12))
        scaled = [[f * c for c in cs] for f, cs in zip(factors, costs)]

        # MACs as a function of the units removed per group.
        layers: dict[int, list] = {}
        for gi, g in enumerate(ok):
            for node, role in _layer_nodes(g):
                entry = layers.setdefault(id(node), [_macs(node, shape_of), []])
                entry[1].append(gi)
        prunable = sum(e[0] for e in layers.values())

        def saving(removed):
            kept = [1.0 - r / g.units for r, g in zip(removed, ok)]
            return sum(m * (1.0 - float(np.prod([kept[i] for i in idx]))) for m, idx in layers.values())

        self.details.update({"prunable_macs": prunable, "groups_considered": len(ok)})
        dense_session = None
        attempts = []
        for scale in (1.0, *BACKOFF) if min_cos is not None else (1.0,):
            budget = fraction * scale
            taken = K.allocate(chunks, scaled, saving, budget * prunable)
            removed = [sum(s[:t]) for s, t in zip(chunks, taken)]
            if dense_session is None:
                dense_session = _session(model, make_session, list(cvals.values()))
            trial = model.clone()
            self._execute(trial, ok, orders, removed, shape_of, dense_session, make_session)
            cos = _cosines(_session(trial, make_session, []), held)
            reached = saving(removed) / prunable
            attempts.append({"budget": budget, "macs_removed": reached, "held_out_min_cosine": min(cos),
                             "held_out_mean_cosine": float(np.mean(cos))})
            if min_cos is None or min(cos) >= min_cos:
                break
        else:
            tried = "; ".join(f"{a['macs_removed']:.1%} of MACs removed: held-out min cosine {a['held_out_min_cosine']:.4f}"
                              for a in attempts)
            raise CalibrationError(f"--prune-min-cosine {min_cos} cannot be met ({tried})")
        model.graph = trial.graph
        self.details["attempts"] = attempts
        for g, order, r, f, sizes, cs in zip(ok, orders, removed, factors, chunks, costs):
            node = g.start
            self.details["groups"].append({
                "group": g.describe(), "kind": g.kind, "units": g.units, "unit_channels": g.unit,
                "kept": g.units - r, "removed": r, "sensitivity": f,
                "why": ("kept whole: its cheapest chunk costs more per MAC than the others'" if r == 0 else
                        f"removed the {r} units of least reconstruction cost"),
                "node": node.name})
        counts = {}
        for g, r in zip(ok, removed):
            kc = counts.setdefault(g.kind, [0, 0])
            kc[0] += g.units - r
            kc[1] += g.units
        self.details.update({
            "macs_removed_fraction": saving(removed) / prunable,
            "macs_before": prunable, "macs_after": prunable - saving(removed),
            "model_macs_removed_fraction": saving(removed) / total_macs if total_macs else 0.0,
            "units": {k: {"kept": v[0], "total": v[1]} for k, v in counts.items()},
            "params_before": params_before,
            "params_after": sum(v.const_value.size for v in model.graph.initializers.values()
                                if v.const_value is not None and v.uses()),
            "fidelity": {"held_out_min_cosine": attempts[-1]["held_out_min_cosine"],
                         "held_out_mean_cosine": attempts[-1]["held_out_mean_cosine"],
                         "held_out_samples": len(held)},
            "time_s": round(time.perf_counter() - t0, 2),
        })
        return sum(1 for r in removed if r)

    def _execute(self, model, groups_orig, orders, removed, shape_of, dense_session, make_session):
        """Prune and refit, group by group, on `model` (a clone of the dense one)."""
        graph = model.graph
        groups = [g for g in G.find_groups(graph, shape_of) if not g.reason and g.units >= 2]
        if len(groups) != len(groups_orig):
            raise RuntimeError("the grouping of a copy of the model differs from the original's")
        position = {id(n): i for i, n in enumerate(graph)}
        dense = {}  # id(consumer node of the copy) -> (input name in the dense model, W [K, N], b)
        for g0, g in zip(groups_orig, groups):
            for c0, c in zip(g0.consumers, g.consumers):
                dense[id(c.node)] = (c0.node.inputs[0].name, G.consumer_matrix(c0), _bias(c0, _bias_site(c0)))
        kept_out: dict[int, np.ndarray] = {}  # output channels kept by a layer pruned as a producer
        seq = sorted(range(len(groups)), key=lambda i: min(position[id(c.node)] for c in groups[i].consumers))
        for i in seq:
            g, r = groups[i], removed[i]
            if not r:
                continue
            keep = G.unit_channels(g, sorted(set(range(g.units)) - set(orders[i][:r])))
            G.apply(graph, g, keep)
            kept_out.update(G.kept_columns(g, keep))
            self._refit(model, g, dense_session, dense, kept_out, make_session)

    def _refit(self, model, g: G.Group, dense_session, dense, kept_out, make_session):
        """Ridge refit of every consumer of `g`: inputs from `model` as it stands, targets dense."""
        graph = model.graph
        cons = g.consumers
        sites = [_bias_site(c) for c in cons]
        session = _session(model, make_session, [c.node.inputs[0] for c in cons])
        pnames = [c.node.inputs[0].name for c in cons]
        dnames = [dense[id(c.node)][0] for c in cons]
        grams: list = [None] * len(cons)
        for k, is_held, feed in self._stream(model, "reconstruction"):
            if is_held:
                continue
            got = session.run(pnames, feed)
            ref = dense_session.run(dnames, feed)
            for j, c in enumerate(cons):
                a, z = _rows(c, got[j]), _rows(c, ref[j])
                if grams[j] is None:
                    grams[j] = K.Gram(a.shape[1], z.shape[1], bias=c.kind != "matmul" or sites[j] is not None)
                grams[j].update(a, z)
        for j, c in enumerate(cons):
            _, w_dense, b_dense = dense[id(c.node)]
            cols = kept_out.get(id(c.node))
            if cols is not None:  # this layer's outputs were pruned already: fit the kept ones
                w_dense = w_dense[:, cols]
                b_dense = b_dense[cols] if b_dense is not None else None
            w_new, b_new = K.ridge_refit(grams[j], w_dense, b_dense, G.consumer_matrix(c), _bias(c, sites[j]))
            G.set_consumer_matrix(graph, c, w_new, "refit")
            if b_new is not None:
                if c.kind in ("conv", "gemm"):
                    G.set_const(graph, c.node, 2, b_new, "refit")
                else:
                    add, idx = sites[j]
                    G.set_const(graph, add, idx, b_new, "refit")


def _bias_site(c: G.Consumer):
    """For a MatMul consumer: (Add node, input index) of the constant bias added to its output."""
    if c.kind != "matmul" or c.node.outputs[0].is_graph_output():
        return None
    uses = c.node.outputs[0].uses()
    if len(uses) != 1 or uses[0][0].op_type != "Add" or uses[0][0].domain not in ("", "ai.onnx"):
        return None
    add, idx = uses[0][0], 1 - uses[0][1]
    b = constant_array(add.inputs[idx])
    n_out = constant_array(c.node.inputs[1]).shape[1]
    if b is None or b.shape != (n_out,) or len(add.inputs[idx].uses()) != 1:
        return None
    return add, idx


def _bias(c: G.Consumer, site) -> np.ndarray | None:
    if c.kind in ("conv", "gemm"):
        v = c.node.inputs[2] if len(c.node.inputs) > 2 else None
        b = constant_array(v)
        if b is None:
            return None
        n = G.consumer_matrix(c).shape[1]
        return np.broadcast_to(b.reshape(-1), (n,)).astype(np.float32) if b.size in (1, n) else None
    return constant_array(site[0].inputs[site[1]]) if site is not None else None
