"""Structured pruning after export: calibrated, allocated by measured sensitivity, reconstructed in
closed form.

Rewrite: for each dependency group (passes/prune/groups.py: Conv output channels, FFN neurons,
attention heads fused or not, concatenated / split / grouped channels), the units not kept are physically removed from every tensor
of the group, and every consumer of every group is refitted, in graph order:

    W_c', b_c' = argmin sum_x ||W_c'^T a_pruned(x) + b_c' - (W_c^T a_dense(x) + b_c)||^2 + lam ||[W_c'; b_c'] - [W0; b0]||^2

a ridge least squares (Conv through im2col) whose bias column compensates the mean of what was
removed; inputs a_pruned come from the model with every earlier group already pruned and refitted
(sequential), targets from the dense model, the prior [W0; b0] is the one-step OBS refit on the
dense inputs, and lam is chosen per consumer by two-fold cross-validation over the calibration
samples. Gram matrices are accumulated over the calibration stream in float64 (fixed memory) and
solved in float64 (kernels/pruning.py). Rows of padding tokens (attention mask 0) are left out
(passes/prune/token_mask.py).

Which units: within a group, removed greedily at their Optimal Brain Surgeon cost on the dense
inputs (the consumer output error after the best refit, relative to the consumer's output energy),
in chunks that keep the channel count a multiple of `prune_round` (default 8). Across groups: the
model's output error (1 - cosine, on 4 to 8 validation samples the statistics never saw) is measured with
each group alone pruned to a quarter, half, three quarters and all of what it may lose
(OBS-refitted), and each group's
chunk costs are rescaled to that measured curve; chunks are then taken by the least measured cost
per MAC saved until `prune` (a fraction) of the prunable MACs is removed, keeping at least
`MIN_KEEP` of every group. MACs are counted per layer at the calibration shapes, attention's
score and context products included.

All of this runs in onnxruntime sessions of the dense model whose consumer weights are graph
inputs: removing a unit is the same as zeroing its rows in every consumer (tested for every group
kind), so each candidate and each refit is a different feed, not a different model. The model is
cut into segments before the groups (segments.py), and a variant that changes consumers from some
group on runs from the state of each sample at that group's cut (the sensitivity from the dense
state, the sequential refit from the pruned one), not from the inputs.

Fidelity: every fifth calibration sample is held out of all statistics and choices (the one before
it validates the sensitivity measurements; past the HELDOUT_SAMPLES and VALIDATION_SAMPLES that are
kept, those slots fit like the rest); the report gives the
worst cosine of the float outputs over them (min and mean over samples). With `prune_min_cosine`
the budget backs off (3/4, 1/2, 1/4 of it) until the held-out min cosine holds, else an error says
what was reached. Preconditions: float32 weights, opset >= 13; groups that do not qualify are
declined with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import pruning as K
from onnxopt.kernels.metrics import cosine
from onnxopt.passes.int8 import calibration_data
from onnxopt.passes.prune import groups as G
from onnxopt.passes.prune import segments as SEG
from onnxopt.passes.prune import token_mask as TM
from onnxopt.passes.base import OptPass
from onnxopt.passes.int8.calibration_data import CalibrationError
from onnxopt.passes._lib.graph import constant_array, remove_dead, run_shards, session_of
from onnxopt.passes.registry import register

HOLDOUT_EVERY = 5


def _role(k: int, validation: int | None = None) -> str:
    """Sample k's part: every fifth is held out (fidelity), the one before it validates (the
    sensitivity measurements, which must not see the samples the statistics were fitted on), the
    rest fit; past the first HELDOUT_SAMPLES held-out slots and the first `validation` validation
    slots (default VALIDATION_SAMPLES; the probe may keep fewer), the slots fit too: no sample is
    read for nothing (MiniLM, 128 samples: 95 fit, not 77)."""
    r, cycle = k % HOLDOUT_EVERY, k // HOLDOUT_EVERY
    if r == HOLDOUT_EVERY - 1 and cycle < HELDOUT_SAMPLES:
        return "held"
    if r == HOLDOUT_EVERY - 2 and cycle < (VALIDATION_SAMPLES if validation is None else validation):
        return "validation"
    return "fit"

# Validation samples kept in memory to measure each group's sensitivity on: up to
# VALIDATION_SAMPLES, fewer (not under VALIDATION_MIN) once they hold VALIDATION_ROWS real tokens
# (BERT at sequence 128: 4 samples; each costs a model run per group and level).
VALIDATION_SAMPLES = 8
VALIDATION_MIN = 4
VALIDATION_ROWS = 512
HELDOUT_SAMPLES = 32
# Smallest fraction of a group's units that is always kept.
MIN_KEEP = 0.1
# Sensitivity is measured with each group pruned to these fractions of its removable chunks (all of
# them last: the allocation may take a group down to its floor, so that end is measured, not guessed).
PROBE_LEVELS = (0.25, 0.5, 0.75, 1.0)
BACKOFF = (0.75, 0.5, 0.25)
# A refit's statistics stop once every consumer of the step has this many rows per feature (and
# MIN_FIT_SAMPLES samples were read): enough for a well-posed fit, and a Conv's thousands of pixel
# rows per sample need few samples.
ROWS_PER_FEATURE = 2
MIN_FIT_SAMPLES = 16
CV_MAX_FEATURES = 1600
# A group's cut goes right before its first consumer when the state there is at most CUT_SLACK times
# the narrowest one before it and at most CUT_CAP_BYTES per sample (at the probe shapes): the refit then
# reads the consumers' inputs from the state instead of re-running the segment, and every run from the
# cut is shorter (BERT-base: the FFN's 3072-wide input beside the residual stream, 5x, 2 MB).
CUT_SLACK = 8.0
CUT_CAP_BYTES = 4 * 2**20


def _float_outputs(names, values):
    return {n: v for n, v in zip(names, values) if np.issubdtype(v.dtype, np.floating)}


def _session(model: ir.Model, make_session, extra: list[ir.Value]):
    return session_of(model, make_session, extra)


def _sample_cosine(ref: dict, got: dict, keep) -> float:
    """Worst cosine over the float outputs of one sample, padding positions left out."""
    return min((cosine(TM.select(ref[n], keep), TM.select(got[n], keep)) for n in ref), default=1.0)


def _cosines(session, samples, mask_name) -> list[float]:
    out = []
    for feed, ref in samples:
        names = list(ref)
        got = dict(zip(names, session.run(names, feed)))
        out.append(_sample_cosine(ref, got, TM.rows(feed, mask_name)))
    return out


def _conv_attrs(node: ir.Node, w_shape):
    k = tuple(w_shape[2:])
    a = node.attributes
    strides = tuple(a.get_ints("strides", (1,) * len(k)))
    dil = tuple(a.get_ints("dilations", (1,) * len(k)))
    pads = tuple(a.get_ints("pads", (0,) * 2 * len(k)))
    return k, strides, pads, dil


def _rows(c: G.Consumer, x: np.ndarray, keep=None) -> np.ndarray:
    """The consumer's input rows (im2col patches for a Conv), padding tokens left out."""
    return _spec_rows(_row_spec(c), x, keep)


