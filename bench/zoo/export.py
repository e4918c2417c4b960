"""Exporting a built zoo model with torch.onnx (legacy and dynamo exporters), quietly and checked."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import tempfile

from onnxopt.bench.zoo.models import (
    _EXTERNAL_DATA_THRESHOLD,
    _atomic_write_bytes,
    _Built,
)


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


def _example_inputs(built: _Built):
    """Export-time example inputs: batch 2 (avoids 0/1 specialisation), built.info's seq."""
    import torch
    from onnxopt.bench.zoo.inputs import (
        _feeds_from_info,  # here: inputs imports the cache, which imports this
    )

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
