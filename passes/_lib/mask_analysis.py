"""What an attention block's additive mask means (a helper module: it registers no pass).

Exporters build the mask added to the attention scores in many ways: `(1 - mask) * -10000`,
`Where(bool_mask, 0, finfo.min)` over an index grid built with Range/Gather/GatherND/And (the
vmap-style masks of transformers 5), Trilu or a sliced triangular constant for causal decoders,
`Where(causal, scores, finfo.min)` instead of an Add. Matching each of those structurally is
brittle, so this module checks what the mask computes:

1. The mask terms' cone (everything they are computed from) may read the values of at most one
   graph input M, which must be a 2-D integer or bool tensor (the 0/1 attention_mask), plus
   constants and the *shapes* of other values. Each shape it reads must be a known function of
   the block's batch, query-length and key-length dims (proved with SymbolicShapes), and M's dims
   must be (batch, key length).
2. The cone is evaluated (onnx's reference evaluator) on several batch/length sizes with 0/1
   masks of different patterns (all ones, zeros at the end, at the start, random), and the total
   additive mask must be, on every probe, exactly 0 where a key is kept and <= -1e4 where it is
   masked, with "kept" one of: M[b, k] = 1 (padding mask), M[b, k] = 1 and k <= q (causal with
   padding), k <= q (causal, no M). Anything else is declined with what was found.

This is evidence on probes, not a proof; it is sound for every mask computation that is a
function of (M, batch, lengths) agreeing with the pattern on the probed sizes, which is what
exporters emit. The precondition the fused kernels add is that M holds only 0 and 1 (the
attention_mask contract): other values (2, -1) are read as "keep" by onnxruntime.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
from onnx import reference

from onnxopt.passes._lib.symbolic_shapes import Dim, SymbolicShapes

MAX_CONE_NODES = 400
# A masked score must be at least this negative: exp(s - 1e4) is 0 in float32 for any score s
# within 1e4 - 104 of the row maximum, so every such fill value gives the same probabilities.
MASKED_AT_MOST = -1.0e4
_INT_MASK_TYPES = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.INT8, ir.DataType.UINT8)


@dataclasses.dataclass
class MaskTerm:
    """One contribution to the scores: `Add(scores, value)` or `Where(cond, scores, fill)`."""

    value: ir.Value
    fill: float | None = None  # for a Where term: value is the condition, `fill` where not kept
    keep_when: bool = True  # a Where term keeps the score where the condition equals this


@dataclasses.dataclass
class MaskInfo:
    input: ir.Value | None  # the 2-D 0/1 graph input M, or None (causal mask only)
    causal: bool
    filter_value: float  # the fill read from the graph (finite)


class MaskError(Exception):
    """A mask the fused kernels cannot express; the message says why."""


def _cone(terms: list[MaskTerm]):
    """Nodes computing the terms (topological), value inputs read, and Shape/Size leaves."""
    nodes: list[ir.Node] = []
    seen: set[ir.Node] = set()
    inputs: list[ir.Value] = []
    stack = [t.value for t in terms]
    visited: set[ir.Value] = set()
    while stack:
        v = stack.pop()
        if v is None or v in visited:
            continue
        visited.add(v)
        if v.is_graph_input():
            if v not in inputs:
                inputs.append(v)
            continue
        if v.const_value is not None:
            continue
        node = v.producer()
        if node is None:
            raise MaskError(f"mask value {v.name!r} has no producer")
        if node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        if len(nodes) > MAX_CONE_NODES:
            raise MaskError(f"the mask computation is larger than {MAX_CONE_NODES} nodes")
        if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
            continue  # reads only the shape of its input
        if node.domain not in ("", "ai.onnx"):
            raise MaskError(f"the mask is computed with {node.domain}.{node.op_type}")
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise MaskError(f"the mask is computed with a {node.op_type} subgraph")
        stack.extend(node.inputs)
    order = {id(n): i for i, n in enumerate(nodes[0].graph)} if nodes else {}
    nodes.sort(key=lambda n: order.get(id(n), 0))
    return nodes, inputs


def _bind(dim: Dim | None, binding: dict[int, int]) -> int | None:
    if dim is None:
        return None
    value = dim.coef
    for s in dim.syms:
        if s not in binding:
            return None
        value *= binding[s]
    return value


def _probe_masks(rng, batch: int, length: int, dtype) -> list[np.ndarray]:
    rows = [np.ones(length)]
    if length > 1:
        end = np.ones(length)
        end[length - max(1, length // 3) :] = 0
        start = np.ones(length)
        start[: max(1, length // 3)] = 0
        rows += [end, start]
    rows += [(rng.random(length) > 0.5).astype(float) for _ in range(2)]
    masks = []
    for shift in range(len(rows)):
        m = np.stack([rows[(shift + b) % len(rows)] for b in range(batch)])
        masks.append(m.astype(dtype))
    return masks


def analyze(
    terms: list[MaskTerm],
    shapes: SymbolicShapes,
    batch: Dim,
    q_len: Dim,
    kv_len: Dim,
    heads: int,
) -> MaskInfo:
    """Check what the additive mask terms compute; raise MaskError with the reason if unsupported."""
    nodes, inputs = _cone(terms)
    if len(inputs) > 1:
        names = ", ".join(repr(v.name) for v in inputs)
        raise MaskError(f"the mask reads the values of several graph inputs ({names})")
    mask_input = inputs[0] if inputs else None
    if mask_input is not None:
        dims = shapes.dims(mask_input)
        if mask_input.dtype not in _INT_MASK_TYPES:
            raise MaskError(
                f"the mask is derived from graph input {mask_input.name!r} of type {mask_input.dtype}, "
                "not a 2-D integer/bool 0/1 attention_mask"
            )
        if any(u.node.op_type in ("Gather", "GatherElements", "GatherND") and u.idx == 1 for u in mask_input.uses()):
            # Token ids index embeddings; a 0/1 mask does not. The kernels read "> 0" as "keep",
            # which equals the exporter's arithmetic only on 0/1 values.
            raise MaskError(f"the mask is derived from {mask_input.name!r}, which is also used as gather indices "
                            "(token ids, not a 0/1 attention_mask)")
        if dims is None or len(dims) != 2:
            raise MaskError(f"the mask is not derived from a 2-D attention_mask input ({mask_input.name!r} has rank "
                            f"{None if dims is None else len(dims)})")
        if dims[0] != batch or dims[1] != kv_len:
            raise MaskError(
                f"attention_mask {mask_input.name!r} dims {list(dims)} are not proven to be the block's "
                f"(batch, key length) {[batch, kv_len]}"
            )

    # Symbols to choose sizes for: batch, query and key lengths (possibly the same symbol).
    symbols = sorted({s for d in (batch, q_len, kv_len) for s in d.syms})
    if any(len(d.syms) > 1 for d in (batch, q_len, kv_len)):
        raise MaskError("the block's batch or length is a product of dims")
    sizes = [(2, 6), (3, 5), (1, 7)]
    configs = []
    for b_size, s_size in sizes:
        binding: dict[int, int] = {}
        for d, size in ((batch, b_size), (q_len, s_size), (kv_len, s_size)):
            if d.syms:
                binding.setdefault(d.syms[0], size)
        configs.append(binding)
    if not symbols:
        configs = configs[:1]

    leaves = {}
    for node in nodes:
        if node.op_type in ("Shape", "Size"):
            leaves[node.outputs[0]] = node
    node_set = {n for n in nodes if n.op_type not in ("Shape", "Size")}
    model_opset = nodes[0].graph.opset_imports.get("", 17) if nodes else 17

    rng = np.random.default_rng(0)
    found: set[str] | None = None
    masked_values: list[np.ndarray] = []
    for binding in configs:
        b, q, k = (_bind(d, binding) for d in (batch, q_len, kv_len))
        feeds = {}
        for value, node in leaves.items():
            dims = shapes.dims(node.inputs[0])
            if dims is None:
                raise MaskError(f"the mask reads the shape of {node.inputs[0].name!r}, whose rank is unknown")
            concrete = [_bind(d, binding) for d in dims]
            if node.op_type == "Size":
                if any(c is None for c in concrete):
                    raise MaskError(f"the mask reads the size of {node.inputs[0].name!r}, not a function of the block's dims")
                feeds[value.name] = np.array(int(np.prod(concrete)), dtype=np.int64)
                continue
            start = node.attributes.get("start")
            end = node.attributes.get("end")
            picked = concrete[slice(start.value if start else 0, end.value if end else None)]
            if any(c is None for c in picked):
                raise MaskError(
                    f"the mask reads the shape of {node.inputs[0].name!r}, which is not proven to be a function of "
                    "the block's batch and sequence lengths"
                )
            feeds[value.name] = np.array(picked, dtype=np.int64)
        masks = (
            _probe_masks(rng, b, k, mask_input.dtype.numpy())
            if mask_input is not None
            else [None]
        )
        for m in masks:
            run_feeds = dict(feeds)
            if mask_input is not None:
                run_feeds[mask_input.name] = m
            total = _evaluate(nodes, node_set, leaves, terms, run_feeds, mask_input, model_opset)
            try:
                total = np.broadcast_to(total, np.broadcast_shapes(total.shape, (b, 1, q, k)))
            except ValueError:
                raise MaskError(f"the mask of shape {list(total.shape)} does not broadcast to the scores") from None
            if total.ndim != 4 or total.shape[1] not in (1, heads):
                raise MaskError(f"the mask has shape {list(total.shape)}, not (batch, 1|heads, q, k)")
            if not (total == total[:, :1]).all():
                raise MaskError("the mask differs between heads")
            total = total[:, 0]
            kept = total == 0
            pad = np.ones((b, 1, k), bool) if m is None else (m != 0)[:, None, :]
            pad = np.broadcast_to(pad, (b, q, k))
            causal = np.arange(k)[None, :] <= (np.arange(q)[:, None] + (k - q))
            if m is None:
                patterns = {"none": pad, "causal": pad & causal[None]}
            else:
                patterns = {"padding": pad, "causal": pad & causal[None]}
            matching = {name for name, p in patterns.items() if (kept == p).all()}
            if not matching:
                raise MaskError(_describe_mismatch(kept, patterns))
            found = matching if found is None else found & matching
            masked = total[~kept]
            if masked.size and not (masked <= MASKED_AT_MOST).all():
                worst = float(masked.max())
                raise MaskError(f"a masked score gets {worst:g}, not a large negative value (<= {MASKED_AT_MOST:g})")
            masked_values.append(masked)
    if not found:
        raise MaskError("the mask is neither a padding mask nor a causal mask on every probe")
    # When probes cannot tell (a length of 1), the mask without causal structure wins.
    causal = not ({"padding", "none"} & found)
    if mask_input is None and not causal:
        # No input and no causal structure: the mask keeps every key; nothing to express.
        return MaskInfo(None, False, -10000.0)
    allv = np.concatenate([v.reshape(-1) for v in masked_values]) if masked_values else np.zeros(0)
    finite = allv[np.isfinite(allv)]
    # The fill the exporter wrote; -inf becomes float32's lowest, which onnxruntime can add
    # without producing NaN for a partly masked row.
    fill = float(finite.max()) if finite.size else float(np.finfo(np.float32).min)
    return MaskInfo(mask_input, causal, fill)


def _describe_mismatch(kept, patterns) -> str:
    pad = patterns.get("padding")
    if pad is not None and (kept == ~pad).all():
        return "the mask keeps the keys where attention_mask is 0 (inverted mask)"
    return "the mask is neither attention_mask's padding (keep where mask = 1) nor causal (keep k <= q)"


def _evaluate(nodes, node_set, leaves, terms, feeds, mask_input, opset) -> np.ndarray:
    """Run the mask cone with onnx's reference evaluator; returns the summed additive mask."""
    inits = {}
    for node in node_set:
        for v in node.inputs:
            if v is not None and not v.is_graph_input() and v.producer() is None and v.const_value is not None:
                inits[v.name] = v
    proto_nodes = [ir.serde.serialize_node(n) for n in nodes if n in node_set]
    outputs = []
    for t in terms:
        if t.value.const_value is not None and t.value.producer() is None and not t.value.is_graph_input():
            inits[t.value.name] = t.value
        outputs.append(t.value.name)
    graph_inputs = [onnx.helper.make_tensor_value_info(name, _onnx_type(arr.dtype), list(arr.shape)) for name, arr in feeds.items()]
    graph = onnx.helper.make_graph(
        proto_nodes,
        "mask_probe",
        graph_inputs,
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in dict.fromkeys(outputs)],
        [ir.serde.serialize_tensor(v.const_value) for v in inits.values()],
    )
    for init, name in zip(graph.initializer, inits):
        init.name = name
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        results = dict(zip(dict.fromkeys(outputs), reference.ReferenceEvaluator(model).run(None, feeds)))
    except Exception as exc:  # noqa: BLE001 - any evaluation failure means we cannot check the mask
        raise MaskError(f"the mask computation could not be evaluated on probe sizes ({type(exc).__name__})") from None
    total = np.zeros((), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in terms:
            r = np.asarray(results[t.value.name])
            if t.fill is None:
                if r.dtype.kind != "f":
                    raise MaskError("the additive mask is not a float tensor")
                total = total + r.astype(np.float32)
            else:
                keep = r.astype(bool) == t.keep_when
                total = total + np.where(keep, np.float32(0), np.float32(t.fill))
    return total


def _onnx_type(dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
