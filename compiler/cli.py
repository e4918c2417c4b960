"""The command line: `onnxopt MODEL [-O{0,1,2,3}] [-o OUT] ...`.

Exit status: 0 ok, 1 error (bad model, failed verification), 2 usage. Errors are one line on stderr,
`onnxopt: error: ...`; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from onnxopt import __version__
from onnxopt.errors import CompileError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"onnxopt: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxopt",
        description="Optimize an ONNX model and verify the result against the original.",
        epilog="Also: `onnxopt bench MODEL ...` (latency reports on onnxruntime EPs) and "
               "`onnxopt compare R1.json R2.json ...` (tables and plots across devices); `--help` on each.",
    )
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("-O", dest="level", type=int, choices=[0, 1, 2, 3], default=2, metavar="{0,1,2,3}",
                   help="optimization level (default 2): 0 canonicalize, 1 exact cleanups, "
                        "2 portable fusions, 3 target fused kernels")
    p.add_argument("-o", "--output", help="output file (default: <stem>.opt.onnx beside the input)")
    p.add_argument("--target", default="cpu", choices=["cpu", "cuda", "tensorrt", "generic"],
                   help="execution target for -O3 fused kernels (default cpu)")
    p.add_argument("--opset", type=int, help="upgrade the model to this ai.onnx opset first")
    p.add_argument("--report", metavar="OUT.json", help="write the compile report as JSON")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="concrete shape for a dynamic input during verification (repeatable)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="verification tolerance, relative to each output's magnitude (default 1e-4)")
    p.add_argument("--no-verify", action="store_true", help="skip running original and result in onnxruntime")
    p.add_argument("--external-data", action="store_true", help="store weights in OUT.data beside the model")
    p.add_argument("--fold-initializer-inputs", action="store_true",
                   help="treat initializers that are also graph inputs as constants (changes the interface)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and compute, with fp32 islands where needed")
    p.add_argument("--fp16-io", action="store_true", help="with --fp16: float16 graph inputs and outputs too")
    p.add_argument("--int8", action="store_true", help="int8 quantization (QDQ) after fusion; needs --calibration-data")
    p.add_argument("--calibration-data", metavar="PATH",
                   help=".npz with one array per model input (first axis = samples), or a folder of .npz/.npy")
    p.add_argument("--calibration-samples", type=int, metavar="N", help="use at most N calibration samples")
    p.add_argument("--calibration-method", default="entropy", choices=["entropy", "minmax", "percentile"],
                   help="activation range method (default entropy: minimum KL divergence)")
    p.add_argument("--int8-min-cosine", type=float, default=0.99,
                   help="cosine target (default 0.99): the worst layers stay float until the validation part of the "
                        "calibration data reaches it, with a margin (see the README)")
    p.add_argument("--int8-metric", choices=["cosine", "top1", "rel-error"], default="cosine",
                   help="what the int8 fidelity control enforces on held-out samples (default cosine: every "
                        "output's cosine; top1: a classifier's argmax agreement; rel-error: relative error)")
    p.add_argument("--int8-target", type=float, metavar="T",
                   help="target of --int8-metric (default: --int8-min-cosine for cosine, 0.98 agreement for top1, "
                        "0.1 for rel-error)")
    p.add_argument("--progress", action="store_true",
                   help="progress bars on stderr for int8 calibration and fidelity control even when stderr is "
                        "not a terminal (they are drawn on a terminal anyway; never with -q)")
    p.add_argument("--int8-reduce-range", choices=["auto", "on", "off"], default="auto",
                   help="7-bit weights, needed where u8 x s8 kernels saturate (x86 without VNNI); "
                        "auto: decided by this machine for --target cpu")
    p.add_argument("--enable", action="append", default=[], metavar="PASS", help="run this pass too")
    p.add_argument("--disable", action="append", default=[], metavar="PASS", help="do not run this pass")
    p.add_argument("-v", "--verbose", action="store_true", help="print every pass and declined match")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    return p


def _default_output(model: str) -> Path:
    path = Path(model)
    return path.with_name(path.stem + ".opt.onnx")


def _summary(rep: dict, out: Path, verbose: bool) -> str:
    from onnxopt.report import diff_ops

    lines = [f"onnxopt -O{rep['options']['opt_level']} --target {rep['options']['target']}: "
             f"{rep['nodes_before']} -> {rep['nodes_after']} nodes, wrote {out}"]
    changes = diff_ops(rep["ops_before"], rep["ops_after"])
    if changes:
        width = max(len(k) for k, _, _ in changes)
        lines.append("  op" + " " * (width - 2) + "  before  after")
        lines += [f"  {k:<{width}}  {b:>6}  {a:>5}" for k, b, a in changes]
    fired = [f"{p['name']} x{p['fired']}" for p in rep["passes"] if p["fired"]]
    lines.append("  passes fired: " + (", ".join(fired) if fired else "none"))
    if verbose:
        for p in rep["passes"]:
            lines.append(f"  pass {p['name']:<28} fired {p['fired']:>4}  {p['time_s'] * 1000:8.1f} ms  "
                         f"declined {p['declined_count']}")
            lines += [f"      declined {d['rule']} at {d['node']} ({d['op']}): {d['reason']}" for d in p["declined"]]
    lines += _int8_lines(rep)
    ver = rep["verification"]
    if ver.get("enabled"):
        shapes = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in ver["input_shapes"].items())
        if ver.get("lossy"):
            worst = min((o["cosine"] for o in ver["outputs"] if o.get("cosine") is not None), default=float("nan"))
            lines.append(f"  verified (lossy): min output cosine {worst:.6f}, max relative error {ver['max_rel']:.2e} on {shapes}")
        else:
            lines.append(f"  verified: max relative error {ver['max_rel']:.2e} (tolerance {ver['tolerance']:g}) on {shapes}")
    else:
        lines.append("  verification skipped (--no-verify)")
    lines.append(f"  time: {rep['time_s']['total']:.2f} s")
    return "\n".join(lines)


def _int8_figure(metric: str, s: dict) -> str:
    if metric == "top1":
        return (f"top-1 agreement {s['agreement']:.2%} ({s['near_ties']} near-tie(s) apart, predicted "
                f"{s['predicted_agreement']:.2%})")
    if metric == "rel-error":
        return f"max relative error {s['max_rel_error']:.4f}"
    return f"min cosine {s['min_cosine']:.5f}"


def _int8_lines(rep: dict) -> list[str]:
    """The int8 line: what was quantized, where fidelity was decided and measured, and how it came out;
    or why nothing was (never a silent no-op)."""
    if not rep["options"].get("int8"):
        return []
    rec = next((p for p in rep["passes"] if p["name"] == "quantize_int8"), None)
    int8 = (rec or {}).get("details") or {}
    up = rep["options"].get("int8_opset_upgrade")
    upgraded = (f"; opset {up['from']} upgraded to {up['to']} for int8"
                f"{' (verified)' if up['verified'] else ' (not verified: --no-verify)'}") if up else ""
    if "fidelity" not in int8:
        reasons = "; ".join(d["reason"] for d in (rec or {}).get("declined", [])[:3]) or "no quantizable layer"
        return [f"  int8: nothing quantized ({reasons}){upgraded}"]
    fid, samples, metric = int8["fidelity"], int8["samples"], int8["metric"]
    weights = "7-bit weights (reduce range)" if int8["reduce_range"] else "8-bit weights"
    target = f"target {fid['target']:g} with margin: {'met' if fid['ok'] else 'NOT met'}"
    if "not_split" in samples:
        where = samples["not_split"]
        figures = f"{_int8_figure(metric, fid['validation'])} ({target})"
    else:
        where = (f"on {samples['validation']} validation samples held out of the {samples['calibration']} that "
                 f"calibrated")
        figures = (f"validation {_int8_figure(metric, fid['validation'])} ({target}), calibration "
                   f"{_int8_figure(metric, fid['calibration'])}")
    return [f"  int8: {int8['quantized']} of {int8['quantized'] + int8['float']} layers quantized, {weights}{upgraded}",
            f"  int8 {metric}: {figures}; {where}; measured on {int8['fidelity_measured_on']}"]


class _ProgressBars:
    """tqdm bars on stderr for the passes' progress callback, one per stage."""

    def __init__(self) -> None:
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            for other in self.bars.values():
                other.close()
            bar = self.bars[stage] = tqdm(total=total, desc=f"onnxopt: {stage}", unit="run" if total is None else
                                          "sample", file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def run_compile(args) -> int:
    import onnxopt
    from onnxopt import emit, verify

    out = Path(args.output) if args.output else _default_output(args.model)
    if not Path(args.model).exists():
        raise CompileError(f"{args.model}: no such file")
    # Check the output before doing any work: a bad -o should fail fast.
    emit.check_output_path(out, args.model)
    shapes = dict(verify.parse_input_shape(s) for s in args.input_shape)
    start = time.perf_counter()
    bars = _ProgressBars() if not args.quiet and (args.progress or sys.stderr.isatty()) else None
    try:
        result = _compile(onnxopt, args, shapes, bars)
    finally:
        if bars is not None:
            bars.close()
    result.save(out, external_data=True if args.external_data else None)
    result.report["time_s"]["total"] = round(time.perf_counter() - start, 4)
    if args.report:
        _write_json(Path(args.report), result.report)
    if not args.quiet:
        print(_summary(result.report, out, args.verbose))
    return EXIT_OK


def _compile(onnxopt, args, shapes, progress):
    return onnxopt.compile(
        args.model,
        opt_level=args.level,
        target=args.target,
        opset=args.opset,
        enable=args.enable,
        disable=args.disable,
        fold_initializer_inputs=args.fold_initializer_inputs,
        verify_outputs=not args.no_verify,
        input_shapes=shapes,
        tolerance=args.tolerance,
        fp16=args.fp16,
        fp16_io=args.fp16_io,
        int8=args.int8,
        calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples,
        calibration_method=args.calibration_method,
        int8_min_cosine=args.int8_min_cosine,
        int8_reduce_range={"auto": None, "on": True, "off": False}[args.int8_reduce_range],
        int8_metric=args.int8_metric,
        int8_target=args.int8_target,
        progress=progress,
    )


def _write_json(path: Path, data: dict) -> None:
    from onnxopt import emit

    emit.check_output_path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# Subcommands live in onnxopt.bench (the only place the compiler reaches into bench/).
SUBCOMMANDS = {"bench": "bench_main", "compare": "compare_main"}


def _guarded(prog: str, debug: bool, work) -> int:
    """Run `work()`; any failure becomes one line on stderr (a traceback only with --debug)."""
    try:
        return work()
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, CompileError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
        else:  # an onnxopt bug: still one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"{prog}: error: internal error: {type(exc).__name__}: {first} (rerun with --debug)",
                  file=sys.stderr)
        return EXIT_ERROR


def _subcommand(name: str, argv: list[str]) -> int:
    def work():
        from onnxopt.bench import commands

        return getattr(commands, SUBCOMMANDS[name])([a for a in argv if a != "--debug"])

    return _guarded(f"onnxopt {name}", "--debug" in argv, work)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return _guarded("onnxopt", args.debug, lambda: run_compile(args))


if __name__ == "__main__":
    raise SystemExit(main())
