"""Emit: checker, atomic write, external data when large.

The file is written into a temporary folder beside the target, checked there with the full ONNX
checker, then renamed into place, so a failed or interrupted compile never leaves a partial file.
The same model gives the same bytes: serialization has no timestamps and names are canonical.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxopt import weights
from onnxopt.errors import CompileError

# protobuf cannot serialize a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 1024**3)


def weights_nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def check_output_path(out: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    out = Path(out)
    if out.exists() and out.is_dir():
        raise CompileError(f"output {out} is a folder")
    if not out.parent.resolve().is_dir():
        raise CompileError(f"output folder {out.parent} does not exist")
    if source is not None and Path(source).exists():
        if out.resolve() == Path(source).resolve() or (out.exists() and os.path.samefile(out, source)):
            raise CompileError(f"output {out} is the input model; refusing to overwrite it")
    return out


def _check(model: ir.Model) -> None:
    # On the skeleton: fast, and works for models over 2 GB.
    weights.check(model, full_check=True)


def save(
    model: ir.Model,
    out: str | os.PathLike,
    *,
    external_data: bool | None = None,
    source: str | os.PathLike | None = None,
    check: bool = True,
) -> Path:
    """Write `model` to `out` atomically; external data beside it when asked or when large."""
    out = check_output_path(out, source)
    if external_data is None:
        external_data = weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = out.name + ".data" if external_data else None
    if check:
        try:
            _check(model)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompileError(f"emitted model fails the ONNX checker: {first}") from None
    tmp = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=out.parent))
    try:
        staged = tmp / out.name
        try:
            if data_name:
                ir.save(model, staged, external_data=data_name)
            else:
                weights.write(model, staged)
        except Exception as exc:
            raise CompileError(f"cannot serialize the model: {exc}") from None
        if data_name:
            os.replace(tmp / data_name, out.parent / data_name)
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
