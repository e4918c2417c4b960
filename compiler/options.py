"""Compile options, stated once: `CompileOptions` is the one place an option's name, default, type
check, command-line spelling and help live. The CLI's arguments (`add_arguments`, `from_args`),
`onnxopt.compile()`'s keywords (`from_keywords`), the dict the passes' `configure()` receives
(`for_passes`) and `report["options"]` (`for_report`) are all derived from it, so adding an option
(a lossy flag, say) is one field here plus the pass that reads it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

from onnxopt.errors import CompileError
from onnxopt.kernels.catalogue import TARGETS

LEVELS = (0, 1, 2, 3)
CALIBRATION_METHODS = ("entropy", "minmax", "percentile")
INT8_METRICS = ("cosine", "top1", "rel-error")


# -- value checks (a wrong value is a CompileError naming the option, never a TypeError later) ----
def _is_int(x) -> bool:
    import numpy as np

    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    import math

    import numpy as np

    return (_is_int(x) or isinstance(x, (float, np.floating))) and math.isfinite(float(x))


def _is_names(x) -> bool:
    return not isinstance(x, (str, bytes)) and isinstance(x, Iterable) and all(isinstance(n, str) for n in x)


def _is_shapes(x) -> bool:
    return isinstance(x, dict) and all(
        isinstance(k, str) and isinstance(v, (tuple, list)) and all(_is_int(d) and d > 0 for d in v)
        for k, v in x.items())


def _is_bool(x) -> bool:
    return isinstance(x, bool)


def _same(value):
    return value


@dataclasses.dataclass(frozen=True)
class Cli:
    """How an option is spelled on the command line: argparse flags and keywords, and the
    conversion of the parsed value to the option's value."""

    flags: tuple[str, ...]
    kwargs: dict
    convert: Callable = _same


def option(default, check: Callable, what: str, cli: Cli | None = None, *, report: bool = True,
           message: str | None = None):
    """A field of CompileOptions: `check(value)` must hold (else `message`, or "option NAME=VALUE is
    not valid: it must be WHAT"); `cli` its command-line spelling; `report` whether it goes in
    report["options"]."""
    return dataclasses.field(default=default, metadata={"check": check, "what": what, "cli": cli, "report": report,
                                                         "message": message})


def _shapes_from_cli(specs: list[str]) -> dict | None:
    from onnxopt.verify import parse_input_shape

    return dict(parse_input_shape(s) for s in specs) if specs else None


