import os

# Tests never reach a model hub; transformers builds everything from configs or shipped weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# CI is a gate: the same hypothesis examples every run (locally they stay random, to keep exploring;
# what they find is pinned with @example).
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# `pytest -m "not zoo"` is the quick inner loop: tests that export torch models (through the zoo or
# torch.onnx directly) are marked `zoo` by what their code and fixtures use, not by hand.
import inspect  # noqa: E402

import pytest  # noqa: E402

_ZOO_WORDS = ("zoo.", "torch.", "import torch", "zoo_model", "export(")


def pytest_configure(config):
    config.addinivalue_line("markers", "zoo: builds a model with torch (the zoo or torch.onnx): slow, run in CI")


def _uses_torch(obj) -> bool:
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return False
    return any(w in source for w in _ZOO_WORDS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = [d.func for name in item.fixturenames
                for d in (fixtures.name2fixturedefs.get(name, ()) if fixtures else ())]
        if _uses_torch(getattr(item, "function", None)) or any(_uses_torch(f) for f in defs):
            item.add_marker(pytest.mark.zoo)
