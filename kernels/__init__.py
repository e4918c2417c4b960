"""onnxopt.kernels: numpy reference math and the catalogue of fused kernels per target."""

if __name__ == "kernels":
    # Imported as a top-level `kernels`: the checkout's root is on sys.path (`python -m ...` or
    # `python -m pytest` run from it), so this folder shadows the `kernels` distribution (Hugging
    # Face's, which transformers >= 5.25 imports when it is installed). Load that one in our place:
    # the import system returns whatever sys.modules holds under the name once this body has run.
    import importlib.util as _util
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _PathFinder.find_spec("kernels", [p for p in _sys.path if _os.path.abspath(p or ".") != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ is onnxopt.kernels)",
                                  name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
