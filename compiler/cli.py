"""The command line: `onnxopt MODEL [-O{0,1,2,3}] [-o OUT] ...`.

Exit status: 0 ok, 1 error (bad model, failed verification), 2 usage, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM); nothing is written then. Errors are one line on stderr,
`onnxopt: error: ...`; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

from onnxopt import __version__, options
from onnxopt.errors import CompileError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
# Interrupted by a signal: 128 + its number, as shells report it.
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + 2, 128 + 15


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (`PROG: error: ...`) and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="onnxopt",
        description="Optimize an ONNX model and verify the result against the original.",
        epilog="Also: `onnxopt bench MODEL ...` (latency reports on onnxruntime EPs) and "
               "`onnxopt compare R1.json R2.json ...` (tables and plots across devices); `--help` on each.",
    )
    p.add_argument("model", nargs="?", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", help="output file (default: <stem>.opt.onnx beside the input)")
    p.add_argument("--report", metavar="OUT.json", help="write the compile report as JSON")
    p.add_argument("--report-html", metavar="OUT.html",
                   help="write the compile report as one self-contained HTML page (per-layer charts for lossy passes)")
    p.add_argument("--external-data", action="store_true", help="store weights in OUT.data beside the model")
    # Every compile option, from its one definition (onnxopt.options).
    options.add_arguments(p)
    p.add_argument("--progress", action="store_true",
                   help="progress bars on stderr for int8 calibration and fidelity control even when stderr is "
                        "not a terminal (they are drawn on a terminal anyway; never with -q)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every pass and declined match")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--list-passes", action="store_true",
                   help="print every pass (built-in and plugin) with its level, stage and targets, and exit")
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
        if ver.get("input_source") == "input_data":
            lines.append("  verification inputs: --input-data")
        elif ver.get("shapes_tried"):
            failed = "; ".join(", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in t.items()) for t in ver["shapes_tried"])
            lines.append(f"  verification inputs: the first sizes the original runs on (it failed on {failed})")
        within = [o for o in ver["outputs"] if "rounding noise" in (o.get("note") or "")]
        lines += [f"  output {o['name']}: {o['note']}" for o in within]
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
    from onnxopt import api, emit, sessions

    out = Path(args.output) if args.output else _default_output(args.model)
    if not Path(args.model).exists():
        raise CompileError(f"{args.model}: no such file")
    external = True if args.external_data else None
    # Every file this compile reads and writes, checked before any work (compiler/files.py).
    plan = api.reads_of(args.model, args.calibration_data, args.input_data)
    plan.writes = emit.output_files(out, external).writes
    if args.report:
        plan.write(args.report, "the report")
    if args.report_html:
        plan.write(args.report_html, "the HTML report")
    plan.check()
    opts = options.from_args(args)
    sessions.quiet_native_logs(not (args.debug or args.verbose))
    start = time.perf_counter()
    bars = _ProgressBars() if not args.quiet and (args.progress or sys.stderr.isatty()) else None
    try:
        result = onnxopt.compile(args.model, options=dataclasses.replace(opts, progress=bars))
    finally:
        if bars is not None:
            bars.close()
    result.report["time_s"]["total"] = round(time.perf_counter() - start, 4)
    reports = {}
    if args.report:
        reports[Path(args.report)] = json.dumps(result.report, indent=2, sort_keys=False) + "\n"
    if args.report_html:
        from onnxopt import html_report

        reports[Path(args.report_html)] = html_report.render(result.report)
    _write_outputs(result, out, external, reports)
    if not args.quiet:
        print(_summary(result.report, out, args.verbose))
    return EXIT_OK


def _write_outputs(result, out: Path, external_data: bool | None, reports: dict[Path, str]) -> None:
    """The model (with its external data) and the reports (path -> text), written all or none."""
    from onnxopt import emit, files

    if external_data is None:
        external_data = emit.weights_nbytes(result.ir_model) > emit.EXTERNAL_DATA_THRESHOLD
    staging: list[Path] = []
    try:
        folder, moves = emit.stage(result.ir_model, out, external_data=external_data)
        staging.append(folder)
        for report, text in reports.items():
            folder = files.staging_dir(report)
            staging.append(folder)
            staged = folder / report.name
            staged.write_text(text)
            moves.append((staged, report))
        files.commit(moves)
    except OSError as exc:
        raise CompileError(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None
    finally:
        files.remove_staging(staging)


# Subcommands live in onnxopt.bench (the only place the compiler reaches into bench/).
SUBCOMMANDS = {"bench": "bench_main", "compare": "compare_main"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, CI runners and orchestrators send), handled like Ctrl-C: the
    exception unwinds through every `finally`, so staging folders are removed and nothing is left."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _guarded(prog: str, debug: bool, work) -> int:
    """Run `work()`; any failure becomes one line on stderr (a traceback only with --debug)."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return work()
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"{prog}: error: {'terminated (SIGTERM)' if terminated else 'interrupted'}; nothing was written",
              file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, CompileError):
            hint = " (rerun with --debug)" if str(exc).startswith("internal error") else ""
            print(f"{prog}: error: {exc}{hint}", file=sys.stderr)
        else:  # an onnxopt bug: still one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"{prog}: error: internal error: {type(exc).__name__}: {first} (rerun with --debug)",
                  file=sys.stderr)
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    if args.list_passes:
        return _guarded("onnxopt", args.debug, lambda: print(pass_table()) or EXIT_OK)
    if args.model is None:
        build_parser().error("the following arguments are required: model")
    return _guarded("onnxopt", args.debug, lambda: run_compile(args))


def pass_table() -> str:
    """Every registered pass as a Markdown table, in pipeline order (the README's pass table)."""
    from onnxopt.passes import all_passes

    rows = ["| pass | runs at | stage | targets | what it does |", "|---|---|---|---|---|"]
    for info in all_passes():
        when = f"--{info.flag}" if info.flag else f"-O{info.level}"
        targets = "all" if len(info.targets) == 4 else ", ".join(sorted(info.targets))
        rows.append(f"| `{info.name}` | {when} | {info.stage} | {targets} | {info.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
