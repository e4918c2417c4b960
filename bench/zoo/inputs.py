"""Sample inputs for zoo models, and the torch module's own outputs as a reference."""

from __future__ import annotations

import os

import numpy as np
from onnxopt.bench.zoo.cache import _cache_root, _normalize
from onnxopt.bench.zoo.models import _IMAGENET_MEAN, _IMAGENET_STD, _quiet, _spec
from onnxopt.bench.zoo.real_data import digits_data

# --------------------------------------------------------------------------------------------
# Inputs and torch references
# --------------------------------------------------------------------------------------------


def _info_for(name: str, size: str) -> tuple[dict, tuple[str, ...]]:
    """Static description (no torch needed) of a model's inputs for ``size``."""
    tiny = size != "base"
    if name in ("bert", "minilm"):
        if name == "minilm":
            info = dict(kind="text", seq=128, vocab_size=30522)
        else:
            info = dict(kind="text", seq=16 if tiny else 128, vocab_size=1000 if tiny else 30522)
        return info, ("input_ids", "attention_mask", "token_type_ids")
    if name == "gpt2":
        info = dict(kind="text", seq=16 if tiny else 128, vocab_size=1000 if tiny else 50257)
        return info, ("input_ids", "attention_mask")
    if name in ("vit", "resnet", "mobilenetv2"):
        return dict(kind="image", image_size=32 if tiny else 224, channels=3,
                    normalize="imagenet"), ("pixel_values",)
    if name == "efficientnet_lite0":
        return dict(kind="image", image_size=224, channels=3, normalize="imagenet"), ("input",)
    if name in ("cnn", "digits_cnn"):
        return dict(kind="image", image_size=8, channels=1, normalize="digits"), ("input",)
    _spec(name)
    raise AssertionError(name)


def _feeds_from_info(info: dict, input_names, *, batch: int, seq: int | None, seed: int):
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    if info["kind"] == "text":
        seq = int(seq or info["seq"])
        vocab = int(info["vocab_size"])
        for n in input_names:
            if n == "input_ids":
                feeds[n] = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64)
            elif n == "attention_mask":
                feeds[n] = np.ones((batch, seq), dtype=np.int64)
            elif n == "token_type_ids":
                feeds[n] = np.zeros((batch, seq), dtype=np.int64)
            else:
                raise ValueError(f"unexpected text input {n!r}")
        return feeds
    (n,) = input_names
    hw, ch = int(info["image_size"]), int(info["channels"])
    if info.get("normalize") == "digits":
        # real digits test images, cycled to fill the batch (deterministic, seed picks the offset)
        _, _, x_te, _ = digits_data()
        idx = (np.arange(batch) + seed) % len(x_te)
        feeds[n] = np.ascontiguousarray(x_te[idx])
        return feeds
    img = rng.random((batch, hw, hw, ch), dtype=np.float32)
    img = (img - _IMAGENET_MEAN[:ch]) / _IMAGENET_STD[:ch]
    feeds[n] = np.ascontiguousarray(img.transpose(0, 3, 1, 2), dtype=np.float32)
    return feeds


def _read_model(path_or_model):
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    return onnx.load_model(os.fspath(path_or_model), load_external_data=False)


def sample_feeds(
    name: str,
    path_or_model=None,
    batch: int = 1,
    seq: int | None = None,
    *,
    size: str = "tiny",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Deterministic, realistic inputs for zoo model ``name``.

    Text: ``input_ids`` uniform in ``[1, vocab)``, ``attention_mask`` ones, ``token_type_ids``
    zeros, int64, shape ``(batch, seq)`` (``seq`` defaults to the model's: tiny 16, base and
    minilm 128).
    Images: ImageNet-normalized uniform noise, float32 NCHW; cnn/digits_cnn get real digits test
    images normalized like :func:`digits_data`.  If ``path_or_model`` (a zoo ``.onnx`` path or
    ``onnx.ModelProto``) is given, sizes/vocab come from its ``onnxopt.zoo.*`` metadata and only
    the graph's actual inputs are returned; otherwise ``size`` picks the defaults.
    """
    info, names = _info_for(name, size)
    if path_or_model is not None:
        model = _read_model(path_or_model)
        meta = {p.key[len("onnxopt.zoo."):]: p.value for p in model.metadata_props
                if p.key.startswith("onnxopt.zoo.")}
        for k in ("seq", "vocab_size", "image_size", "channels", "normalize", "kind"):
            if k in meta:
                info[k] = meta[k]
        inits = {i.name for i in model.graph.initializer}
        graph_inputs = [i.name for i in model.graph.input if i.name not in inits]
        names = tuple(n for n in names if n in graph_inputs)
        missing = set(graph_inputs) - set(names)
        if missing:
            raise ValueError(f"{name}: model has inputs {sorted(missing)} unknown to the zoo")
    return _feeds_from_info(info, names, batch=batch, seq=seq, seed=seed)


def torch_module(name: str, size: str = "tiny", attention: str = "eager", cache_dir=None):
    """The (eval-mode) torch module that :func:`build` exports, with its I/O names.

    Returns ``(module, input_names, output_names)``; ``module(*inputs)`` takes torch tensors in
    ``input_names`` order.  Deterministic: same weights as the exported model (digits_cnn's
    trained weights are cached in ``cache_dir``, so pass the one given to :func:`build`).
    """
    name, size, _, _, attention = _normalize(name, size, "legacy", 14, attention)
    with _quiet():
        built = _spec(name).builder("tiny" if size == "real" else size,
                                    "eager" if attention == "none" else attention,
                                    _cache_root(cache_dir))
    return built.module, built.input_names, built.output_names


def reference_outputs(
    name: str,
    feeds: dict[str, np.ndarray],
    size: str = "tiny",
    attention: str = "eager",
    cache_dir=None,
) -> dict[str, np.ndarray]:
    """Run the torch model on ``feeds`` and return ``{output_name: array}``."""
    import torch

    module, in_names, out_names = torch_module(name, size, attention, cache_dir)
    with torch.no_grad(), _quiet():
        outs = module(*(torch.from_numpy(np.asarray(feeds[n])) for n in in_names))
    if isinstance(outs, torch.Tensor):
        outs = (outs,)
    return {n: o.detach().numpy() for n, o in zip(out_names, outs)}
