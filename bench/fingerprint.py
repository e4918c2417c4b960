"""Device fingerprint: what machine a benchmark ran on, so reports from different machines compare.

`device()` returns CPU model and vendor, logical/physical/usable cores, the SIMD features that matter
to onnxruntime's kernels (from /proc/cpuinfo flags on Linux), memory, OS, kernel, Python, and GPUs with
their driver (from nvidia-smi when present). `id` is a short hash of the parts that identify the
hardware (CPU model, cores, memory, GPUs), not of software versions, so one machine keeps its id across
upgrades. `conditions()` is what varies from run to run (load average, CPU frequency governor).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess

from onnxopt.host import cpu_flags, cpuinfo

# Flags worth reporting, in the order shown (x86 /proc/cpuinfo "flags", arm64 "Features").
SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2",
)


def _memory_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # psutil missing or unsupported platform
        return None


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:
        return None


def gpus() -> list[dict]:
    """NVIDIA GPUs with driver and memory, via nvidia-smi; [] when there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            mem = int(parts[2]) if parts[2].isdigit() else None
            found.append({"name": parts[0], "driver": parts[1], "memory_mb": mem})
    return found


def cpu() -> dict:
    info = cpuinfo()
    model = info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine()
    flags = cpu_flags(info)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "model": model,
        "vendor": info.get("vendor_id") or info.get("CPU implementer") or "",
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cores": usable,
        "simd": [f for f in SIMD_FLAGS if f in flags],
    }


def simd_summary(simd: list[str]) -> str:
    """The widest vector and matrix extensions: 'AVX-512 VNNI BF16', 'AVX2 VNNI, AMX', 'NEON dotprod SVE'."""
    flags = set(simd)
    parts = []
    if "avx512f" in flags:
        parts.append(" ".join(["AVX-512"] + [n for f, n in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"),
                                                             ("avx512_fp16", "FP16")) if f in flags]))
    elif "avx2" in flags:
        parts.append("AVX2 VNNI" if "avx_vnni" in flags else "AVX2")
    elif "avx" in flags:
        parts.append("AVX")
    if flags & {"amx_tile", "amx_int8", "amx_bf16"}:
        parts.append("AMX")
    if "asimd" in flags:
        parts.append(" ".join(["NEON"] + [n for f, n in (("asimddp", "dotprod"), ("i8mm", "i8mm"), ("sve2", "SVE2"),
                                                          ("sve", "SVE")) if f in flags]))
    return ", ".join(parts)


def short_name(dev: dict) -> str:
    """A label a person recognizes: 'NVIDIA H100 80GB HBM3' or 'AMD EPYC (2 cores)'."""
    if dev.get("gpus"):
        return dev["gpus"][0]["name"]
    return f"{dev['cpu']['model']} ({dev['cpu']['usable_cores']} cores)"


def device() -> dict:
    dev = {
        "cpu": cpu(),
        "memory_gb": _memory_gb(),
        "os": platform.platform(),
        "system": platform.system(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gpus": gpus(),
    }
    identity = {
        "cpu": dev["cpu"]["model"],
        "cores": dev["cpu"]["logical_cores"],
        "memory_gb": round(dev["memory_gb"] or 0),
        "gpus": [g["name"] for g in dev["gpus"]],
        "system": dev["system"],
    }
    dev["id"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    dev["name"] = short_name(dev)
    return dev


def conditions() -> dict:
    """What varies between runs on one machine and explains noise: load average, frequency governor."""
    out: dict = {}
    try:
        out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        out["load_avg_1m"] = None
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") as f:
            out["cpu_governor"] = f.read().strip()
    except OSError:
        out["cpu_governor"] = None
    return out


def machine() -> dict:
    """The short machine summary the compile and latency benchmarks print."""
    dev = device()
    return {"cpu": dev["cpu"]["model"], "cores": dev["cpu"]["usable_cores"], "simd": dev["cpu"]["simd"],
            "memory_gb": dev["memory_gb"], "python": dev["python"], "os": dev["os"], "id": dev["id"]}
