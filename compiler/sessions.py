"""The one onnxruntime session factory: verification, calibration and the benchmarks all make their
sessions here, so optimization level, threads, spinning and native logging are set one way.
(tests/oracle.py keeps its own, independent session on purpose.)

onnxruntime's native log lines reach stderr only when `quiet_native_logs(False)` (the CLI's -v or
--debug): otherwise an error stays the one line onnxopt prints.
"""

from __future__ import annotations

import os

# onnxruntime log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_QUIET, _LOUD = 4, 2
_severity = _QUIET

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


def quiet_native_logs(quiet: bool = True) -> None:
    """onnxruntime's own log lines reach stderr only when not `quiet`."""
    global _severity
    _severity = _QUIET if quiet else _LOUD


def native_log_severity() -> int:
    return _severity


def options(*, optimize: str | bool = "all", threads: int | None = None, spinning: bool = False,
            prepacking: bool = True, config: dict | None = None):
    """SessionOptions: `optimize` one of LEVELS' keys (True = "all", False = "disable"); `threads`
    intra-op threads (None or 0: onnxruntime's default). Intra-op threads do not spin-wait unless
    asked: with several sessions in one process (alternating rounds, calibration beside
    verification), idle sessions' spinning threads steal the cores from the one that runs (measured
    on BERT-base at 2 threads on 2 cores, three sessions alternating: 165 ms with spinning, 136 ms
    without). `prepacking=False` for a session that runs once (pre-packing only adds a copy)."""
    import onnxruntime as ort  # here: compiles with --no-verify never load it

    level = {True: "all", False: "disable"}.get(optimize, optimize)
    so = ort.SessionOptions()
    # A key of LEVELS, or onnxruntime's own name ("ORT_ENABLE_ALL").
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS.get(level, level))
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.log_severity_level = _severity
    ort.set_default_logger_severity(_severity)
    return so


def providers_for(provider: str = "CPUExecutionProvider", provider_options: dict | None = None) -> list:
    """The provider, with the CPU behind a non-CPU one for the nodes it does not take (as users run it)."""
    out: list = [(provider, provider_options or {})]
    if provider != "CPUExecutionProvider":
        out.append("CPUExecutionProvider")
    return out


def session(model, so=None, providers=("CPUExecutionProvider",)):
    """An InferenceSession over a path or serialized bytes (onnx_ir models: compiler/weights.session,
    which hands the weights over without protobuf)."""
    import onnxruntime as ort

    so = so if so is not None else options()
    source = str(model) if isinstance(model, (str, os.PathLike)) else model
    return ort.InferenceSession(source, so, providers=list(providers))
