"""The library API: `onnxopt.compile(model, opt_level=2, target="cpu", **options) -> CompileResult`."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import __version__, emit, host, load, pipeline, report, verify, weights
from onnxopt.errors import CompileError
from onnxopt.passes import registry
from onnxopt.passes.calibration_data import CalibrationError

LEVELS = (0, 1, 2, 3)
# fp16 verification bound: cosine of every output against the fp32 original.
FP16_MIN_COSINE = 0.999


@dataclasses.dataclass
class CompileResult:
    """The compiled model (`.model` as onnx.ModelProto, `.ir_model` as onnx_ir) and its report."""

    ir_model: ir.Model
    report: dict
    source: str | None = None

    @functools.cached_property
    def model(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.ir_model)

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        """Write atomically; external data when asked or when the weights exceed ~1.8 GB."""
        return emit.save(self.ir_model, path, external_data=external_data, source=self.source)


def _upgrade_opset(model: ir.Model, opset: int) -> ir.Model:
    """Upgrade with onnx's version converter, run on the weightless skeleton; weights reattach by
    name (the converter rewrites nodes, not initializers)."""
    current = model.opset_imports.get("", None)
    if current is None:
        raise CompileError("model has no ai.onnx opset to upgrade")
    if opset < current:
        raise CompileError(f"--opset {opset} is lower than the model's opset {current}; only upgrades are supported")
    if opset == current:
        return model
    proto, moved = weights.skeleton(model)
    try:
        upgraded = onnx.version_converter.convert_version(proto, opset)
    except Exception as exc:
        raise CompileError(f"cannot upgrade the model to opset {opset}: {str(exc).strip().splitlines()[0]}") from None
    result = ir.serde.deserialize_model(upgraded)
    for name, tensor in moved:
        result.graph.initializers[name].const_value = tensor
    # The converter re-infers shapes and may pin a symbolic dimension of an input or output (ViT's
    # sequence axis becomes 197); the interface is the user's, so it is given back as declared.
    for before, after in zip([*model.graph.inputs, *model.graph.outputs], [*result.graph.inputs, *result.graph.outputs]):
        after.shape, after.type = before.shape, before.type
    return result


def compile(  # noqa: A001 - the public name users expect
    model,
    opt_level: int = 2,
    target: str = "cpu",
    *,
    opset: int | None = None,
    enable: Iterable[str] = (),
    disable: Iterable[str] = (),
    fold_initializer_inputs: bool = False,
    verify_outputs: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    tolerance: float = verify.DEFAULT_TOLERANCE,
    fp16: bool = False,
    fp16_io: bool = False,
    int8: bool = False,
    calibration_data=None,
    calibration_samples: int | None = None,
    calibration_method: str = "entropy",
    int8_min_cosine: float = 0.99,
    int8_reduce_range: bool | None = None,
    prune: float | None = None,
    prune_round: int = 8,
    prune_min_cosine: float | None = None,
) -> CompileResult:
    """Optimize `model` (path, onnx.ModelProto or onnx_ir.Model; never modified) at `opt_level`.

    Raises CompileError with a one-line message on bad input, or when verification finds that an
    exact level changed the outputs by more than `tolerance` (relative to each output's magnitude).
    Lossy transforms run only when asked (`fp16`, `int8` with `calibration_data`: an .npz path, a
    folder of .npz/.npy files, or an iterable of feed dicts); for them verification reports the
    fidelity reached (relative error, cosine) and fails only on non-finite outputs or a cosine
    below the transform's target. `int8_reduce_range` (7-bit weights) defaults to what the compiling
    host needs for the cpu target (on for x86 without VNNI, see onnxopt.host); pass True/False when
    compiling for another machine. `prune=F` (with `calibration_data`) removes the fraction F of the
    prunable MACs by structured pruning with reconstruction (onnxopt.passes.prune), kept counts
    rounded to multiples of `prune_round`, backing off until the held-out min cosine reaches
    `prune_min_cosine` when given.
    """
    start = time.perf_counter()
    if opt_level not in LEVELS:
        raise CompileError(f"optimization level must be one of 0, 1, 2, 3 (got {opt_level!r})")
    if target not in registry.TARGETS:
        raise CompileError(f"unknown target {target!r} (choose from {', '.join(registry.TARGETS)})")
    flags = {name for name, on in (("fold-initializer-inputs", fold_initializer_inputs), ("fp16", fp16),
                                   ("int8", int8), ("prune", prune is not None)) if on}
    if int8 and calibration_data is None:
        raise CompileError("--int8 needs --calibration-data (an .npz, a folder of .npz/.npy, or feed dicts)")
    _check_prune(prune, prune_round, prune_min_cosine, calibration_data)
    # Verification bound for lossy outputs on the synthesized inputs. int8's fidelity target is
    # enforced by its pass on held-out calibration samples (real data); synthesized N(0, 1) inputs are
    # out of distribution for calibrated ranges, so there verification only requires finite outputs
    # and reports the cosine.
    lossy_min_cosine = -1.0 if (int8 or prune is not None) else (FP16_MIN_COSINE if fp16 else None)
    if int8_reduce_range is None:
        int8_reduce_range = target == "cpu" and host.u8s8_saturates()
    options = {
        "target": target,
        "fp16_io": fp16_io,
        "int8": int8,
        "calibration_data": calibration_data,
        "calibration_samples": calibration_samples,
        "calibration_method": calibration_method,
        "int8_min_cosine": int8_min_cosine,
        "int8_reduce_range": int8_reduce_range,
        "prune": prune,
        "prune_round": prune_round,
        "prune_min_cosine": prune_min_cosine,
        "input_shapes": input_shapes,
        # Passes must not import the compiler package; calibration gets its sessions from here.
        "make_session": verify.session,
        "make_kernel_session": functools.partial(verify.session, optimize=True),
    }
    try:
        infos = registry.select(opt_level, target, enable=enable, disable=disable, flags=flags)
    except KeyError as exc:
        raise CompileError(str(exc.args[0])) from None

    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    graph = load.load(model)
    t_load = time.perf_counter()

    # Folding initializer inputs removes them from the interface on purpose; compare the rest.
    sig_before = verify.signature(graph, initializer_inputs=not fold_initializer_inputs)
    ops_before = report.op_counts(graph)
    feeds = reference = None
    if verify_outputs:
        feeds = verify.synthesize_feeds(graph, input_shapes)
        # The reference outputs come from the model as loaded, before any pass touches it.
        reference = verify.run(graph, feeds)
    t_reference = time.perf_counter()

    if opset is not None:
        graph = _upgrade_opset(graph, opset)
    try:
        records = pipeline.run(graph, infos, options)
    except CalibrationError as exc:
        raise CompileError(str(exc)) from None
    t_passes = time.perf_counter()

    sig_after = verify.signature(graph, initializer_inputs=not fold_initializer_inputs)
    if fp16 and fp16_io:
        # --fp16-io changes float32 inputs/outputs to float16 on purpose; every other change is a bug.
        sig_before = _fp16_interface(sig_before)
    if sig_after != sig_before:
        raise CompileError(f"internal error: the model's interface changed ({_first_difference(sig_before, sig_after)})")

    verification: dict = {"enabled": verify_outputs}
    if verify_outputs:
        verification = _verify(reference, graph, feeds, tolerance, records, lossy_min_cosine, fp16 and fp16_io)
    t_end = time.perf_counter()

    rep = {
        "onnxopt_version": __version__,
        "schema_version": report.SCHEMA_VERSION,
        "input": source or "<in-memory model>",
        "options": {
            "opt_level": opt_level,
            "target": target,
            "opset": opset,
            "enable": sorted(enable),
            "disable": sorted(disable),
            "fold_initializer_inputs": fold_initializer_inputs,
            "verify": verify_outputs,
            "fp16": fp16,
            "fp16_io": fp16_io,
            "int8": int8,
            "calibration_method": calibration_method if int8 else None,
            "int8_min_cosine": int8_min_cosine if int8 else None,
            "int8_reduce_range": int8_reduce_range if int8 else None,
            "prune": prune,
            "prune_round": prune_round if prune is not None else None,
            "prune_min_cosine": prune_min_cosine if prune is not None else None,
        },
        "passes": records,
        "ops_before": ops_before,
        "ops_after": report.op_counts(graph),
        "nodes_before": sum(ops_before.values()),
        "nodes_after": sum(report.op_counts(graph).values()),
        "signature": sig_after,
        "verification": verification,
        "time_s": {
            "load": round(t_load - start, 4),
            "passes": round(t_passes - t_reference, 4),
            # reference run before the passes + compiled run after them
            "verify": round((t_reference - t_load) + (t_end - t_passes), 4),
            "total": round(t_end - start, 4),
        },
    }
    graph.producer_name = "onnxopt"
    graph.producer_version = __version__
    return CompileResult(graph, rep, source)


def _check_prune(prune, prune_round, prune_min_cosine, calibration_data) -> None:
    """Bad pruning options fail before any work."""
    if prune is None:
        return
    if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0.0 < float(prune) < 1.0:
        raise CompileError(f"--prune must be a fraction of the MACs strictly between 0 and 1 (got {prune!r})")
    if isinstance(prune_round, bool) or not isinstance(prune_round, int) or prune_round < 1:
        raise CompileError(f"--prune-round must be a positive integer (got {prune_round!r})")
    if prune_min_cosine is not None and not -1.0 <= float(prune_min_cosine) <= 1.0:
        raise CompileError(f"--prune-min-cosine must be in [-1, 1] (got {prune_min_cosine!r})")
    if calibration_data is None:
        raise CompileError("--prune needs --calibration-data (an .npz, a folder of .npz/.npy, or feed dicts): "
                           "which units matter and the reconstruction are measured on it")


def _verify(ref: dict, graph: ir.Model, feeds, tolerance: float, records: list[dict],
            lossy_min_cosine: float | None = None, fp16_io: bool = False) -> dict:
    if fp16_io:
        # --fp16-io: the compiled model takes and returns float16 where the original had float32;
        # feed it the same samples rounded to float16 and compare its outputs as float32.
        f16_feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
        got = verify.run(graph, f16_feeds)
        got = {k: g.astype(np.float32) if g.dtype == np.float16 and k in ref and ref[k].dtype == np.float32 else g
               for k, g in got.items()}
    else:
        got = verify.run(graph, feeds)
    diffs = verify.compare(ref, got, tolerance)
    if lossy_min_cosine is not None:
        # A lossy transform was asked for: the exact tolerance does not apply, its fidelity target does.
        for d in diffs:
            if d.note != "non-finite values differ" and d.rel != float("inf"):
                d.cosine = verify.cosine(ref[d.name], got[d.name])
                d.ok = d.cosine >= lossy_min_cosine
                d.note = f"lossy: cosine {d.cosine:.6f} (target {lossy_min_cosine})"
    result = {
        "enabled": True,
        "tolerance": tolerance,
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "outputs": [dataclasses.asdict(d) for d in diffs],
        "max_rel": max((d.rel for d in diffs), default=0.0),
        "lossy": lossy_min_cosine is not None,
        "ok": all(d.ok for d in diffs),
    }
    bad = [d for d in diffs if not d.ok]
    if bad:
        fired = ", ".join(r["name"] for r in records if r["fired"]) or "none"
        d = bad[0]
        detail = d.note or f"relative error {d.rel:.3g} > tolerance {tolerance:g}"
        raise CompileError(f"verification failed: output {d.name!r}: {detail} (passes that fired: {fired})")
    return result


def _fp16_interface(sig: dict) -> dict:
    """The signature with float32 inputs/outputs as float16 (what --fp16-io promises)."""
    def f16(d: dict) -> dict:
        return {**d, "dtype": str(ir.DataType.FLOAT16)} if d["dtype"] == str(ir.DataType.FLOAT) else d
    return {k: [f16(d) for d in v] for k, v in sig.items()}


def _first_difference(a: dict, b: dict) -> str:
    for kind in ("inputs", "outputs"):
        for x, y in zip(a[kind], b[kind]):
            if x != y:
                return f"{kind[:-1]} {x} became {y}"
        if len(a[kind]) != len(b[kind]):
            return f"number of {kind} changed from {len(a[kind])} to {len(b[kind])}"
    return "unknown"
