"""Math of structured pruning (numpy only): streamed Gram matrices, im2col, unit ordering by
reconstruction error, sensitivity-weighted allocation under a MAC budget, ridge refits.

Notation: a consumer layer computes y = W^T a (+ b), W of shape [K, N], a the layer's input row
(a MatMul row, or an im2col patch of a Conv). A pruning unit owns a block J of the rows of W
(one input channel of a MatMul, the k*k patch rows of a Conv input channel, the dh channels of an
attention head). G = E[a a^T] is the Gram of the dense inputs.

* Removing the rows S without refitting costs tr(W_S^T G_SS W_S) (output energy lost).
* Removing them and refitting the others optimally (Optimal Brain Surgeon, H = G^-1) costs
  tr(W_S^T inv(H_SS) W_S); after the removal H and W are updated in closed form, so units are
  removed greedily, each step at its true marginal cost given the earlier removals.
* Both are divided by the consumer's output energy tr(W^T G W), so costs of different layers
  and kinds are relative errors and can be ranked together.
* The refit of a consumer on the pruned model's inputs is a ridge least squares toward a prior
  (the one-step OBS refit); its strength is chosen by two-fold cross-validation over the
  calibration samples, beside a refit of per-row scales only (few unknowns: it holds when rows are
  scarce).
"""

from __future__ import annotations

import numpy as np

# OBS damping (the order within a group, its costs, and the one-step refit used as the prior)
# relative to the mean diagonal of the Gram matrix. Measured on MiniLM at 25% (160 held-out
# sentences, pooled-embedding cosine min / mean): 0.01 -> 0.830 / 0.952, 0.1 -> 0.870 / 0.959,
# 1.0 -> 0.869 / 0.947.
DAMP = 0.1
# Half of that damping is proportional to each feature's own energy (diag G, Marquardt's form of
# Levenberg's damping), half uniform: features of very different scales (GELU outputs of an FFN,
# im2col patches) are each shrunk in proportion, not the weak ones swamped by a uniform term.
# Measured (MiniLM 160 held-out sentences, pooled-embedding cosine mean; EfficientNet-Lite0 mean
# logit cosine on 200 crops), uniform -> half and half: MiniLM 25% 0.9603 -> 0.9613, 50% 0.8889 ->
# 0.8905; EfficientNet 20% 0.9818 -> 0.9834. All of it proportional: MiniLM 25% 0.9598.
DAMP_DIAGONAL = 0.5


def damping(gram: "Gram") -> float:
    """OBS damping for a Gram of `rows` rows: DAMP, stronger when there are fewer rows than
    features (a classifier after global pooling sees one row per sample: its Gram has rank = the
    samples, and an undamped refit would reconstruct those samples exactly and nothing else)."""
    return DAMP * max(1.0, gram.features / max(gram.rows, 1))