def _row_spec(c: G.Consumer) -> tuple:
    """What `_spec_rows` needs of a consumer, picklable (a shard's statistics run in a worker)."""
    return (c.kind, _conv_attrs(c.node, constant_array(c.node.inputs[1]).shape) if c.kind == "conv" else None)


def _spec_rows(spec: tuple, x: np.ndarray, keep=None) -> np.ndarray:
    kind, conv = spec
    if kind != "conv":
        return TM.select(x, keep) if kind == "matmul" else x.reshape(x.shape[0], -1)
    k, s, p, d = conv
    if len(k) == 2:
        return K.im2col(x, k, s, (p[0], p[1], p[2], p[3]), d)
    return K.im2col(x[..., None], (k[0], 1), (s[0], 1), (p[0], 0, p[1], 0), (d[0], 1))


@dataclasses.dataclass(frozen=True)
class _GramJob:
    """What every shard of the dense statistics needs: the model inputs, every consumer's input (to
    fetch), row spec and bias column, and the padding mask with whether samples are trimmed to it."""

    specs: tuple
    acts: tuple[str, ...]
    rows: tuple
    bias: tuple[bool, ...]
    mask: str | None
    trim: bool
    validation: int


def _gram_shard(session, shard, job: _GramJob) -> list:
    """The Gram of every consumer's input rows over one shard's fit samples (_role, by index in the
    whole source); None where the shard gave no rows."""
    grams: list = [None] * len(job.acts)
    for i, feed in enumerate(shard.samples(list(job.specs))):
        if _role(shard.start + i, job.validation) != "fit":
            continue
        if job.trim:
            feed = TM.trim(feed, job.mask) or feed
        keep = TM.rows(feed, job.mask)
        for jj, act in enumerate(session.run(list(job.acts), feed)):
            rows = _spec_rows(job.rows[jj], act, keep)
            if grams[jj] is None:
                grams[jj] = K.Gram(rows.shape[1], bias=job.bias[jj])
            grams[jj].update(rows)
    for g in grams:
        if g is not None:
            _ = g.aa  # reading the sums flushes the buffered rows: only the sums travel back
    return grams


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


