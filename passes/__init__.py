"""onnxopt.passes: one module per pass, the registry, and shared precondition helpers.

Importing this package imports every module in it, which registers every pass: adding a pass is
adding a module.
"""

import importlib
import pkgutil

from onnxopt.passes.base import OptPass, RewritePass
from onnxopt.passes.registry import PassInfo, all_passes, get, register, select

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "registry", "checks"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["OptPass", "PassInfo", "RewritePass", "all_passes", "get", "register", "select"]