class Gram:
    """Running sums of a a^T (float64), of a, and optionally of a z^T for a second input z.

    Rows are buffered up to FLUSH_ROWS and added in one product (a few rows per sample make
    small, slow matrix products); memory is fixed by the feature sizes, whatever the number of
    rows streamed in."""

    FLUSH_ROWS = 2048

    def __init__(self, k: int, k_cross: int | None = None, bias: bool = False) -> None:
        self.bias = bias
        kk = k + (1 if bias else 0)
        self._aa = np.zeros((kk, kk))
        self._az = np.zeros((kk, k_cross)) if k_cross is not None else None
        self._buf: list = []
        self._buffered = 0
        self.rows = 0

    def update(self, a: np.ndarray, z: np.ndarray | None = None) -> None:
        a = np.asarray(a).reshape(-1, a.shape[-1])
        if self._az is not None:
            z = np.asarray(z).reshape(a.shape[0], -1)
        self._buf.append((a, z))
        self._buffered += a.shape[0]
        self.rows += a.shape[0]
        if self._buffered >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        # The product of one buffer (at most FLUSH_ROWS rows) in float32, summed into float64: a
        # float64 product costs twice as much, and its rounding over a few thousand rows is far
        # below the ridge damping every solve adds.
        if not self._buf:
            return
        a = np.concatenate([x for x, _ in self._buf]).astype(np.float32)
        if self.bias:
            a = np.concatenate([a, np.ones((a.shape[0], 1), np.float32)], axis=1)
        self._aa += a.T @ a
        if self._az is not None:
            self._az += a.T @ np.concatenate([z for _, z in self._buf]).astype(np.float32)
        self._buf, self._buffered = [], 0

    @property
    def aa(self) -> np.ndarray:
        self._flush()
        return self._aa

    @property
    def az(self) -> np.ndarray | None:
        self._flush()
        return self._az

    @property
    def features(self) -> int:
        """Columns of [a (, 1)]."""
        return self._aa.shape[0]

    def mean(self) -> np.ndarray:
        return self.aa / max(self.rows, 1)

    def merge(self, other: "Gram") -> "Gram":
        """A new Gram of both row sets together (sharded statistics): the sums added, `self` first,
        so merging shards in index order fixes the float summation order."""
        if (self.bias, self.features, None if self._az is None else self._az.shape[1]) != (
                other.bias, other.features, None if other._az is None else other._az.shape[1]):
            raise ValueError("cannot merge Gram matrices of different features")
        out = Gram.__new__(Gram)
        out.bias, out.rows, out._buf, out._buffered = self.bias, self.rows + other.rows, [], 0
        out._aa = self.aa + other.aa
        out._az = None if self._az is None else self.az + other.az
        return out


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """Patches of an NCHW input as rows [N*OH*OW, C*kh*kw], columns ordered like W.reshape(Cout, -1)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh : i * dh + sh * oh : sh, j * dw : j * dw + sw * ow : sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * kh * kw)


def _damped(g: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """G + damp * (DAMP_DIAGONAL * diag(G) + (1 - DAMP_DIAGONAL) * mean(diag(G)) I)."""
    m = max(float(np.mean(np.diag(g))), 1e-12)
    d = np.maximum(np.diag(g), 1e-6 * m)
    return g + np.diag(damp * (DAMP_DIAGONAL * d + (1.0 - DAMP_DIAGONAL) * m))


def _quad(w: np.ndarray, g: np.ndarray) -> float:
    """tr(W^T G W)."""
    return float(np.sum((g @ w) * w))


def output_energy(w: np.ndarray, g: np.ndarray) -> float:
    return max(_quad(w, g), 1e-30)


class ObsConsumer:
    """One consumer's state for greedy removal: W (compensated as rows go) and H = G^-1, both kept
    over the rows still alive only (compacted as rows go: each update then costs what is left)."""

    # Compact H and W once this fraction of their rows is dead (removed rows are pinned until then).
    COMPACT = 0.125

    # The greedy updates of H and W run in float32 (a third of the float64 time for BERT-base's
    # 3072-wide FFN; H is inverted in float64, and the damping bounds its condition number); the
    # refits themselves are solved in float64.
    DTYPE = np.float32

    def __init__(self, w: np.ndarray, g: np.ndarray, block: int, damp: float = DAMP) -> None:
        self.block = block
        self.shape = w.shape
        self.wc = np.array(w, dtype=self.DTYPE)
        self.energy = output_energy(w, g)
        self.h = np.linalg.inv(_damped(g, damp)).astype(self.DTYPE)
        self.h0 = self.h.copy()  # before any removal: the refit's prior (compensated) reuses it
        self.idx = np.arange(w.shape[0])  # original row of each compact position
        self.pos = np.arange(w.shape[0])  # compact position of each original row (-1: removed)
        self.dead = np.zeros(w.shape[0], dtype=bool)  # compact positions removed, not yet compacted

    @property
    def w(self) -> np.ndarray:
        """W over all rows, removed ones zero."""
        full = np.zeros(self.shape)
        full[self.idx] = self.wc
        return full

    def rows(self, units) -> np.ndarray:
        b = self.block
        return np.concatenate([np.arange(u * b, (u + 1) * b) for u in units])

    def unit_costs(self, units: np.ndarray) -> np.ndarray:
        """Relative cost of removing each unit alone (vectorized over units)."""
        b = self.block
        if b == 1:
            p = self.pos[units]
            return np.sum(self.wc[p] ** 2, axis=1) / np.diag(self.h)[p] / self.energy
        idx = self.pos[units[:, None] * b + np.arange(b)[None, :]]  # [n, b]
        hjj = self.h[idx[:, :, None], idx[:, None, :]]  # [n, b, b]
        wj = self.wc[idx]  # [n, b, N]
        sol = np.linalg.solve(hjj, wj)
        return np.einsum("ubn,ubn->u", wj, sol) / self.energy

    def remove(self, units) -> float:
        """Remove the units jointly; return their relative cost and update W and H."""
        s = self.pos[self.rows(units)]
        hss = self.h[np.ix_(s, s)]
        ws = self.wc[s]
        inv = np.linalg.inv(hss)
        cost = _quad(ws.astype(np.float64), inv.astype(np.float64)) / self.energy
        hs = self.h[:, s]
        hsi = hs @ inv
        self.wc -= hsi @ ws
        self.h -= hsi @ hs.T
        # Removed rows are now exactly zero in W; pin them so later steps never choose them again.
        self.h[s, :] = 0.0
        self.h[:, s] = 0.0
        self.h[s, s] = 1.0
        self.wc[s] = 0.0
        self.dead[s] = True
        if self.dead.sum() > self.COMPACT * len(self.dead):
            keep = ~self.dead
            self.h = np.ascontiguousarray(self.h[np.ix_(keep, keep)])
            self.wc = np.ascontiguousarray(self.wc[keep])
            self.pos[self.idx[self.dead]] = -1
            self.idx = self.idx[keep]
            self.pos[self.idx] = np.arange(len(self.idx))
            self.dead = np.zeros(len(self.idx), dtype=bool)
        return cost


def obs_order(consumers: list[ObsConsumer], units: int, chunks: list[int],
              snapshots=()) -> tuple[list[int], list[float], dict[int, list[np.ndarray]]]:
    """Greedy removal order of `units` units, in chunks of the given sizes (sum < units):
    each chunk is the units of lowest current cost over all consumers, removed jointly.
    Returns (order of removed units, relative cost of each chunk, {t: each consumer's compensated
    W after the first t chunks} for t in `snapshots`)."""
    alive = np.ones(units, dtype=bool)
    order, costs, snaps = [], [], {}
    for t, size in enumerate(chunks, start=1):
        cand = np.flatnonzero(alive)
        total = sum(c.unit_costs(cand) for c in consumers)
        pick = cand[np.argsort(total, kind="stable")[:size]]
        costs.append(sum(c.remove(pick) for c in consumers))
        alive[pick] = False
        order.extend(int(u) for u in pick)
        if t in snapshots:
            snaps[t] = [c.w.copy() for c in consumers]
    return order, costs, snaps


def chunk_sizes(units: int, unit_channels: int, round_to: int, floor_units: int, steps: int = 64) -> list[int]:
    """Sizes (in units) of successive removable chunks so that every kept count of channels is a
    multiple of `round_to` where the units allow it; at least `floor_units` units stay. Large
    groups get larger chunks (a multiple of the rounded size), about `steps` of them at most."""
    per = max(1, -(-round_to // unit_channels))  # units per chunk
    per *= max(1, units // (per * steps))
    first = units % per
    sizes = ([first] if first else []) + [per] * (units // per)
    out, left = [], units
    for s in sizes:
        if left - s < floor_units:
            break
        out.append(s)
        left -= s
    return out


def allocate(chunks: list[list[int]], costs: list[list[float]], saving, budget: float) -> list[int]:
    """Chunks to remove per group so the removed MACs reach `budget` at the least total cost.

    `chunks[g]` are group g's removable chunks (units each) and `costs[g]` their costs, increasing
    along the group (greedy order); `saving(removed units per group)` gives the MACs removed (a
    product of kept ratios per layer, so not additive). The cheapest cost per MAC among the
    groups' next chunks is taken until the budget is met. Returns chunks removed per group."""
    taken = [0] * len(chunks)

    def removed(extra: int | None = None) -> list[int]:
        units = [sum(c[:t]) for c, t in zip(chunks, taken)]
        if extra is not None:
            units[extra] += chunks[extra][taken[extra]]
        return units

    current = saving(removed())
    while current < budget:
        best = None
        for i in range(len(chunks)):
            if taken[i] < len(chunks[i]):
                gain = saving(removed(i)) - current
                key = costs[i][taken[i]] / max(gain, 1e-12)
                if best is None or key < best[0]:
                    best = (key, i)
        if best is None:
            break
        taken[best[1]] += 1
        current = saving(removed())
    return taken


