"""onnxopt: a verifying graph-level optimizing compiler for ONNX models.

    import onnxopt
    result = onnxopt.compile("model.onnx", opt_level=3, target="cpu")
    result.save("model.opt.onnx")
    result.report   # what every pass did, declined matches with reasons, verification figures
"""

__version__ = "0.1.0"

from onnxopt.errors import CompileError  # noqa: E402
from onnxopt.api import CompileResult, compile  # noqa: E402

__all__ = ["CompileError", "CompileResult", "__version__", "compile"]