def _layout(c: G.Consumer, m: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A [K, N] consumer matrix in the node's own weight layout (the inverse of consumer_matrix)."""
    if c.kind == "conv":
        m = m.T.reshape(like.shape[0], -1, *like.shape[2:])
    elif c.kind == "gemm" and c.node.attributes.get_int("transB", 0):
        m = m.T
    return np.ascontiguousarray(m, dtype=np.float32)


class _Tuner:
    """The dense model with the weight and bias of every consumer as graph inputs, returning every
    consumer's input, as a chain of segment sessions cut before the groups (segments.py).

    Removing a unit is the same as zeroing its rows in every consumer (tests/test_prune.py proves
    it for every group kind), so every candidate pruning and every refit is a feed of these
    sessions instead of a new model; and a variant that changes the consumers from some group on
    runs from the cut before that group, from per-sample states kept there."""

    def __init__(self, model: ir.Model, consumers: list[G.Consumer], make_session, cuts=(),
                 types: dict | None = None, nbytes=None) -> None:
        graph = model.graph
        self.consumers = consumers
        self.sites = [_bias_site(c) for c in consumers]
        self.dense_w = [G.consumer_matrix(c).astype(np.float32) for c in consumers]
        self.dense_b = []
        self.names = []  # (weight input, bias input or None) per consumer
        self.feeds: dict[str, np.ndarray] = {}
        undo = []
        try:
            self._build(model, make_session, cuts, types, nbytes, undo)
        finally:
            for fn in reversed(undo):
                fn()

    def _build(self, model, make_session, cuts, types, nbytes, undo) -> None:
        graph = model.graph
        for j, (c, site) in enumerate(zip(self.consumers, self.sites)):
            w = constant_array(c.node.inputs[1])
            b = _bias(c, site) if c.kind == "matmul" else _bias(c, None)
            wname = f"onnxopt.prune.w{j}"
            self._swap(graph, c.node, 1, wname, w, undo)
            bname = None
            if c.kind in ("conv", "gemm"):
                b = np.zeros(self.dense_w[j].shape[1], np.float32) if b is None else b
                bname = f"onnxopt.prune.b{j}"
                self._swap(graph, c.node, 2, bname, b, undo)
            elif site is not None:
                bname = f"onnxopt.prune.b{j}"
                self._swap(graph, site[0], site[1], bname, b, undo)
            self.dense_b.append(None if b is None else np.asarray(b, np.float32))
            self.names.append((wname, bname))
        self.acts = [c.node.inputs[0].name for c in self.consumers]
        ranges = SEG.live_ranges(graph, exclude=set(self.feeds))
        places = SEG.place_cuts(ranges, sorted(set(cuts)), nbytes or (lambda name: 0), CUT_SLACK, CUT_CAP_BYTES)
        self.chain = SEG.Chain(model, places, self.acts, make_session, dict(types or {}),
                               external=frozenset(self.feeds))

    def _swap(self, graph, node, index, name, array, undo) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape))
        n_inputs = len(node.inputs)
        old = node.inputs[index] if index < n_inputs else None
        if index >= n_inputs:
            node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
        graph.inputs.append(value)
        self.feeds[name] = array

        def restore():
            graph.inputs.remove(value)
            node.replace_input_with(index, old)
            if index >= n_inputs:
                node.resize_inputs(n_inputs)

        undo.append(restore)

    def weights(self, j: int, m: np.ndarray, b: np.ndarray | None) -> dict[str, np.ndarray]:
        """Feeds that give consumer j the [K, N] matrix m (and bias b)."""
        wname, bname = self.names[j]
        out = {wname: _layout(self.consumers[j], m, self.feeds[wname])}
        if bname is not None and b is not None:
            out[bname] = np.ascontiguousarray(b, dtype=np.float32)
        return out

    def has_bias(self, j: int) -> bool:
        return self.names[j][1] is not None

    def augmented(self, j: int) -> np.ndarray:
        """The dense [K (+1), N] matrix of consumer j, its bias as a last row when it has one."""
        w = self.dense_w[j].astype(np.float64)
        return np.concatenate([w, self.dense_b[j][None].astype(np.float64)], 0) if self.has_bias(j) else w

    def run(self, feed: dict, overrides: dict | None = None, outputs: list[str] | None = None) -> list[np.ndarray]:
        """The values `outputs` (default: every consumer's input) on one sample, from the model's
        inputs, with the consumer weights `overrides` (default: the dense ones)."""
        return self.chain.run(self.chain.start(feed), 0, self.with_(overrides), outputs or self.acts)

    def with_(self, overrides: dict | None) -> dict:
        """Every consumer's weight feed, `overrides` in place of the dense ones."""
        return {**self.feeds, **overrides} if overrides else self.feeds


