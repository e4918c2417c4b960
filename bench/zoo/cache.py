"""The export cache: one .onnx per (model, size, exporter, opset, attention, versions), written
atomically; `build()` exports on first use."""

from __future__ import annotations

import os
import pathlib

from onnxopt.bench.zoo.export import _check_opset, _export, _save_atomic
from onnxopt.bench.zoo.models import (
    ATTENTIONS,
    DYNAMO_DEFAULT_OPSET,
    EXPORTERS,
    LEGACY_OPSETS,
    SIZES,
    ZOO_FORMAT_VERSION,
    _dist_version,
    _quiet,
    _spec,
    _version_tag,
)

# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _cache_root(cache_dir_arg) -> pathlib.Path:
    root = cache_dir_arg or os.environ.get("ONNXOPT_ZOO_CACHE") or "~/.cache/onnxopt/zoo"
    root = pathlib.Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The directory :func:`build` uses (created if missing)."""
    return _cache_root(cache_dir)


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
