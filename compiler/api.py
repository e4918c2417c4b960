"""The library API: `onnxopt.compile(model, opt_level=2, target="cpu", **options) -> CompileResult`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import __version__, emit, host, ir_version, load, pipeline, report, scaleout, verify, weights
from onnxopt.errors import CompileError
from onnxopt.files import FileSet
from onnxopt.options import CompileOptions
from onnxopt.passes import inference_dropout as inference_dropout_pass
from onnxopt.passes import plugins, registry
from onnxopt.passes.int8.calibration_data import CalibrationError

# fp16 verification bound: cosine of every output against the fp32 original.
FP16_MIN_COSINE = 0.999
# int8 QDQ needs per-channel QuantizeLinear (opset 13); older models are upgraded for --int8.
INT8_MIN_OPSET = 13


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


@_guarded
def compile(model, opt_level: int = 2, target: str = "cpu", *, options: CompileOptions | None = None,  # noqa: A001
            **keywords) -> CompileResult:
    """Optimize `model` (path, onnx.ModelProto or onnx_ir.Model; never modified) at `opt_level`.

    The keywords are the fields of onnxopt.options.CompileOptions (or pass `options=` one): `opset`,
    `enable`, `disable`, `fold_initializer_inputs`, `verify_outputs`, `input_shapes`, `input_data`,
    `tolerance`, `inference_dropout`, `fp16`, `fp16_io`, `int8`, `calibration_data`,
    `calibration_samples`, `calibration_method`, `int8_min_cosine`, `int8_metric`, `int8_target`,
    `int8_reduce_range`, `progress`, `prune`, `prune_round`, `prune_min_cosine`, `base_dir`, `workers`,
    `ray`, `threads`.

    Raises CompileError with a one-line message on bad input, or when verification finds that an
    exact level changed the outputs by more than `tolerance` (relative to each output's magnitude).
    Lossy transforms run only when asked (`fp16`, `int8` with `calibration_data`: an .npz path, a
    folder of .npz/.npy files, or an iterable of feed dicts); for them verification reports the
    fidelity reached (relative error, cosine) and fails only on non-finite outputs or a cosine
    below the transform's target. `int8_reduce_range` (7-bit weights) defaults to what the compiling
    host needs for the cpu target (on for x86 without VNNI, see onnxopt.host); pass True/False when
    compiling for another machine. `base_dir`: for a ModelProto or onnx_ir.Model whose weights are
    external data, the folder they may be read from (a path's folder is its own; locations that are
    absolute or escape that folder are refused). Verification runs on `input_data` when given (an
    .npz path or a feed dict: the user's own sample), else on synthesized inputs (onnxopt.verify).
    `inference_dropout` turns training-mode Dropout into inference Dropout before anything else.
    `int8_metric` ("cosine", "top1" for classifiers, "rel-error") is what the int8 fidelity control
    enforces, at `int8_target` (default: `int8_min_cosine` for cosine, 0.98 top-1 agreement, 0.1
    relative error); see onnxopt.kernels.fidelity. A model below opset 13 is upgraded to 13 for int8
    (per-channel QuantizeLinear), the upgrade verified on its own. `progress(stage, done, total)` is
    called as calibration and the fidelity control advance. `prune=F` (with `calibration_data`)
    removes the fraction F of the prunable MACs by structured pruning with reconstruction
    (onnxopt.passes.prune), kept counts rounded to multiples of `prune_round`, backing off until the
    held-out min cosine reaches `prune_min_cosine` when given. `workers` (local processes) or `ray`
    (a Ray address or "auto") compute the calibration statistics in shards, each worker's session with
    `threads` intra-op threads; the output is the same to the bit (onnxopt.scaleout).
    """
    if options is None:
        options = CompileOptions.from_keywords(opt_level=opt_level, target=target, **keywords)
    elif keywords or (opt_level, target) != (2, "cpu"):
        raise CompileError("give either options= or keywords, not both")
    return _Compile(model, options).run()


class _Compile:
    """One compile, as the steps it takes: plan, load, reference, optimize, check, verify, report."""

    def __init__(self, model, opts: CompileOptions):
        self.model, self.times = model, {"start": time.perf_counter()}
        if opts.int8_reduce_range is None:
            opts = dataclasses.replace(opts, int8_reduce_range=opts.target == "cpu" and host.u8s8_saturates())
        self.opts = opts

    def run(self) -> CompileResult:
        infos = self.plan()
        graph = self.load()
        reference, original = self.reference(graph)
        graph, records, ir_upgrade = self.optimize(graph, infos)
        sig_after = self.check_interface(graph)
        verification: dict = {"enabled": self.opts.verify_outputs}
        if self.opts.verify_outputs:
            verification = _verify(reference, original, graph, self.opts.tolerance, records, self.lossy_min_cosine,
                                   self.opts.fp16 and self.opts.fp16_io)
        self.times["end"] = time.perf_counter()
        rep = self.report(graph, records, ir_upgrade, sig_after, verification)
        graph.producer_name = "onnxopt"
        graph.producer_version = __version__
        return CompileResult(graph, rep, self.source, self.reads)

    def plan(self) -> list:
        """The passes to run, and what verification will ask of a lossy result."""
        o = self.opts
        if o.int8 and o.calibration_data is None:
            raise CompileError("--int8 needs --calibration-data (an .npz, a folder of .npz/.npy, or feed dicts)")
        if o.prune is not None and o.calibration_data is None:
            raise CompileError("--prune needs --calibration-data (an .npz, a folder of .npz/.npy, or feed dicts): "
                               "which units matter and the reconstruction are measured on it")
        # Verification bound for lossy outputs on the synthesized inputs. int8's fidelity target is
        # enforced by its pass on held-out calibration samples (real data); synthesized N(0, 1) inputs
        # are out of distribution for calibrated ranges, so there verification only requires finite
        # outputs and reports the cosine.
        self.lossy_min_cosine = -1.0 if (o.int8 or o.prune is not None) else (FP16_MIN_COSINE if o.fp16 else None)
        if o.ray is not None:
            scaleout.check_ray()
        if plugins.load_errors:
            entry, error = plugins.load_errors[0]
            raise CompileError(f"plugin pass package {entry!r} (entry point group {plugins.ENTRY_POINT_GROUP!r}) "
                               f"failed to load: {error}")
        flags = {name for name, on in (("fold-initializer-inputs", o.fold_initializer_inputs), ("fp16", o.fp16),
                                       ("int8", o.int8), ("prune", o.prune is not None)) if on}
        try:
            return registry.select(o.opt_level, o.target, enable=o.enable, disable=o.disable, flags=flags)
        except KeyError as exc:
            raise CompileError(str(exc.args[0])) from None

    def load(self) -> ir.Model:
        """The validated model, and every file the compile reads (for CompileResult.save)."""
        o, model = self.opts, self.model
        self.source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        graph = load.load(model, base_dir=o.base_dir)
        self.reads = reads_of(None, o.calibration_data, o.input_data)
        if self.source is not None:
            self.reads.read(self.source, "the input model")
        # The loaded model's external tensors name every weight file it reads (the mapped model file too).
        self.reads.read_all(load.external_files(graph), "the input model's external data")
        self.dropouts = inference_dropout_pass.apply(graph) if o.inference_dropout else []
        # Folding initializer inputs removes them from the interface on purpose; compare the rest.
        self.sig_before = verify.signature(graph, initializer_inputs=not o.fold_initializer_inputs)
        self.ops_before = report.op_counts(graph)
        self.times["load"] = time.perf_counter()
        return graph

    def reference(self, graph: ir.Model):
        """The original's outputs, before any pass touches it; the copy (sharing the weights) is kept
        to measure its rounding noise should the result differ."""
        ref = original = None
        if self.opts.verify_outputs:
            ref = verify.reference(graph, self.opts.input_shapes, self.opts.input_data)
            original = graph.clone()
        self._reference = ref
        self.times["reference"] = time.perf_counter()
        return ref, original

    def optimize(self, graph: ir.Model, infos):
        if self.opts.opset is not None:
            graph = _upgrade_opset(graph, self.opts.opset)
        graph = self.int8_opset(graph)
        lossy = self.opts.int8 or self.opts.prune is not None
        runner = scaleout.make_runner(self.opts) if lossy else None
        pass_options = {
            **self.opts.for_passes(),
            # Passes must not import the compiler package; calibration gets its sessions from here,
            # and the runner of its shards (this process, worker processes or Ray tasks).
            "make_session": verify.session,
            "make_kernel_session": functools.partial(verify.session, optimize=True),
            "shard_runner": runner,
        }
        try:
            records = pipeline.run(graph, infos, pass_options)
        except CalibrationError as exc:
            raise CompileError(str(exc)) from None
        finally:
            if runner is not None:
                runner.close()
        ir_upgrade = ir_version.conform(graph)
        self.times["passes"] = time.perf_counter()
        return graph, records, ir_upgrade

    def int8_opset(self, graph: ir.Model) -> ir.Model:
        """QuantizeLinear per channel needs opset 13: upgrade rather than leave the model float unsaid.
        The upgrade is exact, so it is verified on its own (the int8 verification after it is lossy)."""
        self.int8_upgrade = None
        current = graph.opset_imports.get("", 0)
        if not self.opts.int8 or current >= INT8_MIN_OPSET:
            return graph
        try:
            graph = _upgrade_opset(graph, INT8_MIN_OPSET)
        except CompileError as exc:
            raise CompileError(f"--int8 needs opset {INT8_MIN_OPSET} (the model has {current}): {exc}") from None
        self.int8_upgrade = {"from": current, "to": INT8_MIN_OPSET, "verified": False}
        if self._reference is not None:
            ref = self._reference
            diffs = verify.compare(ref.outputs, verify.run(graph, ref.feeds), self.opts.tolerance)
            bad = [d for d in diffs if not d.ok]
            if bad:
                raise CompileError(f"--int8 needs opset {INT8_MIN_OPSET}; upgrading from opset {current} changed "
                                   f"output {bad[0].name!r} ({bad[0].note or f'relative error {bad[0].rel:.3g}'})")
            self.int8_upgrade["verified"] = True
        return graph

    def check_interface(self, graph: ir.Model) -> dict:
        o = self.opts
        sig_after = verify.signature(graph, initializer_inputs=not o.fold_initializer_inputs)
        sig_before = self.sig_before
        if o.fp16 and o.fp16_io:
            # --fp16-io changes float32 inputs/outputs to float16 on purpose; every other change is a bug.
            sig_before = _fp16_interface(sig_before)
        if sig_after != sig_before:
            raise CompileError(f"internal error: the model's interface changed "
                               f"({_first_difference(sig_before, sig_after)})")
        return sig_after

    def report(self, graph, records, ir_upgrade, sig_after, verification) -> dict:
        o, t = self.opts, self.times
        data = o.input_data
        options = {**o.for_report(),
                   "input_data": (os.fspath(data) if isinstance(data, (str, os.PathLike))
                                  else "<feed dict>" if data is not None else None),
                   "int8_opset_upgrade": self.int8_upgrade}
        ops_after = report.op_counts(graph)
        return {
            "onnxopt_version": __version__,
            "schema_version": report.SCHEMA_VERSION,
            "input": self.source or "<in-memory model>",
            "options": options,
            "inference_dropout": {"changed": self.dropouts} if o.inference_dropout else None,
            "ir_version_upgrade": ir_upgrade,
            "passes": records,
            "ops_before": self.ops_before,
            "ops_after": ops_after,
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(ops_after.values()),
            "signature": sig_after,
            "verification": verification,
            "time_s": {
                "load": round(t["load"] - t["start"], 4),
                "passes": round(t["passes"] - t["reference"], 4),
                # reference run before the passes + compiled run after them
                "verify": round((t["reference"] - t["load"]) + (t["end"] - t["passes"]), 4),
                "total": round(t["end"] - t["start"], 4),
            },
        }


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
