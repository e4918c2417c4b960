"""Inference latency: onnxopt -O3 against the original model and against onnxruntime's transformer
optimizer output, measured in one process with alternating rounds.

Every variant runs with onnxruntime's *default* session optimizations (ORT_ENABLE_ALL), as users run
them: the question is whether onnxopt's output is faster than what onnxruntime already does on its own.
Rounds alternate between variants (rotating the order each round) so machine drift hits all alike;
we report medians over all timed runs, p90, and each variant's ratio to the original.

    python -m onnxopt.bench.latency --models bert,vit,resnet,mobilenetv2 --size base --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

# onnxruntime's transformer optimizer needs the model type, heads and hidden size spelled out.
ORT_OPTIMIZER_ARGS = {
    ("bert", "base"): ("bert", 12, 768), ("bert", "tiny"): ("bert", 4, 64),
    ("vit", "base"): ("vit", 12, 768), ("vit", "tiny"): ("vit", 4, 64),
    ("gpt2", "base"): ("gpt2", 12, 768), ("gpt2", "tiny"): ("gpt2", 4, 64),
    ("minilm", "real"): ("bert", 12, 384),
}


def session(path: str | Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def alternating(sessions: dict[str, ort.InferenceSession], feeds: dict, rounds: int, per_round: int,
                warmup: int) -> dict[str, dict]:
    """Median / p90 latency (ms) per variant; rounds alternate variants in rotating order."""
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
    return {
        n: {
            "median_ms": statistics.median(t),
            "p90_ms": float(np.percentile(t, 90)),
            "min_ms": min(t),
            # spread of the per-round medians: how much the machine drifted during the run
            "round_spread_ms": float(np.ptp([statistics.median(t[i:i + per_round]) for i in range(0, len(t), per_round)])),
            "runs": len(t),
        }
        for n, t in times.items()
    }


def variants(name: str, size: str, tmp: Path) -> dict[str, Path]:
    import onnxopt
    from onnxopt.bench import zoo

    original = zoo.build(name, size=size, opset=14 if name != "resnet" else 13)
    out = {"original": original}
    result = onnxopt.compile(original, opt_level=3, target="cpu")
    out["onnxopt -O3"] = result.save(tmp / f"{name}.O3.onnx")
    key = (name, size if name != "minilm" else "real")
    if key in ORT_OPTIMIZER_ARGS:
        from onnxruntime.transformers.optimizer import optimize_model

        kind, heads, hidden = ORT_OPTIMIZER_ARGS[key]
        optimize_model(str(original), model_type=kind, num_heads=heads, hidden_size=hidden).save_model_to_file(
            str(tmp / f"{name}.ortopt.onnx"))
        out["ort transformer optimizer"] = tmp / f"{name}.ortopt.onnx"
    return out


def render(results: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, onnxruntime {ort.__version__}, CPU EP, "
        f"{results[0]['threads'] if results else '?'} threads, default session optimizations for every variant.",
        "",
        "| model | variant | median ms | p90 ms | ratio to original | round spread ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for res in results:
        base = res["latency"]["original"]["median_ms"]
        for variant, lat in res["latency"].items():
            lines.append(f"| {res['model']} | {variant} | {lat['median_ms']:.2f} | {lat['p90_ms']:.2f} | "
                         f"{lat['median_ms'] / base:.3f} | {lat['round_spread_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from onnxopt.bench import zoo
    from onnxopt.bench.compile_bench import machine

    p = argparse.ArgumentParser(prog="python -m onnxopt.bench.latency", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bert,vit,resnet,mobilenetv2")
    p.add_argument("--size", default="base")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            paths = variants(name, args.size, Path(tmp))
            feeds = zoo.sample_feeds(name, paths["original"], batch=1, seq=args.seq)
            sessions = {v: session(path, args.threads) for v, path in paths.items()}
            lat = alternating(sessions, feeds, args.rounds, args.per_round, args.warmup)
            res = {"model": f"{name}-{args.size}", "threads": args.threads,
                   "input_shapes": {k: list(v.shape) for k, v in feeds.items()}, "latency": lat}
            print(json.dumps(res), flush=True)
            results.append(res)
    info = machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    (out / "latency.md").write_text(render(results, info))
    print(render(results, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
