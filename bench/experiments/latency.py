"""Inference latency: onnxopt -O3 against the original model and against onnxruntime's transformer
optimizer output, measured in one process with alternating rounds.

Every variant runs with onnxruntime's *default* session optimizations (ORT_ENABLE_ALL), as users run
them: the question is whether onnxopt's output is faster than what onnxruntime already does on its own.
Rounds alternate between variants (rotating the order each round) so machine drift hits all alike;
we report medians over all timed runs, p90, and each variant's ratio to the original: the median of
the per-round ratios with their interquartile range, so a ratio whose range straddles 1 is a tie.
The kernels column is what onnxruntime runs after its own optimizations (op counts of the optimized
graph); two variants with the same kernels can differ only by noise, whose size the "original (copy)"
variant shows: the original's bytes again, in a session of their own.

    python -m onnxopt.bench.experiments.latency --models bert,vit,resnet,mobilenetv2 --size base --rounds 15
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import tempfile
from pathlib import Path

import onnxruntime as ort

from onnxopt.bench import timing


def variants(name: str, size: str, tmp: Path, exporter: str = "legacy", opset: int | None = None,
             strip_value_info: bool = False) -> dict[str, Path]:
    """original, onnxopt -O3 and (for transformers) onnxruntime's transformer optimizer, built in
    process; with `strip_value_info` also onnxopt -O3 of the same export with graph.value_info
    cleared (fusions must not depend on the exporter's shape annotations)."""
    import onnxopt
    from onnxopt import load
    from onnxopt.bench import peers, zoo

    if opset is None:
        opset = 18 if exporter == "dynamo" else 14 if name != "resnet" else 13
    original = zoo.build(name, size=size, exporter=exporter, opset=opset)
    out = {"original": original}
    # A/A control: the same bytes in another session. Its ratio is the noise floor of the measurement.
    out["original (copy)"] = Path(shutil.copyfile(original, tmp / f"{name}.copy.onnx"))
    result = onnxopt.compile(original, opt_level=3, target="cpu")
    out["onnxopt -O3"] = result.save(tmp / f"{name}.O3.onnx")
    if strip_value_info:
        stripped = zoo.build(name, size=size, exporter=exporter, opset=opset, strip_value_info=True)
        result = onnxopt.compile(stripped, opt_level=3, target="cpu")
        out["onnxopt -O3 (value_info stripped)"] = result.save(tmp / f"{name}.novi.O3.onnx")
    hints, _ = peers.transformer_hints(load.load(original))
    if hints is not None:
        # The optimizer writes scratch files (symbolic shape inference) into the working directory.
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            peers.TOOLS["ort-transformer-optimizer"].build(str(original), str(tmp / f"{name}.ortopt.onnx"), {"hints": hints})
        finally:
            os.chdir(cwd)
        out["ort transformer optimizer"] = tmp / f"{name}.ortopt.onnx"
    return out


def render(results: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, onnxruntime {ort.__version__}, CPU EP, "
        f"{results[0]['threads'] if results else '?'} threads, default session optimizations for every variant.",
        "",
        "| model | variant | p50 ms | p90 ms | ratio to original (per-round median, IQR) | kernels run | "
        "same kernels as original |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for res in results:
        ref_kernels = res["kernels"]["original"]
        for variant, lat in res["latency"].items():
            r = res["ratio"][variant]
            k = res["kernels"][variant]
            lines.append(f"| {res['model']} | {variant} | {lat['p50']:.2f} | {lat['p90']:.2f} | "
                         f"{r['median']:.3f} ({r['q25']:.3f}-{r['q75']:.3f}) | {sum(k.values())} | "
                         f"{'yes' if k == ref_kernels else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from onnxopt.bench import zoo
    from onnxopt.bench.fingerprint import machine

    p = argparse.ArgumentParser(prog="python -m onnxopt.bench.experiments.latency", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bert,vit,resnet,mobilenetv2")
    p.add_argument("--size", default="base")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"])
    p.add_argument("--opset", type=int, help="zoo export opset (default 14, resnet 13; dynamo 18)")
    p.add_argument("--strip-value-info", action="store_true",
                   help="also onnxopt -O3 of the export with graph.value_info cleared")
    p.add_argument("--tag", help="write latency-TAG.json/.md instead of latency.json/.md")
    args = p.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            paths = variants(name, args.size, Path(tmp), args.exporter, args.opset, args.strip_value_info)
            feeds = zoo.sample_feeds(name, paths["original"], batch=1, seq=args.seq)
            sessions = {v: timing.session(path, args.threads) for v, path in paths.items()}
            lat = timing.alternating(sessions, feeds, args.rounds, args.per_round, args.warmup)
            res = {"model": f"{name}-{args.size}", "exporter": args.exporter, "threads": args.threads,
                   "input_shapes": {k: list(v.shape) for k, v in feeds.items()}, "latency": lat,
                   "ratio": {v: timing.round_ratios(lat[v], lat["original"]) for v in lat},
                   "kernels": {v: timing.kernels(path, Path(tmp), args.threads) for v, path in paths.items()}}
            print(json.dumps(res), flush=True)
            results.append(res)
    info = machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"latency-{args.tag}" if args.tag else "latency"
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render(results, info))
    print(render(results, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
