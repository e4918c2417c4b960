"""Residual + LayerNorm on onnxruntime: the fused SkipLayerNormalization kernel against Add +
LayerNormalization, kernel times from onnxruntime's profiler (the evidence behind the catalogue's
`avoid` entries in kernels/catalogue.py).

Each variant is a one-node (or two-node) model with graph optimizations at ORT_ENABLE_BASIC, so
onnxruntime runs exactly the kernels written (at ORT_ENABLE_ALL its CPU session would itself fuse
Add + LayerNormalization into SkipLayerNormalization). Median per-kernel time over the runs.

    python -m onnxopt.bench.experiments.norm_kernels [--shapes 128x768,197x768] [--threads 1,2] [--runs 300]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxopt import sessions

VARIANTS = ("SkipLayerNormalization", "Add + LayerNormalization")


def _model(variant: str, rows: int, hidden: int) -> bytes:
    rng = np.random.default_rng(0)
    x = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, rows, hidden]) for n in ("x", "skip")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, hidden])
    inits = [numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), n) for n in ("gamma", "beta")]
    if variant == "SkipLayerNormalization":
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"],
                                  domain="com.microsoft", epsilon=1e-12)]
    else:
        nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
                 helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    graph = helper.make_graph(nodes, "norm", x, [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def kernel_times(variant: str, rows: int, hidden: int, threads: int, runs: int) -> dict[str, float]:
    """Median kernel time (µs) of each op the variant runs."""
    with tempfile.TemporaryDirectory() as tmp:
        so = sessions.options(optimize="basic", threads=threads, spinning=True)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = sessions.session(_model(variant, rows, hidden), so)
        rng = np.random.default_rng(1)
        feeds = {n: rng.standard_normal((1, rows, hidden)).astype(np.float32) for n in ("x", "skip")}
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    times = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times[e["args"]["op_name"]].append(e["dur"])
    return {op: float(np.median(t)) for op, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onnxopt.bench.experiments.norm_kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x768,197x768", help="rows x hidden, comma-separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider; median kernel time in µs\n")
    print("| shape | threads | " + " | ".join(VARIANTS) + " | fused / unfused |")
    print("|---|---|" + "---|" * (len(VARIANTS) + 1))
    for shape in args.shapes.split(","):
        rows, hidden = (int(v) for v in shape.lower().split("x"))
        for threads in (int(t) for t in args.threads.split(",")):
            totals = [sum(kernel_times(v, rows, hidden, threads, args.runs).values()) for v in VARIANTS]
            print(f"| [1, {rows}, {hidden}] | {threads} | " + " | ".join(f"{t:.0f}" for t in totals)
                  + f" | {totals[0] / totals[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
