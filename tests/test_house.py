"""House rules that keep the code easy to live in (issue 12): the import direction, no pass importing
another pass, and every pass reporting its declines under its own name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import onnxopt
from oracle import declined, parse
from test_expected_graphs import LN_BODY, LN_INITS, SIG_24, _model

ROOT = Path(__file__).parent.parent
# package folder -> the onnxopt subpackages it may import
ALLOWED = {
    "kernels": {"kernels"},
    "passes": {"kernels", "passes"},
    "compiler": {"kernels", "passes", "compiler"},
    "bench": {"kernels", "passes", "compiler", "bench"},
}
SUBPACKAGE = {"onnxopt.kernels": "kernels", "onnxopt.passes": "passes", "onnxopt.bench": "bench"}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported onnxopt module, line) for every import in the file, including lazy ones."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("onnxopt")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnxopt") and node.level == 0:
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


def _package(module: str) -> str:
    for prefix, folder in SUBPACKAGE.items():
        if module == prefix or module.startswith(prefix + "."):
            return folder
    return "compiler"  # onnxopt itself and onnxopt.<module> live in compiler/


def test_imports_go_one_way():
    """kernels <- passes <- compiler <- bench; the only way into bench/ from the compiler is the
    CLI's `bench`/`compare` subcommands."""
    wrong = []
    for folder, allowed in ALLOWED.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, line in _imports(path):
                target = _package(module)
                if target in allowed:
                    continue
                if path == ROOT / "compiler" / "cli.py" and module == "onnxopt.bench.commands":
                    continue
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_every_experiment_imports():
    """The experiments are run by hand, not by the suite: at least they must import (one moved module
    once broke prune_bench unnoticed)."""
    import importlib
    import pkgutil

    import onnxopt.bench.experiments as experiments

    for mod in pkgutil.iter_modules(experiments.__path__):
        importlib.import_module(f"onnxopt.bench.experiments.{mod.name}")


def test_no_pass_imports_another_pass():
    """Shared code lives in passes/_lib (or a pass's own package), never in another pass's module."""
    from onnxopt.passes import all_passes

    pass_modules = {info.factory.__module__ for info in all_passes()} - {"onnxopt.passes.plugins"}
    wrong = []
    for module in sorted(pass_modules):
        path = ROOT / "passes" / (module.removeprefix("onnxopt.passes.").replace(".", "/") + ".py")
        if not path.exists():
            path = path.with_suffix("") / "__init__.py"
        own_package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
        for imported, line in _imports(path):
            other = next((m for m in pass_modules if imported == m or imported.startswith(m + ".")), None)
            if other is not None and other != module and not other.startswith(own_package + "."):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the pass module {other}")
    assert not wrong, "\n".join(wrong)


# A LayerNorm with a negative epsilon (test_expected_graphs' LayerNorm otherwise) and a GELU whose 0.5 is 0.6: each pass declines them, under its name.
BAD_NORM = _model(LN_BODY, opset=14, sig=SIG_24, inits=f"{LN_INITS}, float two = {{2.0}}, float eps = {{-1e-5}}")
BAD_GELU = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2, 4] x) => (float[2, 4] y) <float sq = {1.4142135}, float one = {1.0}, float half = {0.6}> {
    d = Div(x, sq)
    e = Erf(d)
    a = Add(e, one)
    m = Mul(x, a)
    y = Mul(m, half)
}
"""


@pytest.mark.parametrize("text, name, options", [
    (BAD_NORM, "layernorm_ort", {"target": "cuda"}),
    (BAD_GELU, "gelu_ort", {}),
])
def test_passes_decline_under_their_own_names(text, name, options):
    report = onnxopt.compile(parse(text), opt_level=3, verify_outputs=False, **options).report
    assert declined(report, name), f"{name} declined nothing: {report['passes']}"
    record = next(p for p in report["passes"] if p["name"] == name)
    assert {d["rule"] for d in record["declined"]} == {name}


def test_options_are_stated_once():
    """The CLI's defaults are CompileOptions' defaults, every option with a spelling is an argument,
    and compile() refuses a keyword that is not an option."""
    import dataclasses

    from onnxopt import cli
    from onnxopt.options import CompileOptions, from_args

    parser = cli.build_parser()
    assert from_args(parser.parse_args(["m.onnx"])) == CompileOptions()
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(CompileOptions) if f.metadata["cli"]} <= dests
    assert from_args(parser.parse_args(["m.onnx", "--no-verify", "--input-shape", "x:1,8", "--int8-reduce-range",
                                        "off", "-O3"])) == CompileOptions(verify_outputs=False, input_shapes={"x": (1, 8)},
                                                                          int8_reduce_range=False, opt_level=3)
    with pytest.raises(onnxopt.CompileError, match="unknown option 'tolerence'"):
        onnxopt.compile(parse(BAD_GELU), tolerence=1e-3)


def test_the_checkout_root_on_sys_path_does_not_shadow_the_kernels_distribution():
    """`python -m ...` from the checkout puts its root on sys.path, where kernels/ would shadow the
    `kernels` distribution that transformers imports when it is installed (transformers >= 5.25
    requires it): a top-level `import kernels` must give that distribution, or ModuleNotFoundError."""
    import importlib.metadata
    import subprocess
    import sys

    code = ("import kernels, onnxopt.kernels.catalogue as c\n"
            "print(kernels.__file__)\nprint(c.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert run.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in run.stderr, run.stderr
        return
    assert run.returncode == 0, run.stderr
    top, ours = run.stdout.split()
    assert Path(top).parent != ROOT / "kernels" and Path(ours).parent == ROOT / "kernels"
