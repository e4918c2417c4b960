"""Sharded int8 calibration (onnxopt.scaleout): throughput with 1 and 2 workers, the driver's memory
from 512 to 4096 samples, and the MiniLM output model of 2 Ray workers against one process.

    python -m onnxopt.bench.experiments.scaleout_bench [--parts throughput,memory,compile,prune] [-o bench/results/scaleout.json]

(`--parts` reruns only those parts, keeping the others' figures from the existing output file.)

Model: all-MiniLM-L6-v2 (real weights), real English sentences (int8_bench.real_sentences) tokenized
to 64 tokens, written as a folder of .npz files of 8 samples each (the 585 sentences repeated for 4096).

* throughput: int8's calibration statistics (statistics.calibrate: every quantizable MatMul input's
  histogram, the bias-correction channel sums) of 512 samples, through this process (1 thread),
  1 and 2 local worker processes and 2 Ray tasks (1 thread each); wall time from the call to the
  merged statistics, worker start-up included; also the inference time summed over the shards (the
  work the workers did). Runs alternate, `--repeats` rounds, medians reported.
* memory: the driver's peak traced heap (tracemalloc: Python and numpy allocations) during the
  statistics of 512 and 4096 samples through 2 worker processes, which read the files themselves.
* compile: `onnxopt.compile(minilm, int8=True)` on the 512 samples (8 shards) in one process and over
  2 local Ray workers: the output model bytes must be identical; prune: the same for `prune=0.25`
  (its dense Gram statistics go through the shards).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics as stats
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from onnxopt import load, scaleout, verify
from onnxopt.bench.fingerprint import machine
from onnxopt.passes.int8 import calibration_data, statistics

PER_FILE = 8


def _folder(root: Path, feeds: list[dict], n: int) -> Path:
    folder = root / f"calib-{n}"
    folder.mkdir()
    for k in range(0, n, PER_FILE):
        batch = [feeds[j % len(feeds)] for j in range(k, min(k + PER_FILE, n))]
        np.savez(folder / f"part{k // PER_FILE:05d}.npz",
                 **{name: np.concatenate([f[name] for f in batch]) for name in batch[0]})
    return folder


def _statistics(path: str, folder: Path, runner) -> tuple[float, float]:
    """Seconds to the merged calibration statistics of `folder` through `runner`, and the seconds of
    inference summed over its shards."""
    model = load.load(path)
    # The activations int8 calibrates: every input of a MatMul by a constant weight.
    acts = list({id(n.inputs[0]): n.inputs[0] for n in model.graph
                 if n.op_type == "MatMul" and n.inputs[1].const_value is not None}.values())
    source = calibration_data.open_source(str(folder), model)
    t = time.perf_counter()
    st = statistics.calibrate({"make_session": verify.session, "shard_runner": runner}, model, acts,
                              {v.name: -1 for v in acts}, source, calibration_data.split_plan(source.count), False)
    assert st.samples == source.count
    return time.perf_counter() - t, st.inference_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m onnxopt.bench.experiments.scaleout_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="throughput,memory,compile,prune")
    p.add_argument("-o", "--output", default="bench/results/scaleout.json")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))

    import ray

    import onnxopt
    from onnxopt.bench import zoo
    from onnxopt.bench.experiments.int8_bench import MINILM_SEQ, _minilm_feeds, real_sentences

    path = zoo.build("minilm")
    feeds = _minilm_feeds(real_sentences())
    previous = json.loads(Path(args.output).read_text()) if parts != {"throughput", "memory", "compile", "prune"} else {}
    out: dict = {**previous, "machine": machine(), "model": "minilm (all-MiniLM-L6-v2)", "seq": MINILM_SEQ,
                 "samples_per_file": PER_FILE, "shard_samples": calibration_data.SHARD_SAMPLES,
                 "note": "2-core VM shared with two other agents' jobs: timings are contended"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="onnxopt-scaleout-") as tmp:
            small, large = _folder(Path(tmp), feeds, 512), _folder(Path(tmp), feeds, 4096)
            runners = {"this process, 1 thread": lambda: scaleout.InProcess(1),
                       "1 worker process, 1 thread": lambda: scaleout.Processes(1, 1),
                       "2 worker processes, 1 thread each": lambda: scaleout.Processes(2, 1),
                       "2 Ray tasks, 1 thread each": lambda: scaleout.RayTasks("auto", 2, 1)}
            if "throughput" in parts:
                times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
                for _ in range(args.repeats):
                    for name, make in runners.items():
                        times[name].append(_statistics(path, small, make()))
                base = stats.median(t for t, _ in times["1 worker process, 1 thread"])
                out["throughput_512"] = {}
                for name, runs in times.items():
                    wall = stats.median(t for t, _ in runs)
                    out["throughput_512"][name] = {
                        "median_s": round(wall, 2), "runs_s": [round(t, 2) for t, _ in runs],
                        "samples_per_s": round(512 / wall, 1), "speedup_vs_1_worker": round(base / wall, 2),
                        "inference_s_summed_over_shards": round(stats.median(i for _, i in runs), 2)}
                out["load_avg_1m_after_throughput"] = round(__import__("os").getloadavg()[0], 2)
            if "memory" in parts:
                memory = {}
                for n, folder in ((512, small), (4096, large)):
                    tracemalloc.start()
                    seconds, _ = _statistics(path, folder, scaleout.Processes(2, 1))
                    _, peak = tracemalloc.get_traced_memory()
                    tracemalloc.stop()
                    memory[str(n)] = {"driver_peak_traced_mb": round(peak / 2**20, 2), "seconds": round(seconds, 1)}
                memory["ratio_4096_vs_512"] = round(memory["4096"]["driver_peak_traced_mb"] /
                                                    memory["512"]["driver_peak_traced_mb"], 3)
                out["driver_memory_2_workers"] = memory
            if "compile" in parts:
                compiled = {}
                for name, kw in (("one process", {}), ("2 Ray workers", {"ray": "auto", "workers": 2})):
                    t = time.perf_counter()
                    result = onnxopt.compile(path, int8=True, calibration_data=str(small), verify_outputs=False, **kw)
                    compiled[name] = (result.model.SerializeToString(), round(time.perf_counter() - t, 1),
                                      result.report)
                (a, ta, rep), (b, tb, _) = compiled.values()
                int8 = next(r for r in rep["passes"] if r["name"] == "quantize_int8")["details"]
                out["minilm_int8_compile_512"] = {
                    "identical_bytes": a == b, "model_bytes": len(a), "one_process_s": ta, "two_ray_workers_s": tb,
                    "quantized_layers": int8["quantized"], "samples": int8["samples"]}
            if "prune" in parts:
                pruned = {}
                for name, kw in (("one process", {}), ("2 Ray workers", {"ray": "auto", "workers": 2})):
                    t = time.perf_counter()
                    result = onnxopt.compile(path, prune=0.25, calibration_data=str(small), verify_outputs=False,
                                             **kw)
                    pruned[name] = (result.model.SerializeToString(), round(time.perf_counter() - t, 1))
                (a, ta), (b, tb) = pruned.values()
                out["minilm_prune_compile_512"] = {"identical_bytes": a == b, "model_bytes": len(a),
                                                   "one_process_s": ta, "two_ray_workers_s": tb}
    finally:
        ray.shutdown()
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    Path(args.output).with_suffix(".md").write_text(_markdown(out))
    print(_markdown(out))
    return 0


def _markdown(out: dict) -> str:
    m = out["machine"]
    lines = [f"# Sharded int8 calibration (MiniLM-L6, seq {out['seq']}, shards of {out['shard_samples']} samples)", "",
             f"{m['cpu']}, {m['cores']} cores; {out['note']}.", "",
             "## Calibration statistics of 512 samples (worker start-up included)", "",
             "| runner | median s | samples/s | speedup vs 1 worker | inference s (summed over shards) | runs s |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in out["throughput_512"].items():
        lines.append(f"| {name} | {r['median_s']} | {r['samples_per_s']} | {r['speedup_vs_1_worker']}x | "
                     f"{r.get('inference_s_summed_over_shards', '')} | {', '.join(map(str, r['runs_s']))} |")
    if "load_avg_1m_after_throughput" in out:
        lines.append(f"\nload average (1 min) after the throughput runs: {out['load_avg_1m_after_throughput']}")
    mem = out["driver_memory_2_workers"]
    lines += ["", "## Driver memory, 2 worker processes (folder of .npz files, 8 samples each)", "",
              "| samples | driver peak traced heap MB | seconds |", "|---:|---:|---:|"]
    for n in ("512", "4096"):
        lines.append(f"| {n} | {mem[n]['driver_peak_traced_mb']} | {mem[n]['seconds']} |")
    lines.append(f"\nratio 4096 / 512: {mem['ratio_4096_vs_512']}")
    c = out.get("minilm_int8_compile_512")
    if c:
        lines += ["", "## MiniLM int8 compile, 512 samples (8 shards)", "",
                  f"one process {c['one_process_s']} s, 2 local Ray workers {c['two_ray_workers_s']} s; output model "
                  f"bytes identical: **{c['identical_bytes']}** ({c['model_bytes']} bytes, {c['quantized_layers']} "
                  f"layers int8, samples {c['samples']})"]
    c = out.get("minilm_prune_compile_512")
    if c:
        lines += ["", "## MiniLM --prune 0.25 compile, 512 samples (8 shards of dense Gram statistics)", "",
                  f"one process {c['one_process_s']} s, 2 local Ray workers {c['two_ray_workers_s']} s; output model "
                  f"bytes identical: **{c['identical_bytes']}** ({c['model_bytes']} bytes)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
