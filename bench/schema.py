"""The benchmark report: its versioned schema, a validator, and atomic load/save.

`bench/SCHEMA.md` documents every field. The schema below is data: `validate` walks it and reports the
first problem as one line naming the field (`results[2].latency_ms.p50: expected a number, got 'fast'`).
Readers ignore fields they do not know, so adding an optional field keeps the version; removing or
changing the meaning of one bumps `SCHEMA_VERSION`, and a report with a version this onnxopt does not
read is refused with a message saying which versions it reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from onnxopt.errors import CompileError

SCHEMA_NAME = "onnxopt.bench"
SCHEMA_VERSION = 1
READABLE_VERSIONS = (1,)


class ReportError(CompileError):
    """A report file that cannot be used; the message is the one line the CLI prints."""


class _Nullable:
    def __init__(self, spec):
        self.spec = spec


class _Enum:
    def __init__(self, *values):
        self.values = values


class _Map:
    """A JSON object with arbitrary keys, each value following `spec`."""

    def __init__(self, spec):
        self.spec = spec


NUM, ANY = object(), object()
STATUS = _Enum("ok", "skipped", "failed")
OPT_LEVELS = ("disable", "basic", "extended", "all")

LATENCY = {k: NUM for k in ("mean", "p50", "p90", "p99", "min", "max", "stdev", "iqr", "round_spread", "noise_pct")}
LATENCY.update({"rounds": int, "runs": int, "round_medians?": [NUM]})

SCHEMA = {
    "schema": _Enum(SCHEMA_NAME),
    "schema_version": int,
    "label": str,
    "created_utc": str,
    "onnxopt_version": str,
    "onnxruntime_version": str,
    "available_providers": [str],
    "device": {
        "id": str,
        "name": str,
        "cpu": {"model": str, "arch": str, "logical_cores": _Nullable(int), "physical_cores": _Nullable(int),
                "usable_cores": _Nullable(int), "simd": [str]},
        "memory_gb": _Nullable(NUM),
        "os": str,
        "python": str,
        "gpus": [{"name": str, "driver": str, "memory_mb": _Nullable(NUM)}],
    },
    "conditions?": _Map(ANY),
    "settings": {
        "mode": _Enum("isolated", "alternating"),
        "warmup": int,
        "iterations": int,
        "rounds": int,
        "threads": int,
        "graph_optimization_level": _Enum(*OPT_LEVELS),
    },
    "models": [{
        "name": str,
        "path": str,
        "sha256": str,
        "size_bytes": int,
        "nodes": int,
        "input_shapes": _Map([int]),
        "batch_size": int,
    }],
    "variants?": [{
        "model": str,
        "name": str,
        "kind": _Enum("original", "onnxopt", "peer"),
        "status": STATUS,
        "reason": _Nullable(str),
        "compile": _Nullable({"time_s": NUM, "peak_mb": NUM}),
        "nodes": _Nullable(int),
        "size_bytes": _Nullable(int),
        "fidelity": _Nullable({"max_rel": _Nullable(NUM), "cosine": _Nullable(NUM)}),
    }],
    "results": [{
        "model": str,
        "variant": str,
        "ep": str,
        "provider": str,
        "status": STATUS,
        "reason": _Nullable(str),
        "latency_ms": _Nullable(LATENCY),
        "throughput": _Nullable({"inferences_per_s": NUM, "items_per_s": NUM, "batch_size": int}),
        "session_load_s": _Nullable(NUM),
        "memory": _Nullable({"host_peak_delta_mb": _Nullable(NUM), "device_mb": _Nullable(NUM), "method": str}),
    }],
}


def _describe(value) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _check(value, spec, where: str) -> None:
    def fail(expected: str):
        raise ReportError(f"{where or 'report'}: expected {expected}, got {_describe(value)}")

    if isinstance(spec, _Nullable):
        if value is not None:
            _check(value, spec.spec, where)
    elif spec is ANY:
        pass
    elif spec is NUM:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
    elif spec is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif spec is str:
        if not isinstance(value, str):
            fail("a string")
    elif isinstance(spec, _Enum):
        if value not in spec.values:
            fail("one of " + ", ".join(json.dumps(v) for v in spec.values))
    elif isinstance(spec, list):
        if not isinstance(value, list):
            fail("a list")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]")
    elif isinstance(spec, _Map):
        if not isinstance(value, dict):
            fail("an object")
        for key, item in value.items():
            _check(item, spec.spec, f"{where}.{key}" if where else key)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            fail("an object")
        for key, sub in spec.items():
            name, optional = (key[:-1], True) if key.endswith("?") else (key, False)
            path = f"{where}.{name}" if where else name
            if name not in value:
                if optional:
                    continue
                raise ReportError(f"{path}: missing")
            _check(value[name], sub, path)
    else:  # pragma: no cover - a mistake in SCHEMA itself
        raise TypeError(f"bad schema entry at {where}: {spec!r}")


def validate(report) -> dict:
    """Return `report` if it is a valid bench report; else raise ReportError naming the first problem."""
    if not isinstance(report, dict):
        raise ReportError(f"not an onnxopt bench report: the JSON is a {type(report).__name__}, not an object")
    if report.get("schema") != SCHEMA_NAME:
        hint = " (it looks like an `onnxopt --report` compile report)" if "passes" in report else ""
        raise ReportError(f'not an onnxopt bench report: no "schema": "{SCHEMA_NAME}" field{hint}')
    version = report.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ReportError(f"schema_version: expected an integer, got {_describe(version)}")
    if version not in READABLE_VERSIONS:
        newer = " written by a newer onnxopt; upgrade onnxopt" if version > SCHEMA_VERSION else ""
        raise ReportError(f"unsupported schema_version {version}{newer} (this onnxopt reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    _check(report, SCHEMA, "")
    models = {m["name"] for m in report["models"]}
    if len(models) != len(report["models"]):
        raise ReportError("models: two models have the same name")
    for kind in ("results", "variants"):
        for i, item in enumerate(report.get(kind, [])):
            if item["model"] not in models:
                raise ReportError(f"{kind}[{i}].model: {item['model']!r} is not in models")
            if item["status"] != "ok" and not item["reason"]:
                raise ReportError(f"{kind}[{i}].reason: a {item['status']} entry needs a reason")
    for i, r in enumerate(report["results"]):
        if r["status"] == "ok":
            for key in ("latency_ms", "throughput"):
                if r[key] is None:
                    raise ReportError(f"results[{i}].{key}: missing for a measurement with status ok")
    return report


def load(path: str | os.PathLike) -> dict:
    """Read and validate a report file; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text file") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    try:
        return validate(data)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None


def save(report: dict, path: str | os.PathLike) -> Path:
    """Validate, then write atomically (temporary file in the same folder, then rename)."""
    validate(report)
    return write_text(path, json.dumps(report, indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ReportError(f"{path}: is a folder")
    if not path.parent.exists():
        raise ReportError(f"{path.parent}: no such folder")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
