import os

# Tests never reach a model hub; transformers builds everything from configs or shipped weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
