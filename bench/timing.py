"""Latency measurement shared by `onnxopt bench` and the experiments: sessions as users run them,
alternating rounds (so machine drift hits every variant alike), per-round ratios with their IQR, and
the kernels onnxruntime runs after its own optimizations."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import sessions as factory


def session(path: str | Path, threads: int, provider: str = "CPUExecutionProvider",
            opt_level: str = "ORT_ENABLE_ALL", provider_options: dict | None = None) -> ort.InferenceSession:
    """A session as users run one: `opt_level` graph optimizations (default all), `threads` intra-op
    threads (0: onnxruntime's default), CPU behind a non-CPU provider for the nodes it does not take.

    Intra-op threads do not spin-wait: with several sessions in one process (alternating rounds),
    the idle sessions' spinning threads steal the cores from the one being timed. Measured on BERT-base
    at 2 threads on 2 cores, three sessions alternating: 165 ms with spinning, 136 ms without, and int8
    79.5 vs 49.3 ms, so spinning skewed every ratio toward the slower model."""
    options = factory.options(optimize=opt_level, threads=threads)
    return factory.session(path, options, factory.providers_for(provider, provider_options))


def summarize(times_ms, per_round: int) -> dict:
    """Latency statistics (ms) of timed runs given in order, `per_round` runs to a round.

    round_medians: the median of each round. round_spread: their max - min, the worst drift during
    the measurement. noise_pct: their interquartile range relative to p50, the typical drift.
    """
    t = np.asarray(list(times_ms), dtype=np.float64)
    q25, p50, q75, p90, p99 = np.percentile(t, [25, 50, 75, 90, 99])
    per_round = max(1, per_round)
    rounds = [float(np.median(t[i:i + per_round])) for i in range(0, len(t), per_round)]
    r25, r75 = np.percentile(rounds, [25, 75])
    out = {
        "mean": float(t.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
        "min": float(t.min()), "max": float(t.max()),
        "stdev": float(t.std(ddof=1)) if len(t) > 1 else 0.0, "iqr": float(q75 - q25),
        "round_spread": float(np.ptp(rounds)), "noise_pct": 100.0 * float(r75 - r25) / float(p50) if p50 > 0 else 0.0,
    }
    out = {k: round(v, 4) for k, v in out.items()}
    out.update(rounds=len(rounds), runs=int(len(t)), round_medians=[round(r, 4) for r in rounds])
    return out


def alternating(sessions: dict[str, ort.InferenceSession], feeds: dict, rounds: int, per_round: int,
                warmup: int, progress=None) -> dict[str, dict]:
    """Latency statistics per variant (see `summarize`); rounds alternate variants in rotating order,
    so machine drift hits every variant alike. `progress(n)` is called after each round of a variant."""
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feeds)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sess = sessions[name]
            for _ in range(per_round):
                start = time.perf_counter()
                sess.run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1000)
            if progress is not None:
                progress(1)
    return {n: summarize(t, per_round) for n, t in times.items()}


def round_ratios(lat: dict, base: dict) -> dict:
    """Median and interquartile range of the per-round ratios variant / base (same rounds, same order)."""
    r = np.asarray(lat["round_medians"]) / np.asarray(base["round_medians"])
    q25, q50, q75 = np.percentile(r, [25, 50, 75])
    return {"median": round(float(q50), 4), "q25": round(float(q25), 4), "q75": round(float(q75), 4)}


def kernels(path: str | Path, tmp: Path, threads: int) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs after its default optimizations."""
    options = factory.options(threads=threads)
    out = tmp / f"{Path(path).stem}.ort-optimized.onnx"
    options.optimized_model_filepath = str(out)
    # External weights keep the dump small; only the graph is read back.
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    factory.session(path, options)
    counts: dict[str, int] = {}
    for node in onnx.load(str(out), load_external_data=False).graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
