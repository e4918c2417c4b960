"""Emit: checker, atomic write, external data when large.

The model is checked with the full ONNX checker, written into a staging folder beside the target,
then renamed into place with its external data (compiler/files.py: all or none), so a failed or
interrupted compile never leaves a partial file, and never overwrites a file the compile read.
The same model gives the same bytes: serialization has no timestamps and names are canonical.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from onnxopt import weights
from onnxopt.errors import CompileError
from onnxopt.files import FileSet, commit, remove_staging, staging_dir

# protobuf cannot serialize a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 1024**3)


def weights_nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def data_path(out: Path) -> Path:
    """Where `save(..., external_data=True)` puts the weights: `OUT.data` beside `OUT`."""
    return out.with_name(out.name + ".data")


def output_files(out: str | os.PathLike, external_data: bool | None) -> FileSet:
    """The files a save to `out` writes. With `external_data=None` (decided by size later) `OUT.data`
    counts as written too: whether it will be is not known before the compile."""
    fs = FileSet()
    out = Path(out)
    fs.write(out, "output")
    if external_data is not False:
        fs.write(data_path(out), "the output's external data")
    return fs


def _check(model: ir.Model) -> None:
    # On the skeleton: fast, and works for models over 2 GB.
    weights.check(model, full_check=True)


def stage(model: ir.Model, out: Path, *, external_data: bool, check: bool = True) -> tuple[Path, list[tuple[Path, Path]]]:
    """Write `model` into a staging folder beside `out`: (the folder, [(staged file, target)])."""
    if check:
        try:
            _check(model)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompileError(f"emitted model fails the ONNX checker: {first}") from None
    folder = staging_dir(out)
    try:
        staged = folder / out.name
        data = data_path(out)
        try:
            if external_data:
                ir.save(model, staged, external_data=data.name)
            else:
                weights.write(model, staged)
        except OSError as exc:
            raise CompileError(f"cannot write {out}: {exc.strerror or exc}") from None
        except Exception as exc:
            raise CompileError(f"cannot serialize the model: {exc}") from None
        moves = [(folder / data.name, data)] if external_data else []
        return folder, moves + [(staged, out)]
    except BaseException:
        remove_staging([folder])
        raise


def save(
    model: ir.Model,
    out: str | os.PathLike,
    *,
    external_data: bool | None = None,
    reads: FileSet | None = None,
    check: bool = True,
) -> Path:
    """Write `model` to `out` atomically; external data beside it when asked or when large.

    `reads`: the files the compile read; none of them may be overwritten (compiler/files.py).
    """
    out = Path(out)
    if external_data is None:
        external_data = weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    files = output_files(out, external_data)
    if reads is not None:
        files.reads = list(reads.reads)
    files.check()
    folder, moves = stage(model, out, external_data=external_data, check=check)
    try:
        commit(moves)
    finally:
        remove_staging([folder])
    return out
