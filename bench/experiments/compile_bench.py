"""Compile-time, peak-memory and node-count benchmark: onnxopt beside onnxsim, onnxoptimizer and
onnxruntime's transformer optimizer, on the same model in the same run.

Each measurement runs in a fresh subprocess so peak memory is that tool's alone (the tools and the
subprocess runner live in onnxopt.bench.peers, shared with `onnxopt bench --peers`):
  time_s     wall time of load + optimize + save (imports excluded), median of --repeat runs
  extra_mb   peak RSS during the job minus RSS just before it started (imports excluded)
  nodes      node count of the tool's output

    python -m onnxopt.bench.experiments.compile_bench --model bert --size base --repeat 3 --out bench/results

A missing peer is reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

TOOLS = ("onnxopt-O1", "onnxopt-O3", "onnxopt-O3-noverify", "onnxsim", "onnxoptimizer", "ort-transformer-optimizer")


def _count_nodes(path: str) -> int:
    import onnx

    return len(onnx.load(path, load_external_data=False).graph.node)


def measure(tool: str, model: Path, hints: dict | None, repeat: int) -> dict:
    """One tool on one model, each run in a fresh process (onnxopt.bench.peers holds the tools)."""
    from onnxopt.bench import peers

    info = peers.TOOLS.get(tool)
    if info is None:
        return {"tool": tool, "skipped": f"unknown tool (known: {', '.join(peers.TOOLS)})"}
    reason = peers.missing_requirement(info)
    if reason is None and info.needs_hints and hints is None:
        reason = "cannot infer model type, heads and hidden size from the graph"
    if reason is not None:
        return {"tool": tool, "skipped": reason}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{tool}.onnx")
        r = peers.compile_in_subprocess(tool, model, out, {"hints": hints, "target": "cpu"}, repeat=repeat)
        if r["status"] != "ok":
            return {"tool": tool, "skipped": r["reason"]}
        return {"tool": tool, "time_s": r["time_s"], "time_runs": r["time_runs_s"], "extra_mb": r["peak_mb"],
                "nodes": _count_nodes(out)}


def render(result: dict) -> str:
    model_mb = result["model_mb"]
    lines = [
        f"## Compile benchmark: {result['model']} ({model_mb:.0f} MB, {result['nodes_before']} nodes)",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; median of {result['repeat']} runs, "
        "each tool in a fresh process.",
        "",
        "| tool | time (s) | extra memory (MB) | extra / model size | nodes after |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["tools"]:
        if "skipped" in r:
            lines.append(f"| {r['tool']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['tool']} | {r['time_s']:.2f} | {r['extra_mb']:.0f} | {r['extra_mb'] / model_mb:.2f}x | {r['nodes']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m onnxopt.bench.experiments.compile_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bert")
    p.add_argument("--size", default="base")
    p.add_argument("--exporter", default="legacy")
    p.add_argument("--opset", type=int, default=14)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    from onnxopt import load
    from onnxopt.bench import peers, zoo
    from onnxopt.bench.fingerprint import machine

    model = zoo.build(args.model, size=args.size, exporter=args.exporter, opset=args.opset)
    hints, _ = peers.transformer_hints(load.load(model))
    result = {
        "model": f"{args.model}-{args.size} ({args.exporter}, opset {args.opset})",
        "model_mb": model.stat().st_size / 2**20,
        "nodes_before": _count_nodes(str(model)),
        "repeat": args.repeat,
        "machine": machine(),
        "tools": [],
    }
    for tool in args.tools.split(","):
        r = measure(tool, model, hints, args.repeat)
        print(json.dumps(r), flush=True)
        result["tools"].append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compile_{args.model}_{args.size}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
