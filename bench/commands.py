"""`onnxopt bench` and `onnxopt compare`: the command lines (onnxopt.cli dispatches here).

Exit status as for `onnxopt`: 0 ok, 1 error (one line `onnxopt bench: error: ...`, raised as
CompileError and printed by onnxopt.cli), 2 usage. `bench` exits 1 when no measurement ran at all
(every EP skipped), after writing the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnxopt import cli
from onnxopt.errors import CompileError

EXIT_OK, EXIT_USAGE = 0, 2


class _Parser(cli.Parser):
    """The CLI's one-line-usage-error parser, named after the subcommand (`onnxopt bench: error: ...`)."""


def _count(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _eps(text: str) -> list[str]:
    from onnxopt.bench.runner import EPS

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in EPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown execution provider {bad[0] if bad else text!r} "
                                         f"(choose from {', '.join(EPS)})")
    return list(dict.fromkeys(names))


def _variants(text: str) -> list[str]:
    from onnxopt.bench.peers import TOOLS

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in TOOLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown variant {bad[0] if bad else text!r} (choose from {', '.join(TOOLS)})")
    return list(dict.fromkeys(names))


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    from onnxopt import verify

    try:
        return verify.parse_input_shape(text)
    except CompileError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("bad --input-shape ")) from None


def bench_parser() -> argparse.ArgumentParser:
    from onnxopt.bench.runner import OPT_LEVELS

    p = _Parser(prog="onnxopt bench", description="Measure models on onnxruntime execution providers and write a "
                "report (schema: bench/SCHEMA.md).")
    p.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files")
    p.add_argument("--ep", type=_eps, default=["cpu"], metavar="cpu[,cuda,tensorrt,openvino,dml,coreml]",
                   help="execution providers (default cpu); one not in this onnxruntime is recorded as skipped")
    p.add_argument("--warmup", type=_count(0), default=10, metavar="N", help="untimed runs first (default 10)")
    p.add_argument("--iterations", type=_count(1), default=100, metavar="N", help="timed runs (default 100)")
    p.add_argument("--rounds", type=_count(1), default=10, metavar="N",
                   help="timed runs are grouped into N rounds; the spread of the round medians is the noise figure; "
                        "with --peers rounds alternate between variants (default 10)")
    p.add_argument("--threads", type=_count(0), default=0, metavar="N",
                   help="onnxruntime intra-op threads (default 0: onnxruntime's default)")
    p.add_argument("--input-shape", type=_input_shape, action="append", default=[], metavar="NAME:D1,D2,...",
                   help="shape of a dynamic input (repeatable); others: 1 on axis 0, 16 elsewhere")
    p.add_argument("--opt-level", choices=list(OPT_LEVELS), default="all",
                   help="onnxruntime graph optimization level of the measured sessions (default all)")
    p.add_argument("-o", "--output", metavar="REPORT.json", help="write the report here")
    p.add_argument("--label", help="device name in the report (default: CPU or GPU model and cores)")
    p.add_argument("--peers", action="store_true",
                   help="also build variants with onnxopt and its peers and compare them in alternating rounds")
    p.add_argument("--variants", type=_variants, metavar="LIST",
                   help="the variants to build (implies --peers; default: onnxopt-O2, onnxopt-O3, "
                        "ort-transformer-optimizer, onnxsim, onnxslim, ort-quantize-dynamic)")
    p.add_argument("--model-type", choices=["bert", "gpt2", "vit", "bart", "t5", "unet", "clip", "phi"],
                   help="for onnxruntime's transformer optimizer (default: inferred from the graph)")
    p.add_argument("--num-heads", type=_count(1), metavar="N", help="attention heads (default: inferred)")
    p.add_argument("--hidden-size", type=_count(1), metavar="N", help="hidden size (default: inferred)")
    p.add_argument("--compile-repeat", type=_count(1), default=1, metavar="N",
                   help="build each variant N times, report the median compile time and memory (default 1)")
    p.add_argument("--keep-variants", metavar="DIR", help="keep the built variant models in DIR")
    p.add_argument("--markdown", metavar="OUT.md", help="also write the tables as Markdown")
    p.add_argument("--ray", metavar="ADDRESS|auto",
                   help="with --each-node: the Ray cluster to run on (auto: this machine's cluster, or a local "
                        "one); needs onnxopt[ray]")
    p.add_argument("--each-node", action="store_true",
                   help="run the benchmark once on every node of the --ray cluster (one task pinned per node) and "
                        "write one report per node: -o REPORT.json gives REPORT.nodeK-DEVICEID.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table")
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxopt compare", description="Compare bench reports across devices, EPs and variants.")
    p.add_argument("reports", nargs="+", metavar="REPORT.json")
    p.add_argument("--baseline", metavar="NAME",
                   help="a device label, variant or EP to compute speedups against (default: the first "
                        "report's device when there are several devices, else the original variant)")
    p.add_argument("--markdown", metavar="OUT.md", help="write the tables as Markdown")
    p.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML page with tables and plots")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the tables")
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str]):
    try:
        return parser.parse_args(argv), None
    except SystemExit as exc:  # usage error (already printed) or --help
        return None, exc.code if isinstance(exc.code, int) else EXIT_USAGE


