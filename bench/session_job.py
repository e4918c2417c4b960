"""One latency measurement in a fresh interpreter: `python session_job.py SPEC.json` (run by runner.py).

It is started as a script, not with `python -m onnxopt...`, so it imports only numpy and onnxruntime:
nothing of the parent's memory or imports is in the numbers. The spec names the model, the execution
provider and its options, the session options, and an .npz of input feeds. It prints one JSON line:

  status        "ok", or "skipped"/"failed" with `reason`
  providers     the providers the session actually uses (a silent fallback to CPU is a skip, not a result)
  provider_options   the options the EP reports it runs with
  load_s        InferenceSession creation time
  times_ms      every timed run, in order
  rss_before_mb resident memory after imports and feeds, before the session
  peak_rss_mb   peak resident memory during session creation and all runs (VmHWM, reset just before
                the session is created through /proc/self/clear_refs; else getrusage's lifetime peak)
  device_memory_mb  GPU memory this process holds after the runs (nvidia-smi), for GPU EPs
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time


_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> str:
    """Reset the kernel's peak-RSS counter so the peak is this measurement's alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def _peak_mb(method: str) -> float:
    if method == "VmHWM":
        peak = _status_mb("VmHWM")
        if peak is not None:
            return peak
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024


def _rss_mb() -> float:
    rss = _status_mb("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return 0.0


def _device_memory_mb() -> float | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.strip().splitlines():
        pid, _, mem = (p.strip() for p in line.partition(","))
        if pid == str(os.getpid()) and mem.isdigit():
            return float(mem)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:300]


def run(spec: dict) -> dict:
    import numpy as np

    from onnxopt import sessions

    feeds = dict(np.load(spec["feeds"]))
    # One session per process here: its threads may spin, as a deployed session's do.
    options = sessions.options(optimize=spec["graph_optimization_level"], threads=spec["threads"], spinning=True)
    provider = spec["provider"]
    providers = sessions.providers_for(provider, spec.get("provider_options"))

    rss_before = _rss_mb()
    method = _reset_peak()
    start = time.perf_counter()
    try:
        sess = sessions.session(spec["model"], options, providers)
    except Exception as exc:
        return {"status": "failed", "reason": f"session creation failed: {_first_line(exc)}"}
    load_s = time.perf_counter() - start
    used = sess.get_providers()
    if not used or used[0] != provider:
        return {"status": "skipped", "reason": f"onnxruntime fell back to {', '.join(used)} ({provider} did not load)"}
    try:
        for _ in range(spec["warmup"]):
            sess.run(None, feeds)
        times = []
        for _ in range(spec["iterations"]):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t0) * 1000)
    except Exception as exc:
        return {"status": "failed", "reason": f"run failed: {_first_line(exc)}"}
    return {
        "status": "ok",
        "providers": used,
        "provider_options": sess.get_provider_options().get(provider, {}),
        "load_s": load_s,
        "times_ms": times,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_mb(method),
        "peak_method": method,
        "device_memory_mb": _device_memory_mb() if provider in _GPU_PROVIDERS else None,
    }


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        result = run(spec)
    except Exception as exc:  # report, never a traceback: the parent records it as a failed measurement
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {_first_line(exc)}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
