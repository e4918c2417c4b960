"""onnxopt.passes: one module per pass, the registry, and shared precondition helpers.

Importing this package imports every module in it, which registers every pass: adding a pass is
adding a module. Then it loads the plugin passes of installed packages (passes/plugins.py).
"""

import importlib
import pkgutil

from onnxopt.passes.base import OptPass, RewritePass
from onnxopt.passes.registry import PassInfo, all_passes, get, register, select

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_") and _module not in ("base", "registry", "plugins"):
        importlib.import_module(f"{__name__}.{_module}")

# Passes of installed packages (entry point group "onnxopt.passes"), after the built-in ones.
from onnxopt.passes import plugins  # noqa: E402

plugins.load_installed()

__all__ = ["OptPass", "PassInfo", "RewritePass", "all_passes", "get", "register", "select"]
