"""Compile-time, peak-memory and node-count benchmark: onnxopt beside onnxsim, onnxoptimizer and
onnxruntime's transformer optimizer, on the same model in the same run.

Each measurement runs in a fresh subprocess so peak memory is that tool's alone:
  time_s     wall time of load + optimize + save (imports excluded), median of --repeat runs
  extra_mb   peak RSS during the job minus RSS just before it started (imports excluded)
  nodes      node count of the tool's output

    python -m onnxopt.bench.compile_bench --model bert --size base --repeat 3 --out bench/results

A missing peer is reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ("onnxopt-O1", "onnxopt-O3", "onnxopt-O3-noverify", "onnxsim", "onnxoptimizer", "ort-transformer-optimizer")

# Head/hidden sizes onnxruntime's transformer optimizer must be told (it cannot infer them).
ORT_MODEL_ARGS = {"bert": ("bert", 12, 768), "minilm": ("bert", 12, 384), "vit": ("vit", 12, 768), "gpt2": ("gpt2", 12, 768)}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _count_nodes(path: str) -> int:
    import onnx

    return len(onnx.load(path, load_external_data=False).graph.node)


def _job(tool: str, model: str, out: str, model_name: str) -> None:
    """Runs in the subprocess: import the tool, then time and measure one compile."""
    import onnx

    if tool.startswith("onnxopt"):
        import onnxopt

        level = 1 if tool == "onnxopt-O1" else 3

        def work():
            onnxopt.compile(model, opt_level=level, verify_outputs="noverify" not in tool).save(out)
    elif tool == "onnxsim":
        import onnxsim

        def work():
            simplified, ok = onnxsim.simplify(onnx.load(model))
            onnx.save(simplified, out)
    elif tool == "onnxoptimizer":
        import onnxoptimizer

        def work():
            onnx.save(onnxoptimizer.optimize(onnx.load(model)), out)
    elif tool == "ort-transformer-optimizer":
        from onnxruntime.transformers.optimizer import optimize_model

        kind, heads, hidden = ORT_MODEL_ARGS.get(model_name, ("bert", 12, 768))

        def work():
            optimize_model(model, model_type=kind, num_heads=heads, hidden_size=hidden).save_model_to_file(out)
    else:
        raise SystemExit(f"unknown tool {tool}")

    base = _rss_mb()
    start = time.perf_counter()
    work()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"time_s": elapsed, "extra_mb": max(peak - base, 0.0), "nodes": _count_nodes(out)}))


def measure(tool: str, model: Path, model_name: str, repeat: int) -> dict:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            out = os.path.join(tmp, f"{tool}.onnx")
            proc = subprocess.run(
                [sys.executable, "-m", "onnxopt.bench.compile_bench", "--job", tool, str(model), out, model_name],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                return {"tool": tool, "skipped": reason}
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "tool": tool,
        "time_s": statistics.median(r["time_s"] for r in runs),
        "time_runs": [round(r["time_s"], 3) for r in runs],
        "extra_mb": statistics.median(r["extra_mb"] for r in runs),
        "nodes": runs[-1]["nodes"],
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}


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
    if argv and argv[0] == "--job":
        _job(*argv[1:5])
        return 0
    p = argparse.ArgumentParser(prog="python -m onnxopt.bench.compile_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bert")
    p.add_argument("--size", default="base")
    p.add_argument("--exporter", default="legacy")
    p.add_argument("--opset", type=int, default=14)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    from onnxopt.bench import zoo

    model = zoo.build(args.model, size=args.size, exporter=args.exporter, opset=args.opset)
    result = {
        "model": f"{args.model}-{args.size} ({args.exporter}, opset {args.opset})",
        "model_mb": model.stat().st_size / 2**20,
        "nodes_before": _count_nodes(str(model)),
        "repeat": args.repeat,
        "machine": machine(),
        "tools": [],
    }
    for tool in args.tools.split(","):
        r = measure(tool, model, args.model, args.repeat)
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
