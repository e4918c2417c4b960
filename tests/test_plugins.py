"""Plugin passes (passes/plugins.py): a real package installed with pip, found through its entry
point, runs in the pipeline with the same verification and report; a plugin that breaks the outputs
is caught by verification, which names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

DEMO = Path(__file__).parent / "plugin_demo"
MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2, 4] x) => (float[2, 4] y) {
    a = Neg(x)
    b = Neg(a)
    y = Relu(b)
}
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The demo package installed with pip into a folder of its own (put on PYTHONPATH)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(DEMO)], check=True, capture_output=True)
    return target


def _env(extra: Path | None) -> dict:
    env = dict(os.environ)
    if extra is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra), env.get("PYTHONPATH", "")])
    return env


def _model(tmp_path: Path) -> Path:
    onnx.save(onnx.parser.parse_model(MODEL), str(tmp_path / "m.onnx"))
    return tmp_path / "m.onnx"


def test_installed_plugin_fires_is_verified_and_reported(tmp_path, plugin_path):
    model = _model(tmp_path)
    listing = subprocess.run([sys.executable, "-m", "onnxopt", "--list-passes"], capture_output=True, text=True,
                             env=_env(plugin_path), check=True).stdout
    assert "| `demo_double_neg` | -O1 | cleanup |" in listing
    proc = subprocess.run([sys.executable, "-m", "onnxopt", str(model), "-O1", "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=_env(plugin_path))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    record = next(p for p in report["passes"] if p["name"] == "demo_double_neg")
    assert record["fired"] == 1 and record["stage"] == "cleanup"
    assert "Neg" not in report["ops_after"] and report["verification"]["ok"]


def test_plugin_is_absent_without_the_package(tmp_path):
    listing = subprocess.run([sys.executable, "-m", "onnxopt", "--list-passes"], capture_output=True, text=True,
                             check=True).stdout
    assert "demo_double_neg" not in listing


def test_plugin_that_breaks_outputs_is_named_by_verification(tmp_path):
    """A plugin from the user's own script (over onnx_ir) that turns Relu into Neg."""
    model = _model(tmp_path)
    script = tmp_path / "deploy.py"
    script.write_text(textwrap.dedent(f"""
        import onnxopt
        from onnxopt.passes.plugins import plugin_pass

        @plugin_pass("breaks_relu", level=2, over="onnx_ir")
        def breaks_relu(model):
            nodes = [n for n in model.graph if n.op_type == "Relu"]
            for n in nodes:
                n.op_type = "Neg"
            return len(nodes)

        try:
            onnxopt.compile({str(model)!r}, opt_level=2)
        except onnxopt.CompileError as exc:
            print(exc)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert out.startswith("verification failed: output 'y'") and "breaks_relu" in out, out


def test_broken_plugin_package_is_one_clear_line(tmp_path):
    """An installed plugin that fails to import refuses the compile with a line naming it."""
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[onnxopt.passes]\nbroken = no_such_module_here\n")
    proc = subprocess.run([sys.executable, "-m", "onnxopt", str(_model(tmp_path))], capture_output=True,
                          text=True, env=_env(site))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "plugin pass package 'broken = no_such_module_here'" in lines[0], proc.stderr


def test_readme_pass_table_is_list_passes():
    """One source of truth: the README's pass table is exactly what `onnxopt --list-passes` prints."""
    from onnxopt import cli

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("<!-- passes:begin -->\n", 1)[1].split("\n<!-- passes:end -->", 1)[0]
    assert table == cli.pass_table()
