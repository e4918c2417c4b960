"""Differential verification: run the original and the compiled model in onnxruntime, compare.

onnxruntime's own graph optimizations are disabled for both runs, so its fusions cannot hide (or
cause) a difference: what is compared is what onnxopt emitted.

Sample inputs are synthesized from the graph inputs' types and shapes (or taken from the user's
own sample, `input_data` / `--input-data FILE.npz`):
- a dynamic dimension (symbolic, unknown, or declared as -1 or 0) gets `DEFAULT_BATCH` (1) on axis 0
  and `DEFAULT_DIM` (16) elsewhere; a symbolic dimension gets the same value wherever its name
  appears; `input_shapes` overrides (the CLI's `--input-shape name:1,128`);
- when the original cannot run on that, the dynamic dims other than the batch climb a ladder
  (`ladder()`: the graph's hints first, e.g. twice its downsampling factor for images, then
  images 224, 320, 640; audio 128, 512, 16000; other sequences 128, 512) and the first sample it
  runs on is used (`reference()`); a sample input over `MAX_SAMPLE_BYTES` (2 GiB) is refused;
- integer inputs that index an embedding table (a Gather on a constant) get values in range; inputs
  whose name says "mask" and shape tensors (Reshape/Expand/Tile/ConstantOfShape) get ones; other
  integer inputs get 0 or 1; booleans are True; strings are short words;
- float inputs are standard normal, seeded, so verification is reproducible.

A graph with random nodes (training-mode Dropout, Random*) is run twice; if the runs differ it
cannot be a reference and is refused with the nodes named.

The error of one output is max|got - ref| / max(max|ref|, 1e-6): relative to the output's
magnitude, so it means the same for logits and for hidden states. NaN and inf at the same
positions in both models match. An output over the tolerance still passes when it is within
`NOISE_MULTIPLE` times the original's own rounding noise (`noise_floor()`: onnxruntime's optimized
run of the original against its unoptimized run).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import sessions, weights
from onnxopt.errors import CompileError
from onnxopt.kernels.metrics import cosine  # noqa: F401  (part of this module's API)

DEFAULT_BATCH = 1
DEFAULT_DIM = 16
DEFAULT_TOLERANCE = 1e-4
_MAGNITUDE_FLOOR = 1e-6
# Retry sizes for dynamic dims when the original cannot run on DEFAULT_DIM: images (NCHW, H and W)
# take sizes that are multiples of 32 (detection backbones and feature pyramids downsample by 32);
# audio (float [T], [B, T] or [B, 1, T]) lengths that clear reflect padding and STFT windows, up to
# one second at 16 kHz; other sequences (token ids, features) stop at 512: 16000 tokens would make
# attention scores of gigabytes.
SIZE_LADDER = {"image": (224, 320, 640), "audio": (128, 512, 16000), "sequence": (128, 512)}
# Ops whose `strides` divide the spatial size (the graph's downsampling factor is their product).
_STRIDED = {"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"}
# A synthesized input larger than this is refused (a declared 2**40 dim must not become MemoryError).
MAX_SAMPLE_BYTES = 2 * 1024**3
# A compiled model whose error is within this multiple of the original's own rounding noise passes.
NOISE_MULTIPLE = 4.0
MAX_NOISE_FLOOR = 1e-2
# Extra runs of an original with random nodes before it is called deterministic.
DETERMINISM_RUNS = 3
# Ops through which an integer input still indexes the same table.
_INDEX_PRESERVING = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}
# Ops whose input at this index is a shape (or repeats): random values there mean nothing.
_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """'name:1,128' -> ('name', (1, 128))."""
    name, sep, dims = spec.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip() != "")
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise CompileError(f"bad --input-shape {spec!r}: expected NAME:D1,D2,... with positive integers")
    return name, shape


def is_dynamic(dim) -> bool:
    """A symbolic or unknown dimension, or a declared -1 or 0 (exporters write those for 'any')."""
    return not isinstance(dim, int) or dim <= 0


def _true_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if v.const_value is None]


def _itemsize(dtype: ir.DataType | None) -> int:
    if dtype is None or dtype == ir.DataType.STRING:
        return 8
    return max(1, int(np.ceil(dtype.itemsize)))


def _input_kind(v: ir.Value) -> str:
    """'image' for an NCHW-like input (rank 4, dynamic H and W), 'audio' for a float waveform
    ([T], [B, T], [B, 1, T]), else 'sequence'."""
    dims = v.shape.dims if v.shape is not None else ()
    if len(dims) == 4 and is_dynamic(dims[2]) and is_dynamic(dims[3]):
        return "image"
    floating = v.dtype is not None and v.dtype.is_floating_point()
    if floating and (len(dims) <= 2 or (len(dims) == 3 and dims[1] == 1)):
        return "audio"
    return "sequence"


def graph_hints(model: ir.Model) -> dict[str, list[int]]:
    """Sizes the graph itself suggests, tried before the fixed ladder.

    image: twice the largest downsampling factor (the product of Conv/Pool strides along a path),
    the smallest input whose deepest feature map is 2x2, a multiple of every stride; audio and
    sequences: the smallest power of two above the largest constant reflect padding (reflect
    padding needs more samples than it pads).
    """
    factor: dict[int, int] = {}
    deepest, widest_pad = 1, 0
    for node in model.graph:  # valid ONNX graphs are topologically sorted
        f = max((factor.get(id(v), 1) for v in node.inputs if v is not None), default=1)
        if node.op_type in _STRIDED:
            strides = node.attributes.get_ints("strides", None) or [1]
            f *= max(strides)
        for out in node.outputs:
            factor[id(out)] = f
        deepest = max(deepest, f)
        if node.op_type == "Pad" and node.attributes.get_string("mode", "constant") == "reflect":
            pads = node.attributes.get_ints("pads", None)
            if pads is None and len(node.inputs) > 1 and node.inputs[1] is not None:
                tensor = ir.convenience.get_const_tensor(node.inputs[1])
                pads = tensor.numpy().tolist() if tensor is not None else None
            widest_pad = max([widest_pad, *(int(p) for p in pads or [])])
    hints: dict[str, list[int]] = {"image": [], "audio": [], "sequence": []}
    if 2 * deepest > DEFAULT_DIM:
        hints["image"].append(2 * deepest)
    if widest_pad >= DEFAULT_DIM:
        size = 1 << widest_pad.bit_length()  # > widest_pad
        hints["audio"].append(size)
        hints["sequence"].append(size)
    return hints


def ladder(model: ir.Model) -> dict[str, tuple[int, ...]]:
    """Per input kind, the sizes to try after DEFAULT_DIM: the graph's hints, then SIZE_LADDER."""
    hints = graph_hints(model)
    return {kind: tuple(dict.fromkeys(hints[kind] + list(sizes))) for kind, sizes in SIZE_LADDER.items()}


