"""Start-up time of the CLI: `onnxopt --version`, `--help` and a usage error (goal: under 0.5 s)
beside a full compile of a small model (the zoo's tiny CNN, -O2, verified).

    python -m onnxopt.bench.experiments.startup_bench [--runs 7] [-o bench/results/startup.json]

Each command runs in a fresh process (the installed `onnxopt` entry point, else `python -m
onnxopt`); the figure is the median wall time of `--runs` runs, with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _cli() -> list[str]:
    exe = shutil.which("onnxopt")
    return [exe] if exe else [sys.executable, "-m", "onnxopt"]


def _time(cmd: list[str], runs: int) -> dict:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m onnxopt.bench.experiments.startup_bench", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("-o", "--output", help="write the figures as JSON")
    args = p.parse_args(argv)

    from onnxopt.bench import fingerprint, zoo

    cli = _cli()
    model = str(zoo.build("cnn", size="tiny", opset=13))
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "onnxopt --version": cli + ["--version"],
            "onnxopt --help": cli + ["--help"],
            "onnxopt (usage error: -O 9)": cli + [model, "-O", "9"],
            "onnxopt cnn-tiny.onnx -O2 (verified compile)": cli + [model, "-O2", "-q", "-o", os.path.join(tmp, "o.onnx")],
        }
        results = {name: _time(cmd, args.runs) for name, cmd in cases.items()}
    width = max(map(len, results))
    print(f"{'command':<{width}}  median s   min s   max s")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['median_s']:8.3f} {r['min_s']:7.3f} {r['max_s']:7.3f}")
    if args.output:
        report = {"results": results, "machine": fingerprint.machine(),
                  "date": time.strftime("%Y-%m-%d")}
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