def compensated(w: np.ndarray, h: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """W with `rows` removed and the others refitted optimally on the dense inputs (one OBS step),
    from H = (G + lam I)^-1 (the inverse the greedy order holds, ObsConsumer.h0):
    W_K' = W_K - H_KS H_SS^-1 W_S, W_S' = 0, which is W_K + (G + lam I)_KK^-1 (G + lam I)_KS W_S by
    the Schur complement, for an |S| x |S| solve instead of the |K| x |K| one. With a bias row last
    in W and the ones column last in G (never in `rows`), the bias absorbs the mean of what was removed."""
    out = np.array(w, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows):
        hs = np.asarray(h[:, rows], dtype=np.float64)
        out -= hs @ np.linalg.solve(hs[rows], out[rows])
        out[rows] = 0.0
    return out


# Ridge strengths tried for a refit, relative to the mean diagonal of the (half) Gram matrix; the
# one with the least error on the other half of the calibration samples is used.
RIDGE_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _target(gram: Gram, b_dense: np.ndarray | None) -> np.ndarray:
    """Sum over rows of [a, 1] (y_dense + b)^T, from the Gram's sum of [a, 1] y_dense^T (the dense
    outputs without their bias: N columns where the dense inputs would take K, fewer for the wide
    inputs of an FFN's second MatMul or a Conv's patches)."""
    target = np.array(gram.az, dtype=np.float64)
    if gram.bias and b_dense is not None:
        # The ones column sums to the row count: A^T (1 b^T) is the column of sums times b.
        target += gram.aa[:, -1:] * b_dense.astype(np.float64)[None, :]
    return target


def _scale_fit(aa: np.ndarray, bias: bool, target: np.ndarray, prior: np.ndarray, damp: float = 1e-3) -> np.ndarray:
    """The prior with one scale per input row (and a free bias) fitted by least squares: W' = diag(s) P,
    b' free; K + N unknowns instead of K x N, so it holds with few calibration rows (the "mask tuning"
    of post-training transformer pruning). `prior` is [K (+1), N] like the solution; s is pulled
    toward 1 and b toward the prior's bias by `damp` of the system's mean diagonal. `aa` is the sum
    of [a, 1] [a, 1]^T (ones column last when `bias`), `target` the sum of [a, 1] y^T."""
    k = prior.shape[0] - (1 if bias else 0)
    p = prior[:k]
    m_ss = aa[:k, :k] * (p @ p.T)
    rhs_s = np.sum(target[:k] * p, axis=1)
    if bias:
        sums, rows = aa[:k, -1], aa[-1, -1]
        n = p.shape[1]
        m_sb = sums[:, None] * p
        m = np.block([[m_ss, m_sb], [m_sb.T, rows * np.eye(n)]])
        rhs = np.concatenate([rhs_s, target[-1]])
        x0 = np.concatenate([np.ones(k), prior[-1]])
    else:
        m, rhs, x0 = m_ss, rhs_s, np.ones(k)
    lam = damp * max(float(np.mean(np.diag(m))), 1e-12)
    x = np.linalg.solve(m + lam * np.eye(len(x0)), rhs + lam * x0)
    out = p * x[:k, None]
    return np.concatenate([out, x[k:][None]], 0) if bias else out


def ridge_refit(halves: list[Gram], b_dense: np.ndarray | None, w_init: np.ndarray,
                b_init: np.ndarray | None, grid=RIDGE_GRID, scales: bool = True) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Least squares of y_dense + b (the dense consumer's outputs) on the pruned inputs a, ridge
    toward (w_init, b_init): solves (A^T A + lam I) [W; b] = A^T (y + b) + lam [W0; b0] in float64.

    `halves` are two Grams over disjoint halves of the calibration samples (sums of [a, 1] [a, 1]^T
    and of [a, 1] y_dense^T, y_dense = W_dense^T a_dense without the bias). lam is chosen from
    `grid` (times the mean diagonal of a half's Gram) by two-fold cross-validation, beside the
    prior with per-row scales refitted (`_scale_fit`, when `scales`); the winner is then solved on
    both halves.
    Returns (W, b or None, the relative ridge strength chosen or "scale")."""
    bias = halves[0].bias
    init = w_init.astype(np.float64)
    if bias:
        init = np.concatenate([init, (np.zeros(init.shape[1]) if b_init is None else b_init.astype(np.float64))[None]], 0)
    targets = [_target(h, b_dense) for h in halves]
    scale = max(float(np.mean([np.mean(np.diag(h.aa)) for h in halves])), 1e-12)
    eye = np.eye(init.shape[0])
    # Candidates: the ridge at each strength, and the prior with refitted row scales and bias.
    candidates = list(grid) + (["scale"] if scales else [])

    def solve(aa, target, d):
        if d == "scale":
            return _scale_fit(aa, bias, target, init)
        return np.linalg.solve(aa + d * scale * eye, target + d * scale * init)

    best = None
    if len(candidates) > 1 and all(h.rows for h in halves):
        for d in candidates:
            err = 0.0
            for i in (0, 1):
                x = solve(halves[i].aa, targets[i], d)
                val = halves[1 - i]
                err += float(np.sum((val.aa @ x) * x) - 2.0 * np.sum(targets[1 - i] * x))
            if best is None or err < best[0]:
                best = (err, d)
    d = best[1] if best is not None else grid[len(grid) // 2]
    sol = solve(halves[0].aa + halves[1].aa, targets[0] + targets[1], d)
    if bias:
        return sol[:-1].astype(np.float32), sol[-1].astype(np.float32), d
    return sol.astype(np.float32), None, d
