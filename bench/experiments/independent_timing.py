"""An independent latency check for `onnxopt bench`: a plain onnxruntime session with default
options and a perf_counter loop, sharing no code with onnxopt's runner.

    python -m onnxopt.bench.zoo mobilenetv2 --size base -o /tmp/mnv2.onnx
    onnxopt bench /tmp/mnv2.onnx -o /tmp/mnv2.json && python bench/experiments/independent_timing.py /tmp/mnv2.onnx

Measured here (2-core EPYC), back to back on a quiet machine: bench p50 4.61 / 3.94 / 4.63 ms vs
independent 3.98 / 3.85 / 3.96 ms (2-17% apart). When other jobs start or stop between the two runs the
machine swings between about 4.8 and 8.3 ms and a single pair can differ by far more.
"""

import sys
import time

import numpy as np
import onnxruntime as ort


def main(path: str, iterations: int = 100, warmup: int = 10) -> None:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    print(f"independent: p50 {np.median(times):.2f} ms  mean {np.mean(times):.2f}  "
          f"min {min(times):.2f}  p90 {np.percentile(times, 90):.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
