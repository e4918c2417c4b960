"""Start-up (issue 11): `onnxopt --version`, `--help` and usage errors load none of the compiler's
heavy dependencies; a --no-verify compile never loads onnxruntime. (Wall time: bench/experiments/startup_bench.py.)"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("onnx", "onnx_ir", "onnxruntime", "onnxscript", "numpy", "torch", "matplotlib")


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    last = out.strip().splitlines()[-1]
    return set(filter(None, last.removeprefix("loaded:").split(",")))


def test_version_help_and_usage_errors_import_nothing_heavy():
    for argv in (["--version"], ["--help"], ["m.onnx", "-O", "9"]):
        code = f"from onnxopt import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass"
        assert _loaded_after(code) == set(), argv


def test_no_verify_compile_does_not_load_onnxruntime(tmp_path):
    model = tmp_path / "m.onnx"
    code = f"""
import onnx
onnx.save(onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {{ y = Relu(x) }}'''), {str(model)!r})
from onnxopt import cli
assert cli.main([{str(model)!r}, "--no-verify", "-q"]) == 0
"""
    loaded = _loaded_after(code)
    assert "onnx" in loaded and "onnxruntime" not in loaded and "torch" not in loaded
