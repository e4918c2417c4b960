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
                   help="fidelity target: keep the worst layers in float until every output reaches this cosine")
    p.add_argument("--int8-reduce-range", choices=["auto", "on", "off"], default="auto",
                   help="7-bit weights, needed where u8 x s8 kernels saturate (x86 without VNNI); "
                        "auto: decided by this machine for --target cpu")
    p.add_argument("--prune", type=float, metavar="F",
                   help="structured pruning: remove the fraction F (0 < F < 1) of the prunable MACs "
                        "(channels, FFN neurons, attention heads), reconstructed on --calibration-data")
    p.add_argument("--prune-round", type=int, default=8, metavar="N",
                   help="keep channel counts at multiples of N (default 8)")
    p.add_argument("--prune-min-cosine", type=float, metavar="C",
                   help="fidelity target on held-out calibration samples: prune less until it holds")
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
    int8 = next((p.get("details") for p in rep["passes"] if p["name"] == "quantize_int8" and p.get("details")), None)
    if int8 and "fidelity" in int8:
        fid = int8["fidelity"]
        weights = "7-bit weights (reduce range)" if int8["reduce_range"] else "8-bit weights"
        lines.append(f"  int8: {int8['quantized']} of {int8['quantized'] + int8['float']} layers quantized, {weights}; "
                     f"held-out min cosine {fid['held_out_min_cosine']:.5f} on {fid['held_out_samples']} samples, "
                     f"measured on {int8['fidelity_measured_on']}")
    prune = next((p.get("details") for p in rep["passes"] if p["name"] == "prune" and p.get("details")), None)
    if prune:
        lines.append("  " + _prune_line(prune))
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


def _prune_line(d: dict) -> str:
    if "fidelity" not in d:
        return f"prune: nothing removed ({d.get('result', 'no group was worth its cost')})"
    units = ", ".join(f"{k} {v['kept']}/{v['total']}" for k, v in d["units"].items())
    fid = d["fidelity"]
    return (f"prune: {d['macs_removed_fraction']:.0%} of prunable MACs removed ({units} kept), "
            f"held-out min cosine {fid['held_out_min_cosine']:.4f} (mean {fid['held_out_mean_cosine']:.4f}) "
            f"on {fid['held_out_samples']} samples")


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
    result = onnxopt.compile(
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
        prune=args.prune,
        prune_round=args.prune_round,
        prune_min_cosine=args.prune_min_cosine,
    )
    result.save(out, external_data=True if args.external_data else None)
    result.report["time_s"]["total"] = round(time.perf_counter() - start, 4)
    if args.report:
        _write_json(Path(args.report), result.report)
    if not args.quiet:
        print(_summary(result.report, out, args.verbose))
    return EXIT_OK


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