def _tristate(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Everything a compile can be told. Defaults are the CLI's and the library's."""

    opt_level: int = option(2, lambda x: _is_int(x) and x in LEVELS, "an optimization level: one of 0, 1, 2, 3",
                            Cli(("-O",), dict(type=int, choices=list(LEVELS), metavar="{0,1,2,3}",
                                              help="optimization level (default 2): 0 canonicalize, 1 exact cleanups, "
                                                   "2 portable fusions, 3 target fused kernels")),
                            message="optimization level must be one of 0, 1, 2, 3 (got {value!r})")
    target: str = option("cpu", lambda x: isinstance(x, str) and x in TARGETS, f"one of {', '.join(TARGETS)}",
                         Cli(("--target",), dict(choices=list(TARGETS),
                                                 help="execution target for -O3 fused kernels (default cpu)")),
                         message=f"unknown target {{value!r}} (choose from {', '.join(TARGETS)})")
    opset: int | None = option(None, lambda x: x is None or (_is_int(x) and x >= 1), "None or an opset number",
                               Cli(("--opset",), dict(type=int, help="upgrade the model to this ai.onnx opset first")))
    enable: tuple[str, ...] = option((), _is_names, "a list of pass names",
                                     Cli(("--enable",), dict(action="append", default=[], metavar="PASS",
                                                             help="run this pass too"), tuple))
    disable: tuple[str, ...] = option((), _is_names, "a list of pass names",
                                      Cli(("--disable",), dict(action="append", default=[], metavar="PASS",
                                                               help="do not run this pass"), tuple))
    fold_initializer_inputs: bool = option(
        False, _is_bool, "True or False",
        Cli(("--fold-initializer-inputs",), dict(action="store_true", help="treat initializers that are also graph "
                                                 "inputs as constants (changes the interface)")))
    verify_outputs: bool = option(
        True, _is_bool, "True or False",
        Cli(("--no-verify",), dict(action="store_true", help="skip running original and result in onnxruntime"),
            lambda no: not no))
    input_shapes: dict | None = option(
        None, lambda x: x is None or _is_shapes(x), "a dict of input name to a tuple of positive ints",
        Cli(("--input-shape",), dict(action="append", default=[], metavar="NAME:D1,D2,...",
                                     help="concrete shape for a dynamic input during verification (repeatable)"),
            _shapes_from_cli), report=False)
    input_data: object = option(
        None, lambda x: x is None or isinstance(x, (str, os.PathLike, dict)), "None, an .npz path or a feed dict",
        Cli(("--input-data",), dict(metavar="FILE.npz", help="verify on your own sample: one array per model input "
                                    "(instead of synthesized inputs)")), report=False)
    tolerance: float = option(1e-4, lambda x: _is_real(x) and x >= 0, "a finite number >= 0",
                              Cli(("--tolerance",), dict(type=float, help="verification tolerance, relative to each "
                                                         "output's magnitude (default 1e-4)")))
    inference_dropout: bool = option(
        False, _is_bool, "True or False",
        Cli(("--inference-dropout",), dict(action="store_true", help="turn training-mode Dropout into inference "
                                           "Dropout (changes the model; recorded in the report)")))
    fp16: bool = option(False, _is_bool, "True or False",
                        Cli(("--fp16",), dict(action="store_true", help="float16 weights and compute, with fp32 "
                                              "islands where needed")))
    fp16_io: bool = option(False, _is_bool, "True or False",
                           Cli(("--fp16-io",), dict(action="store_true", help="with --fp16: float16 graph inputs and "
                                                    "outputs too")))
    int8: bool = option(False, _is_bool, "True or False",
                        Cli(("--int8",), dict(action="store_true", help="int8 quantization (QDQ) after fusion; needs "
                                              "--calibration-data")))
    calibration_data: object = option(
        None, lambda x: True, "a path or an iterable of feed dicts",
        Cli(("--calibration-data",), dict(metavar="PATH", help=".npz with one array per model input (first axis = "
                                          "samples), or a folder of .npz/.npy")), report=False)
    calibration_samples: int | None = option(
        None, lambda x: x is None or (_is_int(x) and x >= 1), "None or a whole number >= 1",
        Cli(("--calibration-samples",), dict(type=int, metavar="N", help="use at most N calibration samples")))
    # Checked by the int8 pass itself, whose message lists the methods.
    calibration_method: str = option(
        "entropy", lambda x: True, "a method name",
        Cli(("--calibration-method",), dict(choices=list(CALIBRATION_METHODS), help="activation range method "
                                            "(default entropy: minimum KL divergence)")))
    int8_min_cosine: float = option(
        0.99, lambda x: _is_real(x) and -1 <= x <= 1, "a number from -1 to 1",
        Cli(("--int8-min-cosine",), dict(type=float, help="cosine target (default 0.99): the worst layers stay float "
                                         "until the validation part of the calibration data reaches it, with a "
                                         "margin (see the README)")))
    # Values are checked by the int8 pass itself, whose messages name the flag (as calibration_method).
    int8_metric: str = option(
        "cosine", lambda x: isinstance(x, str), "a metric name",
        Cli(("--int8-metric",), dict(choices=list(INT8_METRICS), help="what the int8 fidelity control enforces on "
                                     "held-out samples (default cosine: every output's cosine; top1: a classifier's "
                                     "argmax agreement; rel-error: relative error)")))
    int8_target: float | None = option(
        None, lambda x: x is None or _is_real(x), "None or a number",
        Cli(("--int8-target",), dict(type=float, metavar="T", help="target of --int8-metric (default: "
                                     "--int8-min-cosine for cosine, 0.98 agreement for top1, 0.1 for rel-error)")))
    # progress(stage, done, total), called as calibration and the fidelity control advance (the CLI
    # draws bars from it); not a result-deciding option, so not in the report.
    progress: object = option(None, lambda x: x is None or callable(x), "None or a callable", report=False)
    int8_reduce_range: bool | None = option(
        None, lambda x: x is None or isinstance(x, bool), "None, True or False",
        Cli(("--int8-reduce-range",), dict(choices=["auto", "on", "off"], default="auto",
                                           help="7-bit weights, needed where u8 x s8 kernels saturate (x86 without "
                                                "VNNI); auto: decided by this machine for --target cpu"), _tristate))
    prune: float | None = option(
        None, lambda x: x is None or (_is_real(x) and 0.0 < float(x) < 1.0), "a fraction",
        Cli(("--prune",), dict(type=float, metavar="F", help="structured pruning: remove the fraction F (0 < F < 1) "
                               "of the prunable MACs (channels, FFN neurons, attention heads), reconstructed on "
                               "--calibration-data")),
        message="--prune must be a fraction of the MACs strictly between 0 and 1 (got {value!r})")
    prune_round: int = option(
        8, lambda x: _is_int(x) and x >= 1, "a positive integer",
        Cli(("--prune-round",), dict(type=int, metavar="N", help="keep channel counts at multiples of N (default 8)")),
        message="--prune-round must be a positive integer (got {value!r})")
    prune_min_cosine: float | None = option(
        None, lambda x: x is None or (_is_real(x) and -1.0 <= float(x) <= 1.0), "a number from -1 to 1",
        Cli(("--prune-min-cosine",), dict(type=float, metavar="C", help="fidelity target on held-out calibration "
                                          "samples: prune less until it holds")),
        message="--prune-min-cosine must be in [-1, 1] (got {value!r})")
    # Where calibration statistics are computed (onnxopt.scaleout): the output is the same to the bit
    # whatever these say, so they are not in the report.
    workers: int = option(
        1, lambda x: _is_int(x) and x >= 1, "a whole number >= 1",
        Cli(("--workers",), dict(type=int, metavar="N", help="calibration statistics in N local worker processes "
                                 "(default 1: this process); with --ray, the Ray tasks in flight")),
        report=False, message="--workers must be a whole number >= 1 (got {value!r})")
    ray: str | None = option(
        None, lambda x: x is None or (isinstance(x, str) and x.strip() != ""), "None or a Ray address",
        Cli(("--ray",), dict(metavar="ADDRESS|auto", help="calibration statistics as Ray tasks on the cluster at "
                             "ADDRESS (auto: this machine's cluster, or a local one); needs onnxopt[ray]")),
        report=False)
    threads: int | None = option(
        None, lambda x: x is None or (_is_int(x) and x >= 1), "None or a whole number >= 1",
        Cli(("--threads",), dict(type=int, metavar="N", help="onnxruntime intra-op threads of each calibration "
                                 "worker (default: cores / workers; 1 with --ray)")),
        report=False, message="--threads must be a whole number >= 1 (got {value!r})")
    base_dir: object = option(None, lambda x: x is None or isinstance(x, (str, os.PathLike)), "None or a folder path",
                              report=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata["check"](value):
                template = f.metadata["message"] or "option {name}={value!r} is not valid: it must be {what}"
                raise CompileError(template.format(name=f.name, value=value, what=f.metadata["what"]))
        for name in ("enable", "disable"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    # -- derived forms ---------------------------------------------------------------------------
    @classmethod
    def from_keywords(cls, **keywords) -> CompileOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise CompileError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**keywords)

    def for_passes(self) -> dict:
        """What a pass's `configure()` receives (passes do not import the compiler)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def for_report(self) -> dict:
        """report["options"]: the options that decide the output; int8's only when int8 ran."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.metadata["report"]:
                continue
            value = getattr(self, f.name)
            # Options of a lossy pass are reported only when it ran.
            if ((f.name.startswith("int8_") and not self.int8)
                    or (f.name.startswith("calibration_") and not (self.int8 or self.prune is not None))
                    or (f.name.startswith("prune_") and self.prune is None)):
                value = None
            out["verify" if f.name == "verify_outputs" else f.name] = sorted(value) if isinstance(value, tuple) else value
        return out


def add_arguments(parser) -> None:
    """The command-line arguments of every option that has a spelling there."""
    for f in dataclasses.fields(CompileOptions):
        cli = f.metadata["cli"]
        if cli is not None:
            kwargs = dict(cli.kwargs)
            kwargs.setdefault("default", False if kwargs.get("action") == "store_true" else f.default)
            parser.add_argument(*cli.flags, dest=f.name, **kwargs)


def from_args(args) -> CompileOptions:
    """The options an argparse namespace (from a parser given add_arguments) asks for."""
    values = {}
    for f in dataclasses.fields(CompileOptions):
        cli = f.metadata["cli"]
        if cli is not None:
            values[f.name] = cli.convert(getattr(args, f.name))
    return CompileOptions(**values)
