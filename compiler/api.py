"""The library API: `onnxopt.compile(model, opt_level=2, target="cpu", **options) -> CompileResult`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import __version__, emit, host, ir_version, load, pipeline, report, verify, weights
from onnxopt.errors import CompileError
from onnxopt.files import FileSet
from onnxopt.passes import inference_dropout as inference_dropout_pass
from onnxopt.passes import plugins, registry
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
    # The files the compile read (model, external data, calibration data): save() never writes one.
    reads: FileSet = dataclasses.field(default_factory=FileSet)

    @functools.cached_property
    def model(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.ir_model)

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        """Write atomically; external data when asked or when the weights exceed ~1.8 GB.

        Refuses (CompileError) a path that is one of the files the compile read."""
        return emit.save(self.ir_model, path, external_data=external_data, reads=self.reads)


def reads_of(model, calibration_data=None, input_data=None) -> FileSet:
    """The files a compile of `model` reads, known before it starts (compiler/files.py): the model
    file and its external data, the calibration data file or the files of its folder, the input data."""
    fs = FileSet()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        fs.read(path, "the input model")
        proto = load.read_proto(path)
        fs.read_all(load.external_paths(proto, path.resolve().parent), "the input model's external data")
    elif isinstance(model, ir.Model):
        fs.read_all(load.external_files(model), "the input model's external data")
    if isinstance(calibration_data, (str, os.PathLike)):
        cal = Path(calibration_data)
        fs.read_all(sorted(cal.iterdir()) if cal.is_dir() else [cal], "the calibration data")
    if isinstance(input_data, (str, os.PathLike)):
        fs.read(input_data, "the input data")
    return fs


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


@contextlib.contextmanager
def _libraries_quiet():
    """onnx_ir and onnxscript log warnings about what onnxopt handles on purpose (e.g. "Skipped
    deduplication of initializer ... graph input or output"); a compile's stderr is onnxopt's own."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _guarded(fn):
    """The library's promise: the only exception `compile()` raises is CompileError. Anything else
    is an onnxopt bug or an exhausted machine, still said in one line (the cause stays chained)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _libraries_quiet():
                return fn(*args, **kwargs)
        except CompileError:
            raise
        except MemoryError:
            raise CompileError("out of memory (a sample input or the model is too large for this machine; "
                               "--input-shape gives smaller sample inputs)") from None
        except RecursionError:
            raise CompileError("the model is nested too deeply to process") from None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CompileError(f"internal error: {type(exc).__name__}: {first}") from exc
    return wrapper


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return (_is_int(x) or isinstance(x, (float, np.floating))) and np.isfinite(float(x))


def _is_names(x) -> bool:
    return not isinstance(x, (str, bytes)) and isinstance(x, Iterable) and all(isinstance(n, str) for n in x)


def _is_shapes(x) -> bool:
    return isinstance(x, dict) and all(
        isinstance(k, str) and isinstance(v, (tuple, list)) and all(_is_int(d) and d > 0 for d in v)
        for k, v in x.items())


# Each keyword of compile() with what it must be: a wrong type is a CompileError naming it, never a
# TypeError deep inside a pass.
_OPTION_TYPES = {
    "opset": (lambda x: x is None or (_is_int(x) and 1 <= x), "None or an opset number"),
    "enable": (_is_names, "a list of pass names"),
    "disable": (_is_names, "a list of pass names"),
    "input_shapes": (lambda x: x is None or _is_shapes(x), "a dict of input name to a tuple of positive ints"),
    "tolerance": (lambda x: _is_real(x) and x >= 0, "a finite number >= 0"),
    "calibration_samples": (lambda x: x is None or (_is_int(x) and x >= 1), "None or a whole number >= 1"),
    "int8_min_cosine": (lambda x: _is_real(x) and -1 <= x <= 1, "a number from -1 to 1"),
    "int8_reduce_range": (lambda x: x is None or isinstance(x, bool), "None, True or False"),
    "base_dir": (lambda x: x is None or isinstance(x, (str, os.PathLike)), "None or a folder path"),
    **{name: (lambda x: isinstance(x, bool), "True or False")
       for name in ("fold_initializer_inputs", "verify_outputs", "fp16", "fp16_io", "int8", "inference_dropout")},
}


def _check_options(values: dict) -> None:
    for name, (ok, what) in _OPTION_TYPES.items():
        if name in values and not ok(values[name]):
            raise CompileError(f"option {name}={values[name]!r} is not valid: it must be {what}")


@_guarded
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
    base_dir: str | os.PathLike | None = None,
    input_data=None,
    inference_dropout: bool = False,
) -> CompileResult:
    """Optimize `model` (path, onnx.ModelProto or onnx_ir.Model; never modified) at `opt_level`.

    Raises CompileError with a one-line message on bad input, or when verification finds that an
    exact level changed the outputs by more than `tolerance` (relative to each output's magnitude).
    Lossy transforms run only when asked (`fp16`, `int8` with `calibration_data`: an .npz path, a
    folder of .npz/.npy files, or an iterable of feed dicts); for them verification reports the
    fidelity reached (relative error, cosine) and fails only on non-finite outputs or a cosine
    below the transform's target. `int8_reduce_range` (7-bit weights) defaults to what the compiling
    host needs for the cpu target (on for x86 without VNNI, see onnxopt.host); pass True/False when
    compiling for another machine. `base_dir`: for a ModelProto or onnx_ir.Model whose weights are
    external data, the folder they may be read from (a path's folder is its own; locations that are
    absolute or escape that folder are refused).

    Verification runs on `input_data` when given (an .npz path or a feed dict: the user's own
    sample), else on synthesized inputs (see onnxopt.verify). `inference_dropout` turns
    training-mode Dropout into inference Dropout before anything else (it changes the model on
    purpose; the report lists the nodes).
    """
    start = time.perf_counter()
    if not (_is_int(opt_level) and opt_level in LEVELS):
        raise CompileError(f"optimization level must be one of 0, 1, 2, 3 (got {opt_level!r})")
    if not isinstance(target, str) or target not in registry.TARGETS:
        raise CompileError(f"unknown target {target!r} (choose from {', '.join(registry.TARGETS)})")
    _check_options(locals())
    flags = {name for name, on in (("fold-initializer-inputs", fold_initializer_inputs), ("fp16", fp16),
                                   ("int8", int8)) if on}
    if int8 and calibration_data is None:
        raise CompileError("--int8 needs --calibration-data (an .npz, a folder of .npz/.npy, or feed dicts)")
    # Verification bound for lossy outputs on the synthesized inputs. int8's fidelity target is
    # enforced by its pass on held-out calibration samples (real data); synthesized N(0, 1) inputs are
    # out of distribution for calibrated ranges, so there verification only requires finite outputs
    # and reports the cosine.
    lossy_min_cosine = -1.0 if int8 else (FP16_MIN_COSINE if fp16 else None)
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
        "input_shapes": input_shapes,
        # Passes must not import the compiler package; calibration gets its sessions from here.
        "make_session": verify.session,
        "make_kernel_session": functools.partial(verify.session, optimize=True),
    }
    if plugins.load_errors:
        entry, error = plugins.load_errors[0]
        raise CompileError(f"plugin pass package {entry!r} (entry point group {plugins.ENTRY_POINT_GROUP!r}) "
                           f"failed to load: {error}")
    try:
        infos = registry.select(opt_level, target, enable=enable, disable=disable, flags=flags)
    except KeyError as exc:
        raise CompileError(str(exc.args[0])) from None

    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    graph = load.load(model, base_dir=base_dir)
    reads = reads_of(None, calibration_data, input_data)
    if source is not None:
        reads.read(source, "the input model")
    # The loaded model's external tensors name every weight file it reads (the mapped model file too).
    reads.read_all(load.external_files(graph), "the input model's external data")
    dropouts = inference_dropout_pass.apply(graph) if inference_dropout else []
    t_load = time.perf_counter()

    # Folding initializer inputs removes them from the interface on purpose; compare the rest.
    sig_before = verify.signature(graph, initializer_inputs=not fold_initializer_inputs)
    ops_before = report.op_counts(graph)
    ref = original = None
    if verify_outputs:
        # The reference outputs come from the model as loaded, before any pass touches it; the
        # copy (sharing the weights) is kept to measure its rounding noise should the result differ.
        ref = verify.reference(graph, input_shapes, input_data)
        original = graph.clone()
    t_reference = time.perf_counter()

    if opset is not None:
        graph = _upgrade_opset(graph, opset)
    try:
        records = pipeline.run(graph, infos, options)
    except CalibrationError as exc:
        raise CompileError(str(exc)) from None
    ir_upgrade = ir_version.conform(graph)
    t_passes = time.perf_counter()

    sig_after = verify.signature(graph, initializer_inputs=not fold_initializer_inputs)
    if fp16 and fp16_io:
        # --fp16-io changes float32 inputs/outputs to float16 on purpose; every other change is a bug.
        sig_before = _fp16_interface(sig_before)
    if sig_after != sig_before:
        raise CompileError(f"internal error: the model's interface changed ({_first_difference(sig_before, sig_after)})")

    verification: dict = {"enabled": verify_outputs}
    if verify_outputs:
        verification = _verify(ref, original, graph, tolerance, records, lossy_min_cosine, fp16 and fp16_io)
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
            "input_data": (os.fspath(input_data) if isinstance(input_data, (str, os.PathLike))
                           else "<feed dict>" if input_data is not None else None),
            "inference_dropout": inference_dropout,
        },
        "inference_dropout": {"changed": dropouts} if inference_dropout else None,
        "ir_version_upgrade": ir_upgrade,
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
    return CompileResult(graph, rep, source, reads)


def _verify(reference: verify.Reference, original: ir.Model, graph: ir.Model, tolerance: float,
            records: list[dict], lossy_min_cosine: float | None = None, fp16_io: bool = False) -> dict:
    ref, feeds = reference.outputs, reference.feeds
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
    floor: dict[str, float] = {}
    if lossy_min_cosine is None and any(not d.ok and np.isfinite(d.rel) for d in diffs):
        # Over the tolerance: is that more than the original's own rounding noise?
        floor = verify.noise_floor(original, feeds, ref)
        for d in diffs:
            bound = verify.NOISE_MULTIPLE * floor.get(d.name, 0.0)
            if not d.ok and np.isfinite(d.rel) and d.rel <= bound:
                d.ok = True
                d.note = (f"within {verify.NOISE_MULTIPLE:g}x the original's own rounding noise "
                          f"{floor[d.name]:.3g} (margin {d.rel / floor[d.name]:.2f}x)")
    result = {
        "enabled": True,
        "tolerance": tolerance,
        "input_source": reference.source,
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "shapes_tried": [{k: list(v) for k, v in t.items()} for t in reference.tried],
        "outputs": [dataclasses.asdict(d) for d in diffs],
        "max_rel": max((d.rel for d in diffs), default=0.0),
        "lossy": lossy_min_cosine is not None,
        "noise_floor": floor or None,
        "noise_multiple": verify.NOISE_MULTIPLE if floor else None,
        "ok": all(d.ok for d in diffs),
    }
    bad = [d for d in diffs if not d.ok]
    if bad:
        fired = ", ".join(r["name"] for r in records if r["fired"]) or "none"
        d = bad[0]
        detail = d.note or f"relative error {d.rel:.3g} > tolerance {tolerance:g}"
        if not d.note:
            noise = floor.get(d.name)
            noise = ("" if noise is None else f"the original's own rounding noise is {noise:.2g}; ")
            detail += f" ({noise}--tolerance {_round_up(d.rel):g} would accept it)"
        raise CompileError(f"verification failed: output {d.name!r}: {detail} (passes that fired: {fired})")
    return result


def _round_up(x: float) -> float:
    """The next 1, 2 or 5 times a power of ten at or above x (a tolerance to suggest)."""
    exp = np.floor(np.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10**exp >= x:
            return float(m * 10**exp)
    return float(x)


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
