"""Calibration data for int8: files or feed dicts, validated before any work, streamed.

Accepted sources (one sample = one model run):
* an ``.npz`` file with one array per model input, named like the input, first axis = samples.
  An array of the input's rank is fed one row at a time as ``x[k:k+1]`` (batch 1); an array of
  rank + 1 is fed as ``x[k]`` (each sample is a whole batch);
* a folder of ``.npz`` files (each as above, read in file-name order, one at a time) or of
  ``.npy`` files named ``<input name>.npy``;
* any iterable of feed dicts ``{input name: array}`` (library use).

Wrong names, ranks, fixed dimensions, dtypes, NaN / infinite values and too few samples raise
:class:`CalibrationError` with a one-line message. Files are checked completely before
calibration starts (one at a time), and again by whoever reads a shard of them; an iterable is
checked sample by sample as it is consumed (its first sample before any work).

Sharded calibration (`CalibrationSource.shards`): the samples are cut into runs of SHARD_SAMPLES
consecutive samples, a shard of files being a list of (file, rows) that the worker reads itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

# One sample for the histograms and one held out to measure fidelity on.
MIN_SAMPLES = 2
# The validation part: a fixed share of the samples, at least MIN_VALIDATION of them (see split_plan).
VALIDATION_SHARE = 0.2
MIN_VALIDATION = 4


class CalibrationError(ValueError):
    """Bad calibration data; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple  # int for a fixed dimension, None for a dynamic one

    def describe(self) -> str:
        return f"{self.dtype}[{', '.join('?' if d is None else str(d) for d in self.dims)}]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for v in model.graph.inputs:
        if v.const_value is not None:  # initializer-backed input: keeps its default
            continue
        if v.dtype is None or v.shape is None:
            raise CalibrationError(f"model input {v.name!r} has no type or shape to check calibration data against")
        dims = tuple(d if isinstance(d, int) else None for d in v.shape.dims)
        specs.append(InputSpec(v.name, np.dtype(v.dtype.numpy()), dims))
    return specs


def _check_names(given: set[str], specs: list[InputSpec], where: str, missing_msg: str, extra_msg: str) -> None:
    """The given names must be exactly the model's inputs; the message lists what is off."""
    names = {s.name for s in specs}
    missing, extra = sorted(names - given), sorted(given - names)
    if missing or extra:
        parts = ([missing_msg.format(", ".join(map(repr, missing)))] if missing else []) + (
            [extra_msg.format(", ".join(map(repr, extra)))] if extra else [])
        raise CalibrationError(f"{where}: {'; '.join(parts)} (model inputs: {', '.join(s.name for s in specs)})")


