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