def _check_files(reads: list[str], read_role: str, writes: list[tuple[str | None, str]]) -> None:
    """No output may be a file the command reads, or another output (compiler/files.py)."""
    from onnxopt import api
    from onnxopt.files import FileSet

    fs = FileSet()
    for path in reads:
        if read_role == "the input model" and Path(path).is_file():
            fs.reads += api.reads_of(path).reads
        else:
            fs.read(path, read_role)
    for path, role in writes:
        if path is not None:
            fs.write(path, role)
    fs.check()


class _Bar:
    """The runner's progress interface on a tqdm bar (stderr; off when quiet or not a terminal)."""

    def __init__(self, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=0, file=sys.stderr, unit="step", disable=quiet or not sys.stderr.isatty(), leave=False,
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]")

    def add(self, n: int) -> None:
        self.bar.total += n
        self.bar.refresh()

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text[:40])

    def close(self) -> None:
        self.bar.close()


def _summary(report: dict) -> str:
    from onnxopt.bench import compare
    from onnxopt.bench.tables import Table, ms, num

    comp = compare.build([report])
    if report["settings"]["mode"] == "alternating":
        tables = compare.variant_tables(comp)
    else:
        rows = []
        for r in report["results"]:
            lat, mem = r["latency_ms"], r["memory"] or {}
            if lat is None:
                continue
            rows.append([r["model"], r["ep"], ms(lat["p50"]), ms(lat["p90"]), ms(lat["p99"]),
                         f"{ms(lat['mean'])} ± {ms(lat['stdev'])}", num(lat["noise_pct"]),
                         num(r["throughput"]["inferences_per_s"]), num(r["session_load_s"], "{:.3f}"),
                         num(mem.get("host_peak_delta_mb"), "{:.0f}")])
        tables = [Table("", ["model", "EP", "p50 ms", "p90 ms", "p99 ms", "mean ± sd", "noise %", "inf/s",
                             "load s", "host MB"], rows, right=set(range(2, 10)))] if rows else []
    s = report["settings"]
    head = (f"onnxopt bench on {report['label']}: onnxruntime {report['onnxruntime_version']}, "
            f"{s['threads'] or 'default'} threads, {s['graph_optimization_level']} optimizations, "
            f"{s['warmup']} warmup + {s['iterations']} timed runs in {s['rounds']} rounds ({s['mode']})")
    lines = [head] + [t.text() for t in tables]
    lines += [f"  {ln}" for ln in compare.problems(comp)]
    return "\n".join(lines)


def bench_main(argv: list[str]) -> int:
    from onnxopt.bench import compare, runner, schema

    args, code = _parse(bench_parser(), argv)
    if args is None:
        return code
    _check_files(args.models, "the input model", [(args.output, "the report"), (args.markdown, "the Markdown")])
    hints = {k: v for k, v in (("model_type", args.model_type), ("num_heads", args.num_heads),
                                ("hidden_size", args.hidden_size)) if v is not None}
    peers = None
    if args.peers or args.variants:
        from onnxopt.bench.peers import DEFAULT_PEERS

        peers = tuple(args.variants or DEFAULT_PEERS)
    keep = None
    if args.keep_variants:
        keep = Path(args.keep_variants)
        keep.mkdir(parents=True, exist_ok=True)
    settings = runner.Settings(
        warmup=args.warmup, iterations=args.iterations, rounds=args.rounds, threads=args.threads,
        opt_level=args.opt_level, input_shapes=dict(args.input_shape), label=args.label, peers=peers,
        hints=hints, compile_repeat=args.compile_repeat, keep_dir=keep, argv=["onnxopt", "bench", *argv],
    )
    if args.each_node or args.ray is not None:
        return _each_node(args, settings)
    bar = _Bar(args.quiet)
    try:
        report = runner.run(args.models, args.ep, settings, bar)
    except KeyboardInterrupt:
        raise CompileError("interrupted") from None
    finally:
        bar.close()
    if args.output:
        schema.save(report, args.output)
    if args.markdown:
        schema.write_text(args.markdown, compare.markdown(compare.build([report])))
    if not args.quiet:
        print(_summary(report))
        if args.output:
            print(f"wrote {args.output}")
    ran = [r for r in report["results"] if r["status"] == "ok"]
    if not ran:
        first = report["results"][0] if report["results"] else None
        why = f" ({first['ep']}: {first['reason']})" if first else ""
        raise CompileError(f"no measurement ran{why}")
    return EXIT_OK


