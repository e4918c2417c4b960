"""int8 fidelity metrics and the rule that decides whether a quantized model is good enough (numpy only).

A metric scores each validation sample against its float reference outputs and says whether the
target holds *with a margin for data not seen* (the validation part is small; the user's data is
not the validation part):

* ``cosine`` (default): per sample, the worst cosine over the float outputs. Holds when every
  validation sample reaches the target **and** so does the estimated ``MARGIN_QUANTILE`` quantile of
  the cosine: the errors 1 - cosine are fitted by a log-normal (mean and standard deviation of their
  logarithms) and the quantile's error is exp(mean + z * std). A model whose errors spread widely
  over the validation samples therefore needs a larger margin than one whose errors are uniform.
* ``rel-error``: per sample, the worst relative error ||q - f|| / ||f|| over the float outputs, with
  the same worst-sample and quantile rule against a maximum.
* ``top1`` (classifiers): per row of the first float output (logits), whether the argmax agrees
  with the float model's. Near-ties (the float top-2 margin below ``TIE_EPS`` times the row's
  standard deviation) have no meaningful argmax: they are counted apart and left out of the
  agreement. Holds when the agreement on the validation rows reaches the target **and** so does the
  predicted agreement: quantization moves a row's float top-2 margin by a noise whose standard
  deviation sigma is measured on the validation rows (taken at the upper ``MARGIN_QUANTILE``
  confidence bound of its estimate: a chi-square bound, so a few rows give a wider margin); a row of
  float top-2 margin g then flips with probability Phi(-g / sigma), and the prediction averages that
  over the float margins of all calibration and validation rows. A flip count on a few validation
  crops cannot show 98 %; the margins and the measured noise can.

``loss`` is the continuous figure the fidelity control ranks layers and ranges by (for top1 the
largest RMS logit error, what the prediction is made from: flips are too coarse to rank by).
"""

from __future__ import annotations

import math

import numpy as np

from onnxopt.kernels.metrics import cosine

METRICS = ("cosine", "top1", "rel-error")
DEFAULT_TARGETS = {"cosine": 0.99, "top1": 0.98, "rel-error": 0.1}
# The quantile of the per-sample figure that must meet the target (z of the standard normal).
MARGIN_QUANTILE = 0.99
MARGIN_Z = 2.3263478740408408  # Phi^-1(0.99)
# Float top-2 margin, relative to the row's standard deviation, below which a row is a near-tie.
TIE_EPS = 0.01


def _float_names(ref: dict) -> list[str]:
    return [n for n, v in ref.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na = np.linalg.norm(a64)
    d = np.linalg.norm(a64 - b64)
    return float(d / na) if na else (0.0 if d == 0 else math.inf)


def logit_rows(out: np.ndarray) -> np.ndarray:
    """A classifier output as rows of class scores (last axis = classes)."""
    a = np.asarray(out, np.float64)
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def top2_margins(ref: dict) -> tuple[np.ndarray, np.ndarray]:
    """(margins, near_tie) per row of the first float output of one sample."""
    rows = logit_rows(ref[_float_names(ref)[0]])
    if rows.shape[1] < 2:
        return np.full(rows.shape[0], np.inf), np.zeros(rows.shape[0], bool)
    part = np.sort(rows, axis=1)
    margin = part[:, -1] - part[:, -2]
    spread = rows.std(axis=1)
    return margin, margin < TIE_EPS * np.where(spread > 0, spread, 1.0)


def _lognormal_quantile(errors: np.ndarray) -> float:
    """Error at MARGIN_QUANTILE of a log-normal fitted to `errors` (the worst error if fewer than 2)."""
    e = np.maximum(np.asarray(errors, np.float64), 1e-12)
    if e.size < 2:
        return float(e.max(initial=0.0))
    logs = np.log(e)
    return float(math.exp(logs.mean() + MARGIN_Z * logs.std(ddof=1)))


def _rms_upper(x: np.ndarray) -> float:
    """Upper MARGIN_QUANTILE confidence bound on the standard deviation of zero-mean noise from the
    samples `x`: RMS * sqrt(n / chi2_{1 - q}(n)), chi2's quantile by Wilson-Hilferty."""
    n = x.size
    if n == 0:
        return 0.0
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    k = 2.0 / (9.0 * n)
    chi2_low = n * max(1.0 - k - MARGIN_Z * math.sqrt(k), 1e-3) ** 3
    return rms * math.sqrt(n / chi2_low)


def _phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in np.ravel(x)]))


