"""Calibration statistics and int8 thresholds (numpy only).

A tensor's statistics are an :class:`AbsHistogram`: a histogram of |x| with ``bins`` (2048) bins over
``[0, edge)``, plus the signed min/max and the count of exact zeros. It is streamed (fixed memory,
whatever the number of samples) and mergeable (sharded calibration):

* ``edge`` is always a power of two strictly above max|x|. When a larger value arrives the edge
  doubles k times and every 2**k adjacent bins merge into one. Because ``bins`` and ``edge`` are
  powers of two, bin indices ``floor(|x| * bins / edge)`` are exact in floating point, so
  re-binning gives exactly the histogram that one pass over all the data at the final edge gives:
  the result does not depend on the order or the sharding of the samples.
* Exact zeros are counted apart. Post-ReLU tensors are often half zeros; left in bin 0 that spike
  dominates P and drags the KL threshold down, although 0 is exactly representable whatever the
  threshold (the "zero-spike" pitfall).
* So are the values exactly at the running max and min. A clipping activation (ReLU6, Clip,
  Hardtanh) puts a share of its values exactly on its bound: measured on EfficientNet-Lite0's ReLU6
  outputs, 0.05 % to 17 % of the non-zero values sit at 6.0, while continuous tensors hold their
  max once (about 1e-6 of their values). KL sees that spike as one bin among 2048 and readily clips
  it (thresholds of 3.1 for values saturated at 6 were seen), which moves the whole spike, the
  activation's most informative values. Where at least ``SPIKE_SHARE`` of the non-zero values (and
  two or more) sit exactly on the max or the min, ``activation_range`` keeps that bound (the
  "saturation-spike" pitfall).

Thresholds T (the quantized range is then [max(min, -T), min(max, T)]):

* ``entropy`` (TensorRT): for every candidate i >= 128 bins, P = hist[:i] with the outlier mass
  sum(hist[i:]) folded into its last bin, Q = hist[:i] merged into 128 groups and spread back
  evenly over the bins of each group that are non-empty in P (empty bins stay empty, so Q is 0
  exactly where P is 0: the "empty bin" pitfall that makes KL infinite or meaningless). T is
  i * bin_width for the i minimizing KL(P || Q). All candidates are evaluated at once from prefix
  sums (no Python loop over bins), a few milliseconds per tensor.
* ``minmax``: max |x|.
* ``percentile``: the |x| value below which ``percentile`` % of the values (zeros included) lie.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BINS = 2048
# 8-bit signed magnitude levels: the KL search quantizes |x| to 128 levels (TensorRT).
DEFAULT_QUANT_BINS = 128
DEFAULT_PERCENTILE = 99.99
METHODS = ("entropy", "minmax", "percentile")
# Probability given to a last bin that holds only clipped outliers in an empty group (see above).
SMOOTH_EPS = 1e-4
# KL values this close to the minimum are ties (floating-point noise of the prefix-sum formula).
KL_TIE = 1e-9
# Share of the non-zero values exactly at the max (or min) that marks a clipping activation's bound.
SPIKE_SHARE = 1e-4
# Candidates evaluated per vectorized block (bounds the temporary matrices to ~512 x groups).
_BLOCK = 512


def _pow2_above(m: float) -> float:
    """The smallest power of two strictly greater than m > 0."""
    _, e = math.frexp(m)  # m = f * 2**e with 0.5 <= f < 1, so m < 2**e
    return math.ldexp(1.0, e)


class AbsHistogram:
    """Streaming, mergeable histogram of |x| with exact zeros and signed min/max kept apart."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2 (got {bins})")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.edge = 0.0  # 0 while no non-zero value has been seen
        self.zeros = 0
        self.min = math.inf
        self.max = -math.inf
        self.min_count = 0  # values exactly equal to min
        self.max_count = 0  # values exactly equal to max

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.zeros

    @property
    def bin_width(self) -> float:
        return self.edge / self.bins

    def _grow(self, edge: float) -> None:
        if self.edge == 0.0:
            self.edge = edge
            return
        factor = int(round(edge / self.edge))
        if factor <= 1:
            return
        if factor >= self.bins:
            merged = np.zeros_like(self.counts)
            merged[0] = self.counts.sum()
        else:
            merged = np.zeros_like(self.counts)
            merged[: self.bins // factor] = self.counts.reshape(self.bins // factor, factor).sum(axis=1)
        self.counts = merged
        self.edge = edge

    def update(self, x) -> AbsHistogram:
        a = np.asarray(x)
        if a.size == 0:
            return self
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        # NaN propagates through min/max, so this also catches NaN without another pass.
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("calibration tensor has NaN or infinite values")
        self.min_count = _count_at(self.min, self.min_count, lo, lo < self.min, a)
        self.max_count = _count_at(self.max, self.max_count, hi, hi > self.max, a)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        top = max(-lo, hi)
        mag = np.abs(a.ravel())
        zeros = int(mag.size - np.count_nonzero(mag))
        self.zeros += zeros
        if top == 0.0:
            return self
        if top >= self.edge:
            self._grow(_pow2_above(top))
        # bins / edge is a power of two: the scaling and the floor are exact (in float32 too), unless
        # the edge is so small (tiny values, e.g. 1.2e-38) that the scale overflows float32.
        scale = self.bins / self.edge
        if mag.dtype == np.float32 and scale > float(np.finfo(np.float32).max):
            mag = mag.astype(np.float64)
        mag *= mag.dtype.type(scale)
        counts = np.bincount(mag.astype(np.int32), minlength=self.bins)
        counts[0] -= zeros  # exact zeros are counted apart (zero-spike pitfall)
        self.counts += counts
        return self

    def copy(self) -> AbsHistogram:
        out = AbsHistogram(self.bins)
        out.counts, out.edge, out.zeros, out.min, out.max = self.counts.copy(), self.edge, self.zeros, self.min, self.max
        out.min_count, out.max_count = self.min_count, self.max_count
        return out

    def saturated(self) -> tuple[bool, bool]:
        """(min, max): whether that bound holds a saturation spike (see the module docstring)."""
        nonzero = int(self.counts.sum())
        def spike(count: int, bound: float) -> bool:
            return bound != 0.0 and count >= 2 and count >= SPIKE_SHARE * nonzero
        return spike(self.min_count, self.min), spike(self.max_count, self.max)

    def merge(self, other: AbsHistogram) -> AbsHistogram:
        """A new histogram equal to the one of both data sets together."""
        if other.bins != self.bins:
            raise ValueError("cannot merge histograms with different numbers of bins")
        a, b = self.copy(), other.copy()
        edge = max(a.edge, b.edge)
        if edge:
            a._grow(edge)
            b._grow(edge)
        a.counts = a.counts + b.counts
        a.zeros += b.zeros
        a.min_count = _merge_count(a.min, a.min_count, b.min, b.min_count, min)
        a.max_count = _merge_count(a.max, a.max_count, b.max, b.max_count, max)
        a.min, a.max = min(a.min, b.min), max(a.max, b.max)
        return a


class ChannelSums:
    """Per-channel sums (float64) and row count of a tensor, channels on `axis`: the input means
    int8's bias correction needs. Mergeable like AbsHistogram; the sums are float, so the result is
    fixed by the order of updates and merges (sharded calibration merges in shard index order)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.sum: np.ndarray | float = 0.0
        self.count = 0

    def update(self, x) -> ChannelSums:
        channels = np.moveaxis(np.asarray(x, dtype=np.float64), self.axis, -1)
        channels = channels.reshape(-1, channels.shape[-1])
        self.sum = self.sum + channels.sum(axis=0)
        self.count += channels.shape[0]
        return self

    def merge(self, other: ChannelSums) -> ChannelSums:
        out = ChannelSums(self.axis)
        out.sum, out.count = self.sum + other.sum, self.count + other.count
        return out

    def mean(self) -> np.ndarray | float:
        return self.sum / self.count


def _count_at(bound: float, count: int, new: float, beyond: bool, a: np.ndarray) -> int:
    """The count of values equal to the extreme once `a`, whose own extreme is `new`, is added
    (`beyond`: `new` is past the current extreme `bound`)."""
    if beyond:
        return int(np.count_nonzero(a == new))
    if new == bound:
        return count + int(np.count_nonzero(a == new))
    return count


def _merge_count(x: float, cx: int, y: float, cy: int, pick) -> int:
    if x == y:
        return cx + cy
    return cx if pick(x, y) == x else cy


def kl_divergence_all(counts: np.ndarray, num_quant_bins: int = DEFAULT_QUANT_BINS) -> tuple[np.ndarray, np.ndarray]:
    """KL(P_i || Q_i) for every candidate i in [num_quant_bins, last non-empty bin + 1].

    Q is constant (S_g / N_g) over the non-empty bins of each group g, so with T = sum(P) and
    C_i = sum(hist[:i]) = sum(Q):
        KL_i = (1/T) sum_j P_j log P_j - log T - (1/T) sum_g Pg log(S_g / N_g) + log C_i,
    where Pg is P's mass in group g. Every term comes from prefix sums, so all candidates cost
    O(candidates x groups), not O(candidates x bins). Where Q would be 0 and P is not (a last bin
    holding only folded outliers in an otherwise empty last group), Q is smoothed to SMOOTH_EPS.
    """
    h = np.asarray(counts, dtype=np.float64)
    nonempty = np.flatnonzero(h)
    if nonempty.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    last = int(nonempty[-1]) + 1
    nq = num_quant_bins
    if last <= nq:
        return np.array([last]), np.array([0.0])
    h = h[:last]
    total = h.sum()
    csum = np.concatenate([[0.0], np.cumsum(h)])
    znz = np.concatenate([[0], np.cumsum(h > 0)]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    cplogp = np.concatenate([[0.0], np.cumsum(hlogh)])
    cands = np.arange(nq, last + 1)
    kls = np.empty(cands.size)
    g = np.arange(nq)[None, :]
    for start in range(0, cands.size, _BLOCK):
        i = cands[start : start + _BLOCK]
        ii = i[:, None]
        outliers = total - csum[i]  # mass beyond the candidate, folded into its last bin
        p_last = h[i - 1] + outliers
        with np.errstate(divide="ignore", invalid="ignore"):
            sum_plogp = cplogp[i - 1] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
            s = (g * ii) // nq
            e = ((g + 1) * ii) // nq
            group_sum = csum[e] - csum[s]
            group_nz = znz[e] - znz[s]
            # The last bin is non-empty in P when outliers were folded into it even if hist[i-1] == 0.
            last_group = g == nq - 1
            group_nz = group_nz + np.where(last_group, ((h[i - 1] == 0) & (outliers > 0))[:, None], 0.0)
            p_group = group_sum + np.where(last_group, outliers[:, None], 0.0)
            has_p = p_group > 0
            # Empty-bin pitfall: only the last bin can hold P mass (folded outliers) where Q has none
            # (its whole group is empty). KL would be infinite and reject a candidate that clips a
            # single far outlier; as in MXNet / TensorRT, Q gets SMOOTH_EPS there, taken from the rest.
            empty = has_p & (group_sum <= 0)
            smoothed = empty.any(axis=1)
            log_qn = np.log(np.where(has_p & ~empty, group_sum / np.maximum(group_nz, 1.0), 1.0)) - np.log(
                np.where(csum[ii] > 0, csum[ii], 1.0)) + np.where(smoothed[:, None], np.log1p(-SMOOTH_EPS), 0.0)
            log_qn = np.where(empty, np.log(SMOOTH_EPS), log_qn)
            sum_plogqn = (np.where(has_p, p_group, 0.0) * log_qn).sum(axis=1)
            kl = sum_plogp / total - np.log(total) - sum_plogqn / total
        kls[start : start + i.size] = kl
    return cands, kls


def entropy_threshold(hist: AbsHistogram, num_quant_bins: int = DEFAULT_QUANT_BINS) -> float:
    """The |x| threshold minimizing KL(P || Q) (TensorRT's entropy calibration)."""
    cands, kls = kl_divergence_all(hist.counts, num_quant_bins)
    if cands.size == 0:
        return 0.0
    # Ties go to the widest candidate: on discrete data (8-bit pixels, normalized) a candidate
    # that leaves a single non-empty bin in P has KL exactly 0 and would clip almost everything.
    best = int(cands[np.flatnonzero(kls <= kls.min() + KL_TIE)[-1]])
    return best * hist.bin_width


def minmax_threshold(hist: AbsHistogram) -> float:
    if hist.total == 0:
        return 0.0
    return max(abs(hist.min), abs(hist.max))


def percentile_threshold(hist: AbsHistogram, percentile: float = DEFAULT_PERCENTILE) -> float:
    """Upper edge of the bin where the cumulative count (zeros included) reaches `percentile` %."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100] (got {percentile})")
    total = hist.total
    if total == 0 or hist.edge == 0:
        return 0.0
    cum = np.cumsum(hist.counts) + hist.zeros
    idx = int(np.searchsorted(cum, percentile / 100.0 * total, side="left"))
    idx = min(idx, hist.bins - 1)
    return min((idx + 1) * hist.bin_width, minmax_threshold(hist))


def threshold(hist: AbsHistogram, method: str = "entropy", **kwargs) -> float:
    if method == "entropy":
        return entropy_threshold(hist, **kwargs)
    if method == "minmax":
        return minmax_threshold(hist)
    if method == "percentile":
        return percentile_threshold(hist, **kwargs)
    raise ValueError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")


def unsigned_levels(hist: AbsHistogram) -> int:
    """Levels an affine u8 range gives the larger side of the data: 255 for one-signed data (ReLU
    outputs), about 128 for symmetric data. The KL search then models the quantization that will
    be used, not a symmetric s8 one (which clips GELU outputs twice as hard as needed)."""
    pos, neg = max(hist.max, 0.0), max(-hist.min, 0.0)
    if pos + neg == 0:
        return DEFAULT_QUANT_BINS
    share = max(pos, neg) / (pos + neg)
    return int(min(255, max(DEFAULT_QUANT_BINS, round(255 * share))))


def activation_range(hist: AbsHistogram, method: str = "entropy", unsigned: bool = False, **kwargs) -> tuple[float, float]:
    """The float range [lo, hi] to quantize: the observed range clipped at the threshold.

    unsigned: the range will be quantized as u8 with a zero point (see unsigned_levels)."""
    if hist.total == 0:
        return 0.0, 0.0
    if unsigned and method == "entropy":
        kwargs.setdefault("num_quant_bins", unsigned_levels(hist))
    t = threshold(hist, method, **kwargs)
    at_min, at_max = hist.saturated()
    return (hist.min if at_min else max(hist.min, -t)), (hist.max if at_max else min(hist.max, t))