def _on_node(models: list[tuple[str, bytes]], eps: list[str], settings) -> dict:
    """The benchmark on the node this Ray task is pinned to: the models written to a temporary folder
    under their own file names, measured there; the report carries that node's device fingerprint."""
    import tempfile

    from onnxopt.bench import runner

    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-node-") as tmp:
        paths = []
        for k, (name, data) in enumerate(models):
            folder = Path(tmp, str(k))
            folder.mkdir()
            (folder / name).write_bytes(data)
            paths.append(str(folder / name))
        return runner.run(paths, eps, settings, None)


def node_report_path(output: str, k: int, device_id: str) -> Path:
    out = Path(output)
    return out.with_name(f"{out.name.removesuffix('.json')}.node{k}-{device_id}.json")


def _each_node(args, settings) -> int:
    """`bench --ray ADDRESS --each-node`: one report per node of the cluster (onnxopt.scaleout.each_node)."""
    from onnxopt import scaleout
    from onnxopt.bench import compare, schema

    if not (args.each_node and args.ray is not None):
        raise CompileError("--each-node needs --ray ADDRESS|auto" if args.each_node else
                           "--ray runs the benchmark on every node of the cluster: give --each-node too")
    if args.peers or args.variants or args.keep_variants or args.markdown:
        raise CompileError("--each-node measures the given models only (no --peers, --variants, --keep-variants or "
                           "--markdown): compare the node reports with `onnxopt compare`")
    from onnxopt.bench.runner import model_names

    if args.output:  # the folder and the name, before any work (the node count is known only later)
        _check_files(args.models, "the input model", [(str(node_report_path(args.output, 0, "id")), "a node's report")])
    models = [(f"{name}.onnx", Path(path).read_bytes()) for path, name in zip(args.models, model_names(args.models))]
    started = scaleout.connect(args.ray)
    try:
        try:
            reports = [rep for _, rep in scaleout.each_node(_on_node, models, args.ep, settings)]
        except KeyboardInterrupt:
            raise CompileError("interrupted") from None
    finally:
        scaleout.disconnect(started)
    # Nodes of identical hardware share a fingerprint: their labels say which node is which.
    ids = [r["device"]["id"] for r in reports]
    for k, rep in enumerate(reports):
        if settings.label is None and ids.count(rep["device"]["id"]) > 1:
            rep["label"] = f"{rep['label']} (node {k})"
    paths = [node_report_path(args.output, k, rep["device"]["id"]) for k, rep in enumerate(reports)] \
        if args.output else []
    _check_files(args.models, "the input model", [(str(p), "a node's report") for p in paths])
    if paths:  # all the node reports or none (compiler/files.py)
        from onnxopt.files import commit, remove_staging, staging_dir

        folder = staging_dir(paths[0])
        try:
            commit([(schema.save(rep, folder / path.name), path) for rep, path in zip(reports, paths)])
        finally:
            remove_staging([folder])
    if not args.quiet:
        if len(reports) > 1:
            print(compare.markdown(compare.build(reports)))
        else:
            print(_summary(reports[0]))
        for path in paths:
            print(f"wrote {path}")
    if not any(r["status"] == "ok" for rep in reports for r in rep["results"]):
        raise CompileError("no measurement ran on any node")
    return EXIT_OK


def compare_main(argv: list[str]) -> int:
    from onnxopt.bench import compare, plots, schema

    args, code = _parse(compare_parser(), argv)
    if args is None:
        return code
    _check_files(args.reports, "the report", [(args.markdown, "the Markdown"), (args.html, "the HTML page")])
    reports = [schema.load(path) for path in args.reports]
    comp = compare.build(reports, args.baseline)
    md = compare.markdown(comp)
    if args.markdown:
        schema.write_text(args.markdown, md)
    if args.html:
        schema.write_text(args.html, compare.html_page(comp, plots.figures(comp)))
    if not args.quiet:
        print(md)
        for path in (args.markdown, args.html):
            if path:
                print(f"wrote {path}")
    return EXIT_OK