class Metric:
    """Scores of a quantized model's outputs against float references, and the pass/fail rule."""

    def __init__(self, name: str, target: float, all_margins: np.ndarray | None = None,
                 all_ties: np.ndarray | None = None) -> None:
        if name not in METRICS:
            raise ValueError(f"unknown int8 metric {name!r} (choose from {', '.join(METRICS)})")
        self.name = name
        self.target = float(target)
        # top1: float top-2 margins and near-tie flags of every row seen (calibration and validation).
        self.all_margins = all_margins
        self.all_ties = all_ties

    def loss(self, refs: list[dict], gots: list[dict]) -> float:
        if self.name == "rel-error":
            return max(self._rel_errors(refs, gots), default=0.0)
        if self.name == "top1":  # the logit noise the prediction is made from
            return max((self._logit_rms(r, g) for r, g in zip(refs, gots)), default=0.0)
        return 1.0 - min(self._cosines(refs, gots), default=1.0)

    @staticmethod
    def _logit_rms(ref: dict, got: dict) -> float:
        name = _float_names(ref)[0]
        return float(np.sqrt(((logit_rows(ref[name]) - logit_rows(got[name])) ** 2).mean(axis=1)).max())

    @staticmethod
    def _cosines(refs, gots) -> list[float]:
        return [min((cosine(r[n], g[n]) for n in _float_names(r)), default=1.0) for r, g in zip(refs, gots)]

    @staticmethod
    def _rel_errors(refs, gots) -> list[float]:
        return [max((_rel(r[n], g[n]) for n in _float_names(r)), default=0.0) for r, g in zip(refs, gots)]

    def summary(self, refs: list[dict], gots: list[dict]) -> dict:
        """The figures of one set of samples, with ``ok``: whether the target holds with its margin."""
        out: dict = {"samples": len(refs)}
        if not refs:
            return out | {"ok": True}
        if self.name == "cosine":
            cos = np.array(self._cosines(refs, gots))
            q = 1.0 - _lognormal_quantile(1.0 - cos)
            out |= {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                    f"q{MARGIN_QUANTILE:g}_cosine": q, "ok": bool(cos.min() >= self.target and (q >= self.target or self.target <= 0.0))}
        elif self.name == "rel-error":
            rel = np.array(self._rel_errors(refs, gots))
            q = _lognormal_quantile(rel)
            out |= {"max_rel_error": float(rel.max()), "mean_rel_error": float(rel.mean()),
                    f"q{MARGIN_QUANTILE:g}_rel_error": q, "ok": bool(rel.max() <= self.target and q <= self.target)}
        else:
            out |= self._top1(refs, gots)
        return out

    def _top1(self, refs, gots) -> dict:
        agree = ties = rows = 0
        deltas = []  # change of the float top-2 margin, per validation row
        for r, g in zip(refs, gots):
            name = _float_names(r)[0]
            zr, zg = logit_rows(r[name]), logit_rows(g[name])
            _, tie = top2_margins(r)
            same = zr.argmax(1) == zg.argmax(1)
            rows += len(same)
            ties += int(tie.sum())
            agree += int((same & ~tie).sum())
            if zr.shape[1] > 1:
                top = np.argsort(zr, axis=1)[:, -2:]
                idx = np.arange(len(zr))
                deltas += list((zg[idx, top[:, 1]] - zg[idx, top[:, 0]]) - (zr[idx, top[:, 1]] - zr[idx, top[:, 0]]))
        counted = rows - ties
        agreement = agree / counted if counted else 1.0
        sigma = _rms_upper(np.array(deltas))
        margins, tied = self.all_margins, self.all_ties
        if margins is not None and (~tied).any() and sigma > 0:
            predicted = 1.0 - float(_phi(-margins[~tied] / sigma).mean())
        else:
            predicted = agreement
        return {"agreement": agreement, "rows": rows, "near_ties": ties, "predicted_agreement": predicted,
                "margin_noise": sigma, "margin_rows": int((~tied).sum()) if tied is not None else 0,
                "ok": bool(self.target <= 0.0 or (agreement >= self.target and predicted >= self.target))}

    def headline(self, summary: dict) -> str:
        """One phrase for the CLI line."""
        if self.name == "cosine":
            return f"min cosine {summary['min_cosine']:.5f}"
        if self.name == "rel-error":
            return f"max relative error {summary['max_rel_error']:.4f}"
        return (f"top-1 agreement {summary['agreement']:.2%} (predicted {summary['predicted_agreement']:.2%}, "
                f"{summary['near_ties']} near-tie(s) apart)")