def _dim_for(axis: int, kind: str, rung: int, sizes: dict[str, tuple[int, ...]]) -> int:
    if axis == 0:
        return DEFAULT_BATCH
    if rung == 0 or (kind == "image" and axis == 1):
        return DEFAULT_DIM
    sizes_of_kind = sizes[kind]
    return sizes_of_kind[min(rung, len(sizes_of_kind)) - 1]


def input_shapes(model: ir.Model, overrides: dict[str, tuple[int, ...]] | None = None,
                 rung: int = 0) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every true graph input (initializer-backed inputs keep their defaults).

    `rung` 0 is the first choice (batch 1, every other dynamic dim DEFAULT_DIM); rung k >= 1 takes
    the k-th size of `ladder(model)` for the input's kind (the retry ladder when the original model
    cannot run on the first choice). A symbolic name gets one value everywhere; overrides win.
    """
    sizes = ladder(model) if rung else SIZE_LADDER
    overrides = dict(overrides or {})
    inputs = _true_inputs(model)
    unknown = set(overrides) - {v.name for v in inputs}
    if unknown:
        names = ", ".join(v.name for v in inputs)
        raise CompileError(f"--input-shape names unknown input {sorted(unknown)[0]!r} (inputs: {names})")
    symbols: dict[str, int] = {}
    # Overrides pin symbolic dims, so other inputs sharing the symbol agree (input_ids and mask).
    for v in inputs:
        if v.name in overrides and v.shape is not None:
            if len(overrides[v.name]) != len(v.shape):
                raise CompileError(
                    f"--input-shape {v.name}: rank {len(overrides[v.name])} given, the model's input has rank {len(v.shape)}"
                )
            for d, n in zip(v.shape.dims, overrides[v.name]):
                if not is_dynamic(d) and d != n:
                    raise CompileError(f"--input-shape {v.name}: dimension {d} is fixed in the model, {n} given")
                if isinstance(d, ir.SymbolicDim) and d.value is not None:
                    symbols.setdefault(d.value, n)
    shapes = {}
    for v in inputs:
        if v.name in overrides:
            shapes[v.name] = tuple(overrides[v.name])
            continue
        if v.shape is None:
            raise CompileError(f"input {v.name!r} has no shape: give it with --input-shape {v.name}:D1,D2,...")
        kind = _input_kind(v)
        dims = []
        for axis, d in enumerate(v.shape.dims):
            if not is_dynamic(d):
                dims.append(d)
                continue
            default = _dim_for(axis, kind, rung, sizes)
            key = d.value if isinstance(d, ir.SymbolicDim) else None
            dims.append(symbols.setdefault(key, default) if key else default)
        shapes[v.name] = tuple(dims)
    for v in inputs:
        _check_sample_size(v, shapes[v.name], given=v.name in overrides)
    return shapes


def _check_sample_size(v: ir.Value, shape: tuple[int, ...], given: bool) -> None:
    nbytes = math.prod(shape) * _itemsize(v.dtype)
    if nbytes <= MAX_SAMPLE_BYTES:
        return
    what = "x".join(map(str, shape))
    dynamic = v.shape is not None and any(is_dynamic(d) for d in v.shape.dims)
    fix = (f"give a smaller --input-shape {v.name}:D1,D2,..." if dynamic or given
           else "give real inputs with --input-data FILE.npz, or --no-verify")
    raise CompileError(
        f"input {v.name!r}: a sample of shape {what} would take {nbytes / 2**30:.3g} GiB, over the "
        f"{MAX_SAMPLE_BYTES // 2**30} GiB limit for synthesized inputs; {fix}"
    )


def _uses_through(value: ir.Value, through: set[str]):
    """(node, input index) of every use of `value` and of what it flows into through `through` ops
    (as their first input)."""
    frontier, seen = [value], set()
    while frontier:
        v = frontier.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node, idx in v.uses():
            yield node, idx
            if node.op_type in through and idx == 0:
                frontier.extend(node.outputs)


def _index_range(value: ir.Value) -> int | None:
    """Size of the smallest constant table `value` indexes through Gather, if any."""
    highs = []
    for node, idx in _uses_through(value, _INDEX_PRESERVING):
        if node.op_type == "Gather" and idx == 1:
            table = node.inputs[0]
            if table is not None and table.const_value is not None and table.shape is not None:
                dim = table.shape[node.attributes.get_int("axis", 0)]
                if isinstance(dim, int):
                    highs.append(dim)
    return min(highs) if highs else None


def shape_use(value: ir.Value) -> str | None:
    """"Reshape's shape" when the input is (through Cast/Identity/...) a shape tensor of an op."""
    for node, idx in _uses_through(value, {"Cast", "Identity", "Concat", "Squeeze", "Unsqueeze"}):
        if _SHAPE_INPUTS.get(node.op_type) == idx:
            return f"{node.op_type}'s {'shape' if node.op_type != 'Tile' else 'repeats'}"
    return None


def synthesize_feeds(
    model: ir.Model, overrides: dict[str, tuple[int, ...]] | None = None, seed: int = 0, rung: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = input_shapes(model, overrides, rung)
    feeds = {}
    for v in model.graph.inputs:
        if v.name not in shapes:
            continue
        shape = shapes[v.name]
        if v.dtype is None:
            raise CompileError(f"input {v.name!r} has no element type")
        if v.dtype == ir.DataType.STRING:
            # Any text will do for string ops (tokenizers, label maps): short distinct words.
            words = np.array([f"w{i % 7}" for i in range(math.prod(shape))], dtype=object)
            feeds[v.name] = words.reshape(shape)
            continue
        dtype = v.dtype.numpy()
        if v.dtype == ir.DataType.BOOL:
            feeds[v.name] = np.ones(shape, dtype=bool)
        elif v.dtype.is_integer():
            if "mask" in v.name.lower() or shape_use(v):
                # Ones broadcast to anything (Expand, Tile) and keep masks open.
                feeds[v.name] = np.ones(shape, dtype=dtype)
            else:
                high = _index_range(v) or 2
                feeds[v.name] = rng.integers(0, high, size=shape).astype(dtype)
        elif v.dtype.is_floating_point():
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        else:
            raise CompileError(
                f"input {v.name!r}: cannot synthesize values of type {v.dtype}; give real inputs with --input-data FILE.npz"
            )
    return feeds


def load_input_data(model: ir.Model, data) -> dict[str, np.ndarray]:
    """The user's own sample (`--input-data FILE.npz`, or a feed dict): one array per true input."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            raise CompileError(f"--input-data {path}: no such file") from None
        except Exception as exc:
            raise CompileError(f"--input-data {path}: not a readable .npz file ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CompileError("input_data must be an .npz path or a dict of input name -> array")
    inputs = {v.name: v for v in _true_inputs(model)}
    missing = [n for n in inputs if n not in data]
    extra = sorted(set(data) - set(inputs))
    if missing or extra:
        what = f"has no array for input {missing[0]!r}" if missing else f"names unknown input {extra[0]!r}"
        raise CompileError(f"--input-data {what} (inputs: {', '.join(inputs)})")
    feeds = {}
    for name, v in inputs.items():
        arr = np.asarray(data[name])
        if v.dtype is not None and v.dtype != ir.DataType.STRING:
            want = np.dtype(v.dtype.numpy())
            if arr.dtype != want:
                if not np.can_cast(arr.dtype, want, "same_kind"):
                    raise CompileError(f"--input-data {name}: {arr.dtype} given, the model takes {want}")
                arr = arr.astype(want)
        if v.shape is not None:
            dims = v.shape.dims
            if arr.ndim != len(dims) or any(not is_dynamic(d) and d != n for d, n in zip(dims, arr.shape)):
                declared = "x".join(str(d) for d in dims)
                raise CompileError(f"--input-data {name}: shape {'x'.join(map(str, arr.shape))} given, the model declares {declared}")
        feeds[name] = arr
    return feeds


def session(model: onnx.ModelProto | ir.Model | str | os.PathLike, providers=("CPUExecutionProvider",),
            optimize: bool = False, threads: int | None = None):
    """An onnxruntime session with every graph optimization off (`optimize`: all on, as deployed;
    for measuring what the fused and integer kernels compute); `threads` intra-op threads (None:
    onnxruntime's default)."""
    # Verification runs once: pre-packing weights would only add a copy and startup time.
    options = sessions.options(optimize=optimize, prepacking=False, threads=threads)
    if isinstance(model, ir.Model):
        return weights.session_from_parts(session_parts(model), options, providers)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return sessions.session(model, options, providers)


def session_parts(model: ir.Model) -> tuple:
    """The picklable parts of `session(model)` (weights.session_parts), for sessions made elsewhere
    (calibration workers, onnxopt.scaleout) that must compute exactly what this process would."""
    return weights.session_parts(model, edit=_relax_declared_dims)


def session_from_parts(parts, optimize: bool = False, threads: int | None = None,
                       providers=("CPUExecutionProvider",)):
    return weights.session_from_parts(parts, sessions.options(optimize=optimize, prepacking=False, threads=threads),
                                      providers)


def _relax_declared_dims(proto: onnx.ModelProto) -> None:
    """A declared 0 dim of a graph input or output becomes symbolic for the session.

    Exporters write 0 (and -1) for "any size"; onnxruntime takes -1 so but insists on a literal 0,
    so a model declaring [0, 3] could run only on empty samples. Original and compiled model get
    the same treatment, so the comparison is unaffected; the emitted model keeps its declaration.
    """
    for i, v in enumerate([*proto.graph.input, *proto.graph.output]):
        for j, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.dim_param = f"onnxopt_unknown_{i}_{j}"


def run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        return _run_session(_session_or_fail(model), feeds)
    except _RunFailed as exc:
        raise CompileError(f"onnxruntime cannot run the model: {exc}") from None




def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Ops whose outputs differ from run to run (Dropout only when training_mode is on).
_RANDOM_OPS = {"Dropout", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli"}


@dataclasses.dataclass
class Reference:
    """The original model's outputs on the sample it ran on, and how that sample was found."""

    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    source: str  # "synthesized" or "input_data"
    tried: list[dict[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)  # shapes it failed on


def reference(model: ir.Model, overrides: dict[str, tuple[int, ...]] | None = None,
              input_data=None) -> Reference:
    """Run the original on the user's sample (`input_data`) or on synthesized inputs.

    Synthesized inputs start at batch 1 and DEFAULT_DIM; when the model cannot run on them (a
    feature pyramid needs a multiple of 32, reflect padding needs more samples than the pad), the
    dynamic dims climb SIZE_LADDER (per input kind) and the first sample the model runs on is
    used. Dims fixed by the model or pinned by `overrides` never change. A model that gives two
    different answers on the same sample is refused with the nodes that make it random.
    """
    sess = _session_or_fail(model)
    if input_data is not None:
        feeds = load_input_data(model, input_data)
        try:
            outputs = _run_session(sess, feeds)
        except _RunFailed as exc:
            raise CompileError(f"onnxruntime cannot run the model on --input-data: {exc}") from None
        _check_deterministic(model, sess, feeds, outputs)
        return Reference(feeds, outputs, "input_data")
    pinned = set(overrides or {})
    dynamic = [v for v in _true_inputs(model) if v.name not in pinned
               and (v.shape is None or any(is_dynamic(d) for d in v.shape.dims))]
    rungs = range(max(map(len, ladder(model).values())) + 1) if dynamic else range(1)
    tried: list[dict[str, tuple[int, ...]]] = []
    complaints: list[str] = []
    for rung in rungs:
        try:
            shapes = input_shapes(model, overrides, rung)
        except CompileError:
            if rung == 0:
                raise
            break  # the ladder's larger sizes would exceed the sample size limit
        if shapes in tried:
            continue  # a kind whose ladder is shorter stays at its last size
        feeds = synthesize_feeds(model, overrides, rung=rung)
        try:
            outputs = _run_session(sess, feeds)
        except _RunFailed as exc:
            tried.append(shapes)
            complaints.append(str(exc))
            continue
        _check_deterministic(model, sess, feeds, outputs)
        return Reference(feeds, outputs, "synthesized", tried)
    raise CompileError(_cannot_run(model, dynamic, tried, complaints[0]))


def _cannot_run(model: ir.Model, dynamic: list[ir.Value], tried: list[dict], complaint: str) -> str:
    parts = [f"onnxruntime cannot run the model on synthesized inputs: {complaint}"]
    if dynamic:
        names = [v.name for v in dynamic]
        shapes = "; ".join(f"{n}: " + ", ".join("x".join(map(str, t[n])) for t in tried) for n in names)
        parts.append(f" (tried {shapes})")
    shaped = [(v.name, use) for v in _true_inputs(model) if (use := shape_use(v))]
    if shaped:
        name, use = shaped[0]
        parts.append(f"; input {name!r} is {use}, which synthesized values cannot know")
    scalars = [v.name for v in _true_inputs(model) if v.shape is not None and v.shape.rank() == 0
               and v.dtype is not None and v.dtype.is_integer() and v.name not in dict(shaped)]
    if scalars:
        parts.append(f"; input {scalars[0]!r} is an integer scalar, which may have to be one particular value "
                     "(a sample rate, a count) that cannot be synthesized")
    hint = f"--input-shape {dynamic[0].name}:D1,D2,... or " if dynamic else ""
    parts.append(f"; give {hint}real inputs with --input-data FILE.npz")
    return "".join(parts)


class _RunFailed(Exception):
    pass


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def _complaint(exc: Exception) -> str:
    return _ORT_PREFIX.sub("", _first_line(exc))


def _session_or_fail(model):
    try:
        return session(model)
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError(f"onnxruntime cannot run the model: {_complaint(exc)}") from None


def _run_session(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, feeds)))
    except Exception as exc:
        raise _RunFailed(_complaint(exc)) from None


def random_nodes(model: ir.Model) -> list[str]:
    """Nodes (in any subgraph) whose outputs may differ between runs: 'Dropout d1 (training_mode)'."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in _RANDOM_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Dropout":
            mode = node.inputs[2] if len(node.inputs) > 2 else None
            if mode is None:
                continue
            const = ir.convenience.get_const_tensor(mode)
            if const is not None and not bool(const.numpy()):
                continue
            found.append(f"Dropout {node.name or '?'} (training_mode)")
        else:
            found.append(f"{node.op_type} {node.name or '?'}")
    return found


def _check_deterministic(model: ir.Model, sess, feeds, outputs) -> None:
    """A second run when the graph has random nodes; different answers cannot be a reference."""
    nodes = random_nodes(model)
    if not nodes:
        return
    # A few runs: a small output can come out of two different masks the same by chance.
    for _ in range(DETERMINISM_RUNS):
        again = _run_session(sess, feeds)
        differ = [n for n in outputs if not np.array_equal(outputs[n], again[n], equal_nan=_inexact(outputs[n]))]
        if differ:
            break
    else:
        return
    listed = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
    raise CompileError(
        f"the original model is not deterministic: two runs on the same inputs differ in output {differ[0]!r} "
        f"(random nodes: {listed}); export it in inference mode (model.eval()), or pass --inference-dropout "
        "to remove training-mode Dropout"
    )


def _inexact(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.inexact)


def noise_floor(model: ir.Model, feeds: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """The original's own rounding noise per output: onnxruntime with all its graph optimizations
    (fusions, other kernels) against the unoptimized reference, as a relative error."""
    if random_nodes(model):
        return {}
    try:
        got = _run_session(session(model, optimize=True), feeds)
    except Exception:
        return {}
    # A difference this large is not rounding (a different algorithm, or a bug): no floor.
    return {d.name: d.rel for d in compare(ref, got, tolerance=float("inf"))
            if np.isfinite(d.rel) and d.rel <= MAX_NOISE_FLOOR}


@dataclasses.dataclass
class OutputDiff:
    name: str
    max_abs: float
    rel: float
    ok: bool
    note: str = ""
    cosine: float | None = None


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tolerance: float) -> list[OutputDiff]:
    diffs = []
    for name, r in ref.items():
        g = got.get(name)
        if g is None:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), False, "output missing"))
            continue
        if g.shape != r.shape or g.dtype != r.dtype:
            diffs.append(
                OutputDiff(name, float("inf"), float("inf"), False, f"{g.dtype}{list(g.shape)} != {r.dtype}{list(r.shape)}")
            )
            continue
        if not np.issubdtype(r.dtype, np.inexact):
            bad = int(np.count_nonzero(g != r))
            diffs.append(OutputDiff(name, float(bad), float(bad), bad == 0, "exact compare"))
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        # NaN and inf at the same positions (with the same sign for inf) match: the original computes them too.
        if not np.array_equal(np.isfinite(r64), np.isfinite(g64)) or not np.array_equal(
            r64[~np.isfinite(r64)], g64[~np.isfinite(g64)], equal_nan=True
        ):
            diffs.append(OutputDiff(name, float("inf"), float("inf"), False, "non-finite values differ"))
            continue
        finite = np.isfinite(r64)
        err = float(np.max(np.abs(g64 - r64)[finite])) if finite.any() else 0.0
        scale = max(float(np.max(np.abs(r64[finite]))) if finite.any() else 0.0, _MAGNITUDE_FLOOR)
        diffs.append(OutputDiff(name, err, err / scale, err / scale <= tolerance))
    return diffs


def signature(model: ir.Model, initializer_inputs: bool = True) -> dict:
    """Names, element types and shapes of the graph inputs and outputs: the model's interface."""

    def describe(v: ir.Value):
        shape = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape.dims]
        return {"name": v.name, "dtype": str(v.dtype), "shape": shape}

    return {
        "inputs": [describe(v) for v in model.graph.inputs if initializer_inputs or v.const_value is None],
        "outputs": [describe(v) for v in model.graph.outputs],
    }
