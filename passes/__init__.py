"""onnxopt.passes: one module per pass, the registry, and shared precondition helpers.

Importing this package registers every pass.
"""

from onnxopt.passes import cleanup  # noqa: F401  (registers passes)
from onnxopt.passes.base import OptPass, RewritePass
from onnxopt.passes.registry import PassInfo, all_passes, get, register, select

__all__ = ["OptPass", "PassInfo", "RewritePass", "all_passes", "get", "register", "select"]