def _measured_costs(costs: list[float], points: list[tuple[float, float]]) -> list[float]:
    """Chunk costs rescaled to a group's measured curve: the cumulative proxy cost P is mapped to
    the measured output error by piecewise-linear interpolation through (0, 0) and the measured
    (P, error) points, extended past the last one at its ratio; the marginal costs are made
    non-decreasing so that taking a group's chunks in order stays the cheapest way."""
    if not costs:
        return []
    cum = np.cumsum(np.maximum(costs, 0.0))
    xs = np.maximum.accumulate(np.array([0.0] + [p for p, _ in points]))
    ys = np.maximum.accumulate(np.array([0.0] + [max(e, 0.0) for _, e in points]))
    xs = xs + np.arange(len(xs)) * 1e-15  # strictly increasing for np.interp
    est = np.where(cum <= xs[-1], np.interp(cum, xs, ys), ys[-1] * cum / max(xs[-1], 1e-30))
    marginal = np.diff(np.concatenate([[0.0], est]))
    return [float(x) for x in np.maximum.accumulate(np.maximum(marginal, 1e-15))]


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
            if self._trim:
                feed = TM.trim(feed, self._mask) or feed
            yield k, _role(k, self._validation), feed

    # ---- the pass -----------------------------------------------------------------------------

    def apply(self, model: ir.Model) -> int:
        opts = self.options
        fraction = opts.get("prune")
        if fraction is None:
            return 0
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        last = [t0]

        def clock(phase: str) -> None:  # seconds spent per phase, for the report
            now = time.perf_counter()
            phases[phase] = round(phases.get(phase, 0.0) + now - last[0], 2)
            last[0] = now

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
        self._mask = TM.find(graph)
        if self._mask is not None:
            self.details["padding_mask"] = self._mask

        # Probe: concrete shapes of every value, and the reference outputs of fit / held-out samples.
        values = [v for node in graph for v in node.outputs if v.name]
        probe = _session(model, make_session, values)
        out_names = [v.name for v in graph.outputs]
        shapes: dict[str, tuple] = {}
        val, held = [], []  # validation samples (sensitivity), held-out samples (fidelity)
        val_rows = 0
        self._trim = False
        self._validation = None  # validation slots the probe keeps (the later ones fit)
        for k, role, feed in self._stream(model, "probe"):
            if k == 0:
                names = out_names + [v.name for v in values if v.name not in out_names]
                got = probe.run(names, feed)
                shapes = {n: tuple(a.shape) for n, a in zip(names, got)}
                shapes.update({n: tuple(np.shape(a)) for n, a in feed.items()})
                types = {n: np.asarray(a).dtype for n, a in [*zip(names, got), *feed.items()]}
                outs = got[: len(out_names)]
                self._trim = self._trims(probe, out_names, feed, outs)
                if self._trim:
                    feed = TM.trim(feed, self._mask)
                    outs = probe.run(out_names, feed)
            elif role == "held" or (role == "validation" and (
                    len(val) < VALIDATION_MIN or (len(val) < VALIDATION_SAMPLES and val_rows < VALIDATION_ROWS))):
                outs = probe.run(out_names, feed)
            else:
                continue
            ref = _float_outputs(out_names, outs)
            if role == "validation":
                keep = TM.rows(feed, self._mask)
                val_rows += int(keep.sum()) if keep is not None else 1
            if role != "fit":
                (held if role == "held" else val).append((feed, ref))
        del probe
        self._validation = len(val)
        clock("probe")
        if not held or not val:
            raise CalibrationError(f"pruning needs at least {HOLDOUT_EVERY} calibration samples "
                                   f"(every {HOLDOUT_EVERY}th is held out to measure fidelity, the one before it to measure sensitivity)")

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

        consumers = [c for g in ok for c in g.consumers]
        slots, j = [], 0
        for g in ok:
            slots.append(list(range(j, j + len(g.consumers))))
            j += len(g.consumers)
        position = {id(n): i for i, n in enumerate(graph)}
        first = [min(position[id(c.node)] for c in g.consumers) for g in ok]  # where a group's change starts

        def nbytes(name):
            return float(np.prod(shapes.get(name, (0,)))) * types[name].itemsize if name in types else 0.0

        tuner = _Tuner(model, consumers, make_session, first, types, nbytes)
        clock("sessions")

        # Statistics on the dense model: Gram of every consumer's input rows ([a, 1] with a bias), shard
        # by shard (_gram_shard) where the shard runner says (--workers, --ray), merged in shard order.
        grams: list = [None] * len(consumers)
        source = calibration_data.open_source(self._data, model, opts.get("calibration_samples"))
        job = _GramJob(tuple(calibration_data.input_specs(model)), tuple(tuner.acts),
                       tuple(_row_spec(c) for c in consumers), tuple(tuner.has_bias(jj) for jj in range(len(consumers))),
                       self._mask, self._trim, self._validation)

        def take(index: int, shard_grams: list) -> None:
            for jj, g in enumerate(shard_grams):
                if g is not None:
                    grams[jj] = g if grams[jj] is None else grams[jj].merge(g)

        run_shards(opts, model, [c.node.inputs[0] for c in consumers], _gram_shard, source.shards(), job, take,
                   optimize=True)

        clock("statistics")

        # Order within groups (OBS) and chunk costs; then each group's measured sensitivity curve, in
        # graph order, each variant run from the dense state of the validation samples at its cut.
        chunks, costs, orders, snapshots = [], [], [], []
        inverses: list = [None] * len(consumers)  # (G + lam I)^-1 of each consumer, for the refit's prior
        float_outs = [n for n in out_names if n in val[0][1]]
        for g, sl in zip(ok, slots):
            floor = max(1, math.ceil(MIN_KEEP * g.units))
            sizes = K.chunk_sizes(g.units, g.unit, round_to, floor)
            levels = sorted({max(1, round(q * len(sizes))) for q in PROBE_LEVELS}) if sizes else []
            obs = [K.ObsConsumer(tuner.augmented(jj), grams[jj].mean(), consumers[jj].block * g.unit,
                                 K.damping(grams[jj])) for jj in sl]
            order, cost, snaps = K.obs_order(obs, g.units, sizes, snapshots=levels)
            for jj, o in zip(sl, obs):
                inverses[jj], grams[jj] = o.h0, None  # the float32 inverse is all the refit needs
            chunks.append(sizes)
            costs.append(cost)
            orders.append(order)
            snapshots.append(snaps)
        clock("order")
        seq = sorted(range(len(ok)), key=lambda i: first[i])
        chain = tuner.chain
        curves: list = [None] * len(ok)
        states, at = [chain.start(feed) for feed, _ in val], 0
        for gi in seq:
            ci = chain.index(first[gi])
            states = [chain.advance(st, at, ci, tuner.feeds) for st in states]
            at = ci
            points = []
            for t, snap in sorted(snapshots[gi].items()):
                over = {}
                for jj, w in zip(slots[gi], snap):
                    over.update(tuner.weights(jj, *_split_bias(w, tuner.has_bias(jj))))
                feeds = tuner.with_(over)
                errs = []
                for (feed, ref), st in zip(val, states):
                    got = dict(zip(float_outs, chain.run(st, ci, feeds, float_outs)))
                    errs.append(1.0 - _sample_cosine(ref, got, TM.rows(feed, self._mask)))
                points.append((float(sum(costs[gi][:t])), float(np.mean(errs))))
            curves[gi] = points
        del states
        clock("sensitivity")
        scaled = [_measured_costs(cs, pts) for cs, pts in zip(costs, curves)]

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
        attempts, tried = [], set()
        for scale in (1.0, *BACKOFF) if min_cos is not None else (1.0,):
            budget = fraction * scale
            taken = K.allocate(chunks, scaled, saving, budget * prunable)
            if tuple(taken) in tried:  # a smaller budget that still takes the same chunks (coarse groups)
                continue
            tried.add(tuple(taken))
            removed = [sum(s[:t]) for s, t in zip(chunks, taken)]
            fitted = self._refit(model, tuner, ok, slots, seq, first, orders, removed, inverses)
            clock("reconstruction")
            trial = model.clone()
            self._apply(trial, ok, orders, removed, fitted, shape_of)
            cos = _cosines(_session(trial, make_session, []), held, self._mask)
            clock("fidelity")
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
        for g, sl, r, pts in zip(ok, slots, removed, curves):
            self.details["groups"].append({
                "group": g.describe(), "kind": g.kind, "units": g.units, "unit_channels": g.unit,
                "kept": g.units - r, "removed": r,
                "sensitivity": [{"proxy": p, "output_error": e} for p, e in pts],
                "ridge": [fitted[jj][2] for jj in sl if jj in fitted],
                "why": ("kept whole: its cheapest chunk costs more per MAC than the others'" if r == 0 else
                        f"removed the {r} units of least reconstruction cost"),
                "node": g.start.name})
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
            "time_phases_s": phases,
        })
        return sum(1 for r in removed if r)

    def _trims(self, session, out_names, feed, outs) -> bool:
        """Whether samples may be cut to their real tokens: the first one, cut, gives the same
        outputs at its real positions (and the same pooled outputs) as whole."""
        short = TM.trim(feed, self._mask)
        if short is None:
            return False
        try:
            cut = session.run(out_names, short)
        except Exception:  # e.g. a fixed sequence length
            return False
        keep, keep_cut = TM.rows(feed, self._mask), TM.rows(short, self._mask)
        for a, b in zip(outs, cut):
            if not np.issubdtype(a.dtype, np.floating):
                continue
            a, b = TM.select(a, keep), TM.select(b, keep_cut)
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(float(np.abs(a).max()), 1.0)):
                return False
        self.details["padding_trimmed"] = True
        return True

    def _refit(self, model, tuner: _Tuner, groups, slots, seq, first, orders, removed, inverses) -> dict:
        """Sequential ridge refit, in graph order, of every consumer from the first pruned group on:
        inputs from the model with the earlier groups pruned (zeroed rows) and refitted, targets
        from the dense model. Returns {consumer index: (W [kept rows, N], b or None, ridge)}.

        Fit samples are read in order, once: each one's dense and pruned states at the current
        group's cut are kept (a group reads as many samples as it needs, the first ones from these
        states) and advanced group by group, so each step re-runs only the segments it changed."""
        chain = tuner.chain
        current: dict[str, np.ndarray] = {}
        fitted = {}
        chosen: list[float] = []  # ridge strengths chosen by cross-validation so far
        cache: list[_FitState] = []  # per fit sample read, in order
        at = 0  # the segment the cached pruned states are before
        stream = (feed for _, role, feed in self._stream(model, "reconstruction") if role == "fit")
        cuts = [chain.index(first[gi]) for gi in seq]
        started = False
        for step, gi in enumerate(seq):
            g, r, sl = groups[gi], removed[gi], slots[gi]
            if not r and not started:
                continue
            started = True
            ci = cuts[step]
            after = cuts[step + 1] if step + 1 < len(seq) else ci  # where the next group starts
            drop = G.unit_channels(g, orders[gi][:r])
            kept_rows, gone = {}, {}
            for jj in sl:
                c = tuner.consumers[jj]
                n_rows = tuner.dense_w[jj].shape[0]
                gone[jj] = G.consumer_rows(c, drop) if r else np.zeros(0, int)
                mask = np.ones(n_rows, dtype=bool)
                mask[gone[jj]] = False
                kept_rows[jj] = np.flatnonzero(mask)
                w0 = tuner.dense_w[jj].copy()
                w0[gone[jj]] = 0.0
                current.update(tuner.weights(jj, w0, tuner.dense_b[jj]))
            # This group's consumers lie after its cut: the zeroed rows do not change the states there.
            pruned_feeds = tuner.with_(current)
            for st in cache:
                if st.dense_at < ci:
                    st.dense, st.dense_at = chain.advance(st.dense, st.dense_at, ci, tuner.feeds), ci
                st.pruned = chain.advance(st.pruned, at, ci, pruned_feeds)
            at = ci
            halves = {jj: [None, None] for jj in sl}
            names = [tuner.acts[jj] for jj in sl]
            n = 0
            while not (n >= MIN_FIT_SAMPLES and all(
                    h[0] is not None and h[1] is not None and min(h[0].rows, h[1].rows) >= ROWS_PER_FEATURE
                    * h[0].features / 2 for h in halves.values())):
                if n == len(cache):
                    feed = next(stream, None)
                    if feed is None:
                        break
                    start = chain.start(feed)
                    cache.append(_FitState(TM.rows(feed, self._mask), chain.advance(start, 0, ci, tuner.feeds), ci,
                                           chain.advance(start, 0, ci, pruned_feeds)))
                st = cache[n]
                keep = st.keep
                pruned = dict(zip(names, chain.run(st.pruned, ci, pruned_feeds, names)))
                # The dense run that gives this group's inputs also takes the state on to the next cut.
                seen = dict.fromkeys(names)
                moved = chain.advance(st.dense, ci, after, tuner.feeds, seen) if after > ci else None
                if moved is not None and all(v is not None for v in seen.values()):
                    st.dense, st.dense_at = moved, after
                    dense = seen
                else:
                    dense = dict(zip(names, chain.run(st.dense, ci, tuner.feeds, names)))
                for jj in sl:
                    c, act = tuner.consumers[jj], tuner.acts[jj]
                    rows_p = _rows(c, pruned[act], keep)[:, kept_rows[jj]]
                    # The targets: the dense consumer's outputs (without its bias), N wide where
                    # its dense inputs would be K wide (3072 against 768 for BERT-base's FFN).
                    y = _rows(c, dense[act], keep) @ tuner.dense_w[jj]
                    half = halves[jj]
                    if half[n % 2] is None:
                        half[n % 2] = K.Gram(rows_p.shape[1], y.shape[1], bias=tuner.has_bias(jj))
                    half[n % 2].update(rows_p, y)
                n += 1
            for jj in sl:
                has_b = tuner.has_bias(jj)
                prior = K.compensated(tuner.augmented(jj), inverses[jj], gone[jj])
                pw, pb = _split_bias(prior, has_b)
                half = halves[jj]
                if half[1] is None:  # a single fit sample: no cross-validation
                    half[1] = K.Gram(half[0].aa.shape[0] - has_b, half[0].az.shape[1], bias=has_b)
                # Cross-validation costs a dozen K x K solves: layers wider than CV_MAX_FEATURES take
                # the strength chosen most often on the narrower ones (BERT-base's 3072-wide FFN).
                if half[0].features <= CV_MAX_FEATURES or not chosen:
                    grid, scales = K.RIDGE_GRID, True
                else:
                    grid, scales = (max(set(chosen), key=chosen.count),), False
                w_new, b_new, d = K.ridge_refit(half, tuner.dense_b[jj], pw[kept_rows[jj]], pb,
                                                grid=grid, scales=scales)
                if len(grid) > 1 and d != "scale":
                    chosen.append(d)
                full = np.zeros_like(tuner.dense_w[jj])
                full[kept_rows[jj]] = w_new
                current.update(tuner.weights(jj, full, b_new))
                fitted[jj] = (w_new, b_new, d)
        return fitted

    def _apply(self, model, groups_orig, orders, removed, fitted, shape_of) -> None:
        """Physically remove the pruned units from `model` (a clone of the dense one) and write the
        refitted consumer weights, sliced to the output channels their own groups keep."""
        graph = model.graph
        groups = [g for g in G.find_groups(graph, shape_of) if not g.reason and g.units >= 2]
        if len(groups) != len(groups_orig):
            raise RuntimeError("the grouping of a copy of the model differs from the original's")
        consumers = [c for g in groups for c in g.consumers]
        sites = [_bias_site(c) for c in consumers]  # before slicing: the Add constants are still whole
        kept_out: dict[int, np.ndarray] = {}
        for i, g in enumerate(groups):
            keep = G.unit_channels(g, sorted(set(range(g.units)) - set(orders[i][: removed[i]])))
            if removed[i]:
                G.apply(graph, g, keep)
            kept_out.update(G.kept_columns(g, keep))
        for jj, (w_new, b_new, _) in fitted.items():
            c, site = consumers[jj], sites[jj]
            cols = kept_out.get(id(c.node))
            if cols is not None and len(cols) < w_new.shape[1]:
                w_new = w_new[:, cols]
                b_new = b_new[cols] if b_new is not None else None
            G.set_consumer_matrix(graph, c, w_new, "refit")
            if b_new is not None:
                if c.kind in ("conv", "gemm"):
                    G.set_const(graph, c.node, 2, b_new, "refit")
                else:
                    G.set_const(graph, site[0], site[1], b_new, "refit")


@dataclasses.dataclass
class _FitState:
    """A fit sample in the sequential refit: its padding rows kept, and its states (segments.py) in
    the dense model (before segment `dense_at`) and in the pruned one (before the current cut)."""

    keep: np.ndarray | None
    dense: dict
    dense_at: int
    pruned: dict


def _split_bias(w: np.ndarray, has_bias: bool):
    """[K (+1), N] -> (W [K, N], bias row or None)."""
    return (w[:-1], w[-1]) if has_bias else (w, None)


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
