"""onnxopt: a verifying graph-level optimizing compiler for ONNX models.

    import onnxopt
    result = onnxopt.compile("model.onnx", opt_level=3, target="cpu")
    result.save("model.opt.onnx")
    result.report   # what every pass did, declined matches with reasons, verification figures
"""

__version__ = "0.1.0"

from onnxopt.errors import CompileError  # noqa: E402

__all__ = ["CompileError", "CompileResult", "__version__", "compile"]


def __getattr__(name: str):
    # The compiler (onnx, onnx_ir, onnxruntime, onnxscript: ~2 s of imports) loads on first use,
    # so `onnxopt --version`, `--help` and usage errors start at once.
    if name in ("compile", "CompileResult"):
        from onnxopt import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxopt' has no attribute {name!r}")
