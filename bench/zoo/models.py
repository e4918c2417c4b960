"""The zoo's models: the registry of specs and one builder per model (random weights from configs)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import io
import logging
import os
import pathlib
import sys
import tempfile
import warnings
from typing import Any, Callable

import numpy as np

#: Bump when a builder changes in a way that changes the exported graphs/weights.
ZOO_FORMAT_VERSION = 1

MODELS: tuple[str, ...] = (
    "bert",
    "gpt2",
    "vit",
    "resnet",
    "mobilenetv2",
    "cnn",
    "minilm",
    "efficientnet_lite0",
    "digits_cnn",
)
REAL_WEIGHT_MODELS: tuple[str, ...] = ("minilm", "efficientnet_lite0", "digits_cnn")
SIZES: tuple[str, ...] = ("tiny", "base")
EXPORTERS: tuple[str, ...] = ("legacy", "dynamo")
ATTENTIONS: tuple[str, ...] = ("eager", "sdpa")
LEGACY_OPSETS = range(13, 21)
DYNAMO_DEFAULT_OPSET = 18

_EXTERNAL_DATA_THRESHOLD = int(1.8e9)
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)



# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Built:
    """A torch module ready for export plus its I/O description."""

    module: Any  # torch.nn.Module, forward(*inputs in input_names order)
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    info: dict  # kind ("text"/"image"), seq, vocab_size, image_size, channels, ...


@dataclasses.dataclass(frozen=True)
class _Spec:
    builder: Callable[..., _Built]  # (size, attention, cache_root) -> _Built
    has_attention: bool
    keep_bn: bool  # convolutional model: export BN unfolded
    sized: bool  # False: real-weight model, `size` is ignored


_SPECS: dict[str, _Spec] = {}


def _register(name: str, *, has_attention: bool, keep_bn: bool = False, sized: bool = True):
    def deco(fn):
        _SPECS[name] = _Spec(fn, has_attention, keep_bn, sized)
        return fn

    return deco


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}") from None


# --------------------------------------------------------------------------------------------
# Wrappers (plain-tensor outputs)
# --------------------------------------------------------------------------------------------


def _hf_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@functools.lru_cache(maxsize=None)
def _wrappers():
    import torch

    class TextEncoder(torch.nn.Module):
        """(input_ids, attention_mask, token_type_ids) -> (last_hidden_state, pooler_output)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=True,
            )
            return out.last_hidden_state, out.pooler_output

    class Decoder(torch.nn.Module):
        """(input_ids, attention_mask) -> last_hidden_state, no KV cache."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                return_dict=True,
            )
            return out.last_hidden_state

    class Vision(torch.nn.Module):
        """pixel_values -> (last_hidden_state, pooler_output)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    return TextEncoder, Decoder, Vision


def _text_encoder(model, seq: int) -> _Built:
    TextEncoder, _, _ = _wrappers()
    cfg = model.config
    return _Built(
        TextEncoder(model).eval(),
        ("input_ids", "attention_mask", "token_type_ids"),
        ("last_hidden_state", "pooler_output"),
        dict(kind="text", seq=seq, vocab_size=cfg.vocab_size, max_seq=cfg.max_position_embeddings),
    )


def _vision(model, image_size: int) -> _Built:
    _, _, Vision = _wrappers()
    return _Built(
        Vision(model).eval(),
        ("pixel_values",),
        ("last_hidden_state", "pooler_output"),
        dict(kind="image", image_size=image_size, channels=3, normalize="imagenet"),
    )


# --------------------------------------------------------------------------------------------
# Builders: one per model
# --------------------------------------------------------------------------------------------


@_register("bert", has_attention=True)
def _build_bert(size: str, attention: str, root: pathlib.Path) -> _Built:
    import torch
    from transformers import BertConfig, BertModel

    if size == "tiny":
        cfg = BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        )
        seq = 16
    else:
        cfg = BertConfig()  # bert-base-uncased: 12 layers, 768, 12 heads, 3072, vocab 30522
        seq = 128
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    return _text_encoder(BertModel(cfg).eval(), seq)


