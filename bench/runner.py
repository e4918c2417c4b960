"""Run a benchmark and build its report (schema: bench/SCHEMA.md).

Two modes:
- isolated (`onnxopt bench MODEL ...`): every model x EP is measured in its own fresh process
  (bench/session_job.py, which imports only numpy and onnxruntime), so session load time and peak
  memory belong to that measurement alone. Warmup runs, then `iterations` timed runs one after another,
  grouped into `rounds` for the drift figure (round_spread: spread of the per-round medians).
- alternating (`--peers`): the variants of one model (original, onnxopt levels, peers) are all loaded
  in one process and measured in rounds that alternate between them in rotating order
  (onnxopt.bench.timing.alternating), so machine drift hits every variant alike. Host memory is not
  attributed per variant in this mode.

Inputs are synthesized like onnxopt's verifier (onnxopt.verify.synthesize_feeds): dynamic dimensions
are 1 on axis 0 and 16 elsewhere unless `--input-shape` says otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxopt
from onnxopt import load, report as compile_report, verify
from onnxopt.bench import fingerprint, peers, schema, timing

EPS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
INSTALL_HINT = {
    "cuda": "onnxruntime-gpu and a CUDA GPU",
    "tensorrt": "onnxruntime-gpu with TensorRT",
    "openvino": "onnxruntime-openvino",
    "dml": "onnxruntime-directml on Windows",
    "coreml": "onnxruntime on macOS",
}
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
# onnxopt's -O3 target for a variant measured on this EP.
TARGET_FOR_EP = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "tensorrt"}
_SESSION_JOB = Path(__file__).with_name("session_job.py")


@dataclasses.dataclass
class Settings:
    warmup: int = 10
    iterations: int = 100
    rounds: int = 10
    threads: int = 0  # 0: onnxruntime's default
    opt_level: str = "all"
    input_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    label: str | None = None
    peers: tuple[str, ...] | None = None  # tools to build; None: plain (isolated) benchmark
    hints: dict = dataclasses.field(default_factory=dict)  # overrides of transformer_hints
    compile_repeat: int = 1
    keep_dir: Path | None = None  # keep the built variants here
    argv: list[str] | None = None

    @property
    def per_round(self) -> int:
        return max(1, math.ceil(self.iterations / max(1, self.rounds)))


class Progress:
    """The progress interface the runner reports to (a no-op; the CLI passes a tqdm-backed one)."""

    def add(self, n: int) -> None: ...
    def step(self, n: int = 1) -> None: ...
    def describe(self, text: str) -> None: ...


@dataclasses.dataclass
class Model:
    name: str
    path: Path
    ir: object  # onnx_ir.Model
    feeds: dict[str, np.ndarray]
    entry: dict  # the report's models[] entry


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def count_nodes(path) -> int:
    """Nodes of a model file, subgraphs included (the compile report's nodes_before/after)."""
    import onnx

    def walk(graph) -> int:
        n = 0
        for node in graph.node:
            n += 1
            for attr in node.attribute:
                n += sum(walk(g) for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
        return n

    return walk(onnx.load(os.fspath(path), load_external_data=False).graph)


def prepare(path: str | os.PathLike, name: str, shapes: dict[str, tuple[int, ...]]) -> Model:
    """Load and validate a model (onnxopt.load: bad files end in one CompileError line) and make its inputs."""
    path = Path(path)
    model = load.load(path)
    names = {v.name for v in model.graph.inputs if v.const_value is None}
    feeds = verify.synthesize_feeds(model, {k: v for k, v in shapes.items() if k in names})
    batch = next((int(a.shape[0]) for a in feeds.values() if a.ndim >= 1), 1)
    entry = {
        "name": name,
        "path": str(path),
        "sha256": _sha256(path),
        "size_bytes": path.stat().st_size,
        "nodes": sum(compile_report.op_counts(model).values()),
        "opset": model.opset_imports.get("", None),
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "input_dtypes": {k: str(v.dtype) for k, v in feeds.items()},
        "batch_size": batch,
    }
    return Model(name, path, model, feeds, entry)


def unavailable(ep: str) -> str | None:
    provider = EPS[ep]
    available = ort.get_available_providers()
    if provider in available:
        return None
    hint = f"; it needs {INSTALL_HINT[ep]}" if ep in INSTALL_HINT else ""
    return (f"{provider} is not available in onnxruntime {ort.__version__} "
            f"(this build has {', '.join(available)}){hint}")


def _result(model: str, variant: str, ep: str, status: str, reason: str | None = None, **fields) -> dict:
    out = {"model": model, "variant": variant, "ep": ep, "provider": EPS[ep], "status": status, "reason": reason,
           "providers": [], "provider_options": {}, "latency_ms": None, "throughput": None,
           "session_load_s": None, "memory": None}
    out.update(fields)
    return out


def _throughput(stats: dict, batch: int) -> dict:
    # One request at a time: the sequential rate the latency implies.
    rate = 1000.0 / stats["mean"] if stats["mean"] > 0 else 0.0
    return {"inferences_per_s": round(rate, 3), "items_per_s": round(rate * batch, 3), "batch_size": batch}


def measure_isolated(model: Model, ep: str, settings: Settings, workdir: Path) -> dict:
    """One model on one EP in a fresh process (bench/session_job.py)."""
    feeds_path = workdir / f"{model.name}.feeds.npz"
    if not feeds_path.exists():
        np.savez(feeds_path, **model.feeds)
    spec = {"model": str(model.path), "feeds": str(feeds_path), "provider": EPS[ep], "provider_options": {},
            "graph_optimization_level": OPT_LEVELS[settings.opt_level], "threads": settings.threads,
            "warmup": settings.warmup, "iterations": settings.iterations}
    spec_path = workdir / f"{model.name}.{ep}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(_SESSION_JOB), str(spec_path)], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return _result(model.name, "original", ep, "failed", f"measurement process died: {tail[:300]}")
    if out["status"] != "ok":
        return _result(model.name, "original", ep, out["status"], out["reason"])
    stats = timing.summarize(out["times_ms"], settings.per_round)
    memory = {
        "host_peak_delta_mb": round(out["peak_rss_mb"] - out["rss_before_mb"], 1),
        "host_peak_mb": round(out["peak_rss_mb"], 1),
        "host_before_mb": round(out["rss_before_mb"], 1),
        "device_mb": out["device_memory_mb"],
        "method": f"fresh process per measurement; peak resident memory ({out['peak_method']}) during session "
                  "creation and all runs minus resident memory before the session",
    }
    return _result(model.name, "original", ep, "ok", providers=out["providers"],
                   provider_options=out["provider_options"], latency_ms=stats,
                   throughput=_throughput(stats, model.entry["batch_size"]),
                   session_load_s=round(out["load_s"], 4), memory=memory)


def measure_alternating(model: Model, paths: dict[str, Path], ep: str, settings: Settings,
                        progress: Progress) -> list[dict]:
    """All variants of one model in this process, in alternating rounds."""
    provider = EPS[ep]
    sessions, loads, results = {}, {}, []
    for name, path in paths.items():
        start = time.perf_counter()
        try:
            sess = timing.session(path, settings.threads, provider, OPT_LEVELS[settings.opt_level])
        except Exception as exc:
            results.append(_result(model.name, name, ep, "failed", f"session creation failed: {_first_line(exc)}"))
            continue
        loads[name] = time.perf_counter() - start
        if sess.get_providers()[0] != provider:
            results.append(_result(model.name, name, ep, "skipped",
                                   f"onnxruntime fell back to {', '.join(sess.get_providers())}"))
            continue
        sessions[name] = sess
    progress.add(settings.rounds * len(sessions))
    stats = timing.alternating(sessions, model.feeds, settings.rounds, settings.per_round, settings.warmup,
                                progress=progress.step) if sessions else {}
    memory = {"host_peak_delta_mb": None, "device_mb": None,
              "method": "not measured: the variants share one process (alternating rounds)"}
    for name, sess in sessions.items():
        results.append(_result(model.name, name, ep, "ok", providers=sess.get_providers(),
                               provider_options=sess.get_provider_options().get(provider, {}),
                               latency_ms=stats[name], throughput=_throughput(stats[name], model.entry["batch_size"]),
                               session_load_s=round(loads[name], 4), memory=memory))
    order = {name: i for i, name in enumerate(paths)}
    return sorted(results, key=lambda r: order[r["variant"]])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def build_variants(model: Model, settings: Settings, target: str, workdir: Path,
                   progress: Progress) -> tuple[list[dict], dict[str, Path]]:
    """The report's variants[] for one model, and the files of those that built and run."""
    hints, how = peers.transformer_hints(model.ir)
    if settings.hints:
        hints = {**(hints or {}), **settings.hints}
        how = "given on the command line" if hints.keys() >= {"model_type", "num_heads", "hidden_size"} else how
        if not hints.keys() >= {"model_type", "num_heads", "hidden_size"}:
            hints = None
    ctx = {"target": target, "hints": hints, "input_shapes": {k: list(v) for k, v in model.entry["input_shapes"].items()}}
    variants = [{"model": model.name, "name": "original", "kind": "original", "status": "ok", "reason": None,
                 "compile": None, "nodes": model.entry["nodes"], "size_bytes": model.entry["size_bytes"],
                 "sha256": model.entry["sha256"], "fidelity": None}]
    paths = {"original": model.path}
    reference = None
    for tool_name in settings.peers or ():
        tool = peers.TOOLS[tool_name]
        progress.describe(f"{model.name}: {tool_name}")
        entry = {"model": model.name, "name": tool_name, "kind": tool.kind, "status": "ok", "reason": None,
                 "compile": None, "nodes": None, "size_bytes": None, "sha256": None, "fidelity": None,
                 "options": {"target": target} if tool.kind == "onnxopt" else {}}
        if tool.needs_hints:
            entry["options"] = {"hints": hints, "hints_source": how}
        reason = peers.missing_requirement(tool)
        if reason is None and tool.needs_hints and hints is None:
            reason = f"{how}; --model-type, --num-heads and --hidden-size force it"
        if reason is not None:
            entry.update(status="skipped", reason=reason)
            variants.append(entry)
            progress.step()
            continue
        out = workdir / f"{model.name}.{tool_name}.onnx"
        built = peers.compile_in_subprocess(tool_name, model.path, out, ctx, repeat=settings.compile_repeat)
        progress.step()
        if built["status"] != "ok":
            entry.update(status="failed", reason=built["reason"])
            variants.append(entry)
            continue
        entry["compile"] = {k: v for k, v in built.items() if k != "status"}
        entry.update(nodes=count_nodes(out), size_bytes=_size_with_data(out), sha256=_sha256(out))
        try:
            if reference is None:
                reference = peers.outputs(model.path, model.feeds)
            entry["fidelity"] = peers.fidelity(reference, peers.outputs(out, model.feeds))
        except Exception as exc:
            entry.update(status="failed", reason=f"onnxruntime cannot run it: {_first_line(exc)}")
            variants.append(entry)
            continue
        variants.append(entry)
        paths[tool_name] = out
    return variants, paths


def _size_with_data(path: Path) -> int:
    """File size plus any external-data files the model references beside it."""
    import onnx
    from onnx import external_data_helper

    size = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    seen = set()
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if loc and loc not in seen and (path.parent / loc).is_file():
                seen.add(loc)
                size += (path.parent / loc).stat().st_size
    return size


def model_names(paths: list[str]) -> list[str]:
    """File stems, made unique (a/model.onnx, b/model.onnx -> model, model-2)."""
    names, seen = [], {}
    for p in paths:
        stem = Path(p).name.removesuffix(".onnx")
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def run(model_paths: list[str], eps: list[str], settings: Settings, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    device = fingerprint.device()
    conditions = fingerprint.conditions()
    known = set()
    models = []
    for path, name in zip(model_paths, model_names(model_paths)):
        progress.describe(f"loading {name}")
        model = prepare(path, name, settings.input_shapes)
        known |= set(model.entry["input_shapes"])
        models.append(model)
    unknown = set(settings.input_shapes) - known
    if unknown:
        raise onnxopt.CompileError(f"--input-shape names unknown input {sorted(unknown)[0]!r}")

    results, variants = [], []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        workdir = Path(tmp)
        for model in models:
            if settings.peers is None:
                progress.add(len(eps))
                for ep in eps:
                    progress.describe(f"{model.name} on {ep}")
                    reason = unavailable(ep)
                    results.append(_result(model.name, "original", ep, "skipped", reason) if reason
                                   else measure_isolated(model, ep, settings, workdir))
                    progress.step()
                continue
            target = TARGET_FOR_EP.get(eps[0], "generic")
            keep = settings.keep_dir or workdir
            progress.add(len(settings.peers))
            built, paths = build_variants(model, settings, target, keep, progress)
            variants += built
            for ep in eps:
                reason = unavailable(ep)
                if reason:
                    results += [_result(model.name, v, ep, "skipped", reason) for v in paths]
                    continue
                progress.describe(f"{model.name}: latency on {ep}")
                results += measure_alternating(model, paths, ep, settings, progress)
            # Free the model's weights before the next one.
            model.ir = None
    conditions["load_avg_1m_end"] = fingerprint.conditions()["load_avg_1m"]

    report = {
        "schema": schema.SCHEMA_NAME,
        "schema_version": schema.SCHEMA_VERSION,
        "label": settings.label or device["name"],
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "onnxopt_version": onnxopt.__version__,
        "onnxruntime_version": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "device": device,
        "conditions": conditions,
        "settings": {
            "mode": "isolated" if settings.peers is None else "alternating",
            "warmup": settings.warmup,
            "iterations": settings.iterations,
            "rounds": settings.rounds,
            "per_round": settings.per_round,
            "threads": settings.threads,
            "graph_optimization_level": settings.opt_level,
            "argv": settings.argv,
        },
        "models": [m.entry for m in models],
        "results": results,
    }
    if settings.peers is not None:
        report["variants"] = variants
    return schema.validate(report)