def check_feed(feed: dict, specs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    """Validate one sample (a feed dict for one run) against the model inputs."""
    if not isinstance(feed, dict):
        raise CalibrationError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    _check_names(set(feed), specs, where, "missing input(s) {}", "unknown name(s) {}")
    out = {}
    for s in specs:
        a = np.asarray(feed[s.name])
        _check_array(a, s, where, batch_axis=False)
        out[s.name] = a
    return out


def _check_array(a: np.ndarray, s: InputSpec, where: str, *, batch_axis: bool) -> None:
    """batch_axis: `a` has a leading samples axis (its rank is the input's or one more)."""
    if a.dtype != s.dtype:
        raise CalibrationError(f"{where}: input {s.name!r} has dtype {a.dtype}, the model expects {s.dtype}")
    ranks = (len(s.dims), len(s.dims) + 1) if batch_axis else (len(s.dims),)
    if a.ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise CalibrationError(
            f"{where}: input {s.name!r} has shape {list(a.shape)} (rank {a.ndim}), expected rank {want} for {s.describe()}"
        )
    # Dimensions of one fed sample, compared with the model's fixed dimensions.
    sample = a.shape[1:] if (batch_axis and a.ndim == len(s.dims) + 1) else a.shape
    start = 1 if (batch_axis and a.ndim == len(s.dims)) else 0
    for axis in range(start, len(s.dims)):
        d = s.dims[axis]
        if d is not None and sample[axis] != d:
            raise CalibrationError(
                f"{where}: input {s.name!r} has shape {list(a.shape)}, the model expects {s.describe()} (axis {axis})"
            )
    if batch_axis and a.ndim == len(s.dims) and s.dims and s.dims[0] not in (None, 1):
        raise CalibrationError(
            f"{where}: input {s.name!r}: rows are fed as batch 1 but the model's batch is fixed at {s.dims[0]}; "
            f"give an array of shape [samples, {', '.join(map(str, s.dims))}]"
        )
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise CalibrationError(f"{where}: input {s.name!r} has NaN or infinite values")


def _arrays_source(arrays: dict[str, np.ndarray], specs: list[InputSpec], where: str) -> tuple[int, callable]:
    """Check a dict of per-input sample arrays; return (samples, row -> feed)."""
    _check_names(set(arrays), specs, where, "missing array(s) for input(s) {}", "array(s) {} match no model input")
    counts = {}
    for s in specs:
        a = arrays[s.name]
        _check_array(a, s, where, batch_axis=True)
        counts[s.name] = a.shape[0] if a.ndim else 0
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise CalibrationError(f"{where}: inputs have different numbers of samples ({detail})")
    n = next(iter(counts.values()), 0)

    def row(k: int) -> dict[str, np.ndarray]:
        return {
            s.name: (arrays[s.name][k : k + 1] if arrays[s.name].ndim == len(s.dims) else arrays[s.name][k])
            for s in specs
        }

    return n, row


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's data problem
        raise CalibrationError(f"{path}: cannot read as .npz ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(f"{path}: cannot read as .npy ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


# Samples per shard of sharded calibration (`shards()`). The partition depends on the data only, never
# on the number of workers: every worker count merges the same shard statistics in the same order,
# so float sums (channel means, Gram matrices) are the same to the bit.
SHARD_SAMPLES = 64


@dataclasses.dataclass(frozen=True)
class Shard:
    """The samples [start, start + count) of a source, as whoever processes them reads them: `parts`
    are (file, first row, end row) of .npz files (or of a folder of .npy files, `kind` "npy"), read
    by `samples()`; a shard of an iterable carries its feeds (`kind` "feeds")."""

    index: int
    start: int
    count: int
    kind: str = "npz"
    parts: tuple[tuple[str, int, int], ...] = ()
    feeds: tuple = ()

    def files(self) -> list[str]:
        return [path for path, _, _ in self.parts]

    def describe(self) -> str:
        where = f": {', '.join(dict.fromkeys(self.files()))}" if self.parts else ", feed dicts"
        return f"shard {self.index} (samples {self.start}-{self.start + self.count - 1}{where})"

    def samples(self, specs: list[InputSpec], last: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The shard's feeds, its files read (and checked) one at a time. `last` keeps the last file
        read between calls, for consecutive shards of one large .npz."""
        if self.kind == "feeds":
            yield from self.feeds
            return
        last = {} if last is None else last
        for path, first, end in self.parts:
            if last.get("path") != path:
                last.clear()
                f = Path(path)
                arrays = _npy_arrays(f, specs) if self.kind == "npy" else _load_npz(f)
                last.update(path=path, row=_arrays_source(arrays, specs, path)[1])
            for k in range(first, end):
                yield last["row"](k)


@dataclasses.dataclass
class CalibrationSource:
    """Validated calibration samples: iterate for feed dicts; `count` is None for a bare iterable.
    `shards()` cuts the same samples into Shards of SHARD_SAMPLES (files are read by whoever
    processes a shard; an iterable is consumed as the shards are taken)."""

    iterator: Iterator[dict[str, np.ndarray]]
    count: int | None
    description: str
    files: list[tuple[str, int]] | None = None  # (file, samples) of a path source, in order
    kind: str = "npz"

    def __iter__(self):
        return self.iterator

    def shards(self, size: int = SHARD_SAMPLES) -> Iterator[Shard]:
        if self.files is None:
            for index in itertools.count():
                feeds = tuple(itertools.islice(self.iterator, size))
                if not feeds:
                    return
                yield Shard(index, index * size, len(feeds), "feeds", feeds=feeds)
        parts: list[tuple[str, int, int]] = []
        start = taken = 0
        index = 0
        for path, rows in self.files:
            row = 0
            while row < rows and start + taken < self.count:
                n = min(rows - row, size - taken, self.count - start - taken)
                parts.append((path, row, row + n))
                row += n
                taken += n
                if taken == size:
                    yield Shard(index, start, taken, self.kind, tuple(parts))
                    index, start, taken, parts = index + 1, start + taken, 0, []
        if taken:
            yield Shard(index, start, taken, self.kind, tuple(parts))


def open_source(data, model: ir.Model, samples: int | None = None) -> CalibrationSource:
    """Validate `data` against `model`'s inputs and return a stream of at most `samples` feeds."""
    specs = input_specs(model)
    if samples is not None and (not isinstance(samples, int) or samples < MIN_SAMPLES):
        raise CalibrationError(f"--calibration-samples must be an integer >= {MIN_SAMPLES} (got {samples!r})")
    if data is None:
        raise CalibrationError("no calibration data given")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise CalibrationError(f"calibration data {str(path)!r}: no such file or folder")
        if path.is_dir():
            files, kind = _folder_files(path, specs)
        elif path.suffix == ".npz":
            files, kind = [(str(path), _arrays_source(_load_npz(path), specs, str(path))[0])], "npz"
        else:
            raise CalibrationError(f"calibration data {str(path)!r}: expected an .npz file or a folder of .npz/.npy files")
        total = sum(n for _, n in files)
        _check_count(total, samples, str(path))
        n = total if samples is None else min(samples, total)
        source = CalibrationSource(iter(()), n, str(path), files, kind)
        # Streamed through the shards, so a single stream reads the files exactly as the shards do.
        last: dict = {}
        source.iterator = (feed for shard in source.shards() for feed in shard.samples(specs, last))
        return source
    if isinstance(data, dict):
        raise CalibrationError("calibration data is a single dict: give an iterable of feed dicts (one per sample)")
    if not isinstance(data, Iterable):
        raise CalibrationError(f"calibration data of type {type(data).__name__} is not a path or an iterable of feed dicts")
    count = None
    if hasattr(data, "__len__"):
        count = len(data)
        _check_count(count, samples, "calibration data")
        count = count if samples is None else min(samples, count)
    it = iter(data)
    if samples is not None:
        it = itertools.islice(it, samples)
    try:
        first = next(it)
    except StopIteration:
        raise CalibrationError(f"calibration data has no samples (at least {MIN_SAMPLES} needed)") from None
    first = check_feed(first, specs, "calibration sample 0")

    def checked():
        yield first
        seen = 1
        for k, feed in enumerate(it, start=1):
            yield check_feed(feed, specs, f"calibration sample {k}")
            seen += 1
        if seen < (samples or MIN_SAMPLES):
            raise CalibrationError(f"calibration data has {seen} sample(s), {samples or MIN_SAMPLES} needed")

    return CalibrationSource(checked(), count, "feed dicts")


def _check_count(total: int, samples: int | None, where: str) -> None:
    need = samples or MIN_SAMPLES
    if total < need:
        asked = f"--calibration-samples {samples} asked" if samples else f"at least {MIN_SAMPLES} needed"
        raise CalibrationError(f"{where}: {total} calibration sample(s), {asked}")


def _folder_files(path: Path, specs: list[InputSpec]) -> tuple[list[tuple[str, int]], str]:
    """[(file, samples)] of a folder and its kind. Each .npz file is checked now (one at a time, so a
    folder larger than memory is fine) and read again when its samples are streamed."""
    npz = sorted(path.glob("*.npz"))
    npy = sorted(path.glob("*.npy"))
    if npz and npy:
        raise CalibrationError(f"{path}: holds both .npz and .npy files; use one kind")
    if npz:
        return [(str(f), _arrays_source(_load_npz(f), specs, str(f))[0]) for f in npz], "npz"
    if npy:
        return [(str(path), _arrays_source(_npy_arrays(path, specs), specs, str(path))[0])], "npy"
    raise CalibrationError(f"{path}: no .npz or .npy files in the folder")


def _npy_arrays(folder: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """A folder of `<input name>.npy`, memory-mapped."""
    return {f.stem: _load_npy(f) for f in sorted(folder.glob("*.npy"))}


@dataclasses.dataclass(frozen=True)
class Split:
    """Which samples (by index in the stream) form the validation part; the rest calibrate.

    With a known count n: ``max(MIN_VALIDATION, round(VALIDATION_SHARE * n))`` samples, evenly
    spaced (every fifth sample for the default share); fewer than ``2 * MIN_VALIDATION`` samples
    are not split (``validation == 0``: the fidelity control then decides on the calibration
    samples, and says so). With an unknown count (a bare iterable), every fifth sample."""

    count: int | None
    validation: int | None  # planned size of the validation part; None: every fifth sample

    @property
    def split(self) -> bool:
        return self.validation != 0

    def is_validation(self, k: int) -> bool:
        if self.validation is None:
            return k % round(1 / VALIDATION_SHARE) == round(1 / VALIDATION_SHARE) - 1
        if not self.validation:
            return False
        n, v = self.count, self.validation
        return (k + 1) * v // n > k * v // n


def split_plan(count: int | None) -> Split:
    """The deterministic calibration / validation split of `count` samples (see Split)."""
    if count is None:
        return Split(None, None)
    if count < 2 * MIN_VALIDATION:
        return Split(count, 0)
    return Split(count, max(MIN_VALIDATION, round(VALIDATION_SHARE * count)))
