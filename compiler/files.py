"""The files a compile reads and the files it writes, kept apart, and the writes done all or none.

A compile reads the model, its external-data files, the calibration data and the input data; it
writes the model, its external data (`OUT.data`) and the reports. `FileSet` holds both sets and
`FileSet.check()` refuses, before any work starts:
- a written path that is a file the compile reads, compared by resolved path (symlinks followed)
  and by (device, inode), so neither a symlink nor a hard link makes onnxopt overwrite its input;
- two outputs that are the same file (`-o out.onnx --report out.onnx`);
- an output that is a folder, or whose folder is missing or not writable.

`commit()` then moves staged files into place as one unit: every target that already exists is kept
aside until all renames have succeeded, and a failure (or Ctrl-C, SIGTERM) part-way puts every target
back as it was, so the model and its report are written both or neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from onnxopt.errors import CompileError


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """(resolved path, (device, inode) if the file exists)."""
    resolved = path.resolve()
    try:
        st = resolved.stat()
    except OSError:
        return resolved, None
    return resolved, (st.st_dev, st.st_ino)


@dataclasses.dataclass
class FileSet:
    """What one compile reads and writes: `(path, role)` pairs, roles as users would name them."""

    reads: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    writes: list[tuple[Path, str]] = dataclasses.field(default_factory=list)

    def read(self, path: str | os.PathLike, role: str) -> None:
        self.reads.append((Path(path), role))

    def read_all(self, paths: Iterable[str | os.PathLike], role: str) -> None:
        for p in paths:
            self.read(p, role)

    def write(self, path: str | os.PathLike, role: str) -> None:
        self.writes.append((Path(path), role))

    def check(self) -> None:
        """Refuse any write that is a read or another write, and any unwritable output."""
        read_ids = [(p, role, *_identity(p)) for p, role in self.reads]
        seen: list[tuple[Path, str, Path, tuple[int, int] | None]] = []
        for out, role in self.writes:
            resolved, inode = _identity(out)
            for src, src_role, src_resolved, src_inode in read_ids:
                if resolved == src_resolved or (inode is not None and inode == src_inode):
                    raise CompileError(f"{role} {out} is {src_role} {src}; refusing to overwrite it")
            for other, other_role, other_resolved, other_inode in seen:
                if resolved == other_resolved or (inode is not None and inode == other_inode):
                    raise CompileError(f"{role} {out} and {other_role} {other} are the same file")
            check_writable(out, role)
            seen.append((out, role, resolved, inode))


def check_writable(out: Path, role: str = "output") -> None:
    """An output must be a file (or absent) in an existing folder this process may write into."""
    if out.is_dir():
        raise CompileError(f"{role} {out} is a folder")
    folder = out.parent.resolve() if str(out.parent) else Path.cwd()
    if not folder.is_dir():
        raise CompileError(f"{role} folder {out.parent} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CompileError(f"{role} folder {out.parent} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise CompileError(f"{role} {out} is not writable")


def staging_dir(target: Path) -> Path:
    """A private folder beside `target` (same file system, so the final rename is atomic)."""
    try:
        return Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=target.parent.resolve()))
    except OSError as exc:
        raise CompileError(f"cannot write into {target.parent}: {exc.strerror or exc}") from None


def commit(moves: list[tuple[Path, Path]]) -> None:
    """Rename every staged file onto its target, all or none (see the module docstring).

    Each staged file must live in a staging folder beside its target; the previous target is kept
    aside in that same folder until the end, so undoing is a rename too.
    """
    done: list[tuple[Path, Path | None]] = []  # (target, where its previous version was kept)
    try:
        for staged, target in moves:
            backup = None
            if target.exists():
                backup = staged.with_name(staged.name + ".previous")
                os.replace(target, backup)
            done.append((target, backup))
            os.replace(staged, target)
    except BaseException as exc:
        for target, backup in reversed(done):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CompileError(f"cannot write {exc.filename or 'the output'}: {exc.strerror or exc}") from None
        raise


def remove_staging(folders: Iterable[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