@_register("gpt2", has_attention=True)
def _build_gpt2(size: str, attention: str, root: pathlib.Path) -> _Built:
    import torch
    from transformers import GPT2Config, GPT2Model

    if size == "tiny":
        cfg = GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
        seq = 16
    else:
        cfg = GPT2Config()  # gpt2 small: 12 layers, 768, 12 heads, vocab 50257
        seq = 128
    cfg.use_cache = False
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    _, Decoder, _ = _wrappers()
    return _Built(
        Decoder(GPT2Model(cfg).eval()).eval(),
        ("input_ids", "attention_mask"),
        ("last_hidden_state",),
        dict(kind="text", seq=seq, vocab_size=cfg.vocab_size, max_seq=cfg.n_positions),
    )


@_register("vit", has_attention=True)
def _build_vit(size: str, attention: str, root: pathlib.Path) -> _Built:
    import torch
    from transformers import ViTConfig, ViTModel

    if size == "tiny":
        cfg = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
        )
    else:
        cfg = ViTConfig()  # vit-base-patch16-224
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    return _vision(ViTModel(cfg, add_pooling_layer=True).eval(), cfg.image_size)


@_register("resnet", has_attention=False, keep_bn=True)
def _build_resnet(size: str, attention: str, root: pathlib.Path) -> _Built:
    import torch
    from transformers import ResNetConfig, ResNetModel

    if size == "tiny":
        cfg = ResNetConfig(
            embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck"
        )
        image = 32
    else:
        cfg = ResNetConfig()  # ResNet-50: bottleneck, depths 3/4/6/3, widths 256..2048
        image = 224
    torch.manual_seed(0)
    model = ResNetModel(cfg).eval()
    _randomize_bn_stats(model)
    return _vision(model, image)


@_register("mobilenetv2", has_attention=False, keep_bn=True)
def _build_mobilenetv2(size: str, attention: str, root: pathlib.Path) -> _Built:
    import torch
    from transformers import MobileNetV2Config, MobileNetV2Model

    if size == "tiny":
        cfg = MobileNetV2Config(image_size=32, depth_multiplier=0.25)
    else:
        cfg = MobileNetV2Config()  # mobilenet_v2_1.0_224
    torch.manual_seed(0)
    model = MobileNetV2Model(cfg).eval()
    _randomize_bn_stats(model)
    return _vision(model, cfg.image_size)


def _small_cnn(c1: int = 16, c2: int = 32, num_classes: int = 10):
    """Conv-BN-ReLU x2, MaxPool(2), Linear, for 1x8x8 inputs."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=False),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, num_classes),
    )


def _cnn_built(model) -> _Built:
    return _Built(
        model.eval(),
        ("input",),
        ("logits",),
        dict(kind="image", image_size=8, channels=1, normalize="digits"),
    )


@_register("cnn", has_attention=False, keep_bn=True)
def _build_cnn(size: str, attention: str, root: pathlib.Path) -> _Built:
    import torch

    torch.manual_seed(0)
    model = _small_cnn(16, 32) if size == "tiny" else _small_cnn(64, 128)
    _randomize_bn_stats(model)
    return _cnn_built(model)


def _randomize_bn_stats(model) -> None:
    """Give freshly initialised BatchNorms non-trivial running stats / affine params (seeded),
    so BN is not an identity and BN-folding bugs are observable."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)


# -- shared by the zoo's modules ---------------------------------------------------------------


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _version_tag() -> str:
    tag = f"torch{_dist_version('torch')}-tf{_dist_version('transformers')}"
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in tag)


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _quiet():
    """Silence exporter/transformers warning spam and chatty stdout for the duration."""
    _hf_env()
    import torch  # noqa: F401  (importing torch (re)configures its loggers: do it first)

    names = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx",
             "onnxscript", "transformers")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    hf_bar = None
    if "transformers" in sys.modules or importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        hf_bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Loading weights" bars of from_pretrained
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if hf_bar:
            hf_logging.enable_progress_bar()


# The real-weight models register themselves on import.
from onnxopt.bench.zoo import real_data  # noqa: E402,F401
