"""Dependency groups for structured pruning, found by walking uses and producers.

A group is a set of units (channels, FFN neurons, attention heads) and every tensor axis that
holds them: removing a unit removes its elements from all of them at once. The walk starts at a
producer's output (Conv output channels, MatMul / Gemm output columns, a fused com.microsoft
Attention's heads) and follows every use and every producer of every member tensor.

Each member records a Layout: the axis holding the units, the unit id at each position of that
axis, the elements per position (`sub`: e.g. the head size on the flat [B, S, H*dh] axis) and a
repeat count above them (`outer`: e.g. the batch in a [B*H, S, dh] reshape). Unit ids that must go
together are tied (a union-find): Q, K and V heads meet in the scores MatMul, the three parts of a
merged QKV projection meet so. The group's units are the classes of tied ids, numbered in the
order the consumers read them. The walk knows:

* per-element ops pass the axis on: unary activations (Relu, Clip, Sigmoid, HardSwish, Erf, IsNaN,
  ..., BiasGelu/FastGelu with their bias sliced), inference BatchNormalization (its constants
  sliced), Pad of other axes, pools, reductions over other axes (SE squeezes), Softmax or
  LayerNormalization over other axes, grouped Conv (depthwise included: whole groups, so units of one
  channel become units of a group's channels; weights, bias and `group` sliced), Add/Sub/Mul/Div/Pow
  and Where with constants (sliced where they have the axis) or with other activations: an
  activation with the axis joins the group (residual Adds couple a whole residual stream, SE gates
  couple the expand Conv with the block it gates), one broadcast along it does not;
* layout changes: Transpose (the axis moves), Reshape (the units keep their flat stride; a split
  of [.., H*dh] into [.., H, dh] makes the units whole heads; the target shape, a constant or a
  Concat of pieces such as Shape/Gather of dynamic axes, is re-evaluated for the kept units and
  its constant entry rewritten where it does not follow by itself, e.g. H -> kept heads, H*dh ->
  kept * dh), Shape reads (allowed only where what they compute does not change, or feeds such a
  Reshape), the attention core (MatMul of two activations with the units on a batch axis: scores
  and context), com.microsoft MultiHeadAttention (Q, K, V heads tied; num_heads and the packed
  bias updated), Concat along the axis (each input its own range of units) and Split along it
  (each output a range: the sizes rewritten);
* consumers end the walk: Conv input channels (group 1), MatMul / Gemm rows, Flatten -> Gemm /
  MatMul blocks of rows.

Anything else touching a member (a LayerNorm reducing over the axis, a graph input or output, a
computed shape that does not follow the units) declines the whole group with the reason; nothing
is skipped silently.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.passes._lib.graph import constant_array as _constant_array


def constant_array(value):
    """A constant's array, looking through the Identity nodes the legacy exporter shares weights with."""
    return _constant_array(value, through_identity=True)

UNARY = {"Relu", "Sigmoid", "Tanh", "Erf", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Gelu",
         "Softplus", "Neg", "Abs", "Identity", "Clip", "Sqrt", "Exp", "PRelu", "IsNaN", "IsInf", "Not", "Cast",
         "Reciprocal", "Log"}
MS_UNARY_BIAS = {"BiasGelu", "FastGelu", "Gelu", "QuickGelu"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Where"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1"}
SOFTMAX = {"Softmax", "LogSoftmax"}
# Ops of shape arithmetic that _evaluate computes.
SHAPE_OPS = {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Add", "Sub", "Mul",
             "Div", "Neg", "Abs", "Max", "Min", "Sqrt", "Reciprocal"}


class Decline(Exception):
    """A group cannot be pruned; the message says why."""


@dataclasses.dataclass
class Layout:
    """Where a member holds the units: `units[p]` is the unit id at position p of `axis`, each
    position `sub` elements wide, the whole axis `outer` repetitions of the positions."""

    axis: int
    sub: int
    units: list
    outer: int = 1

    def size(self) -> int:
        return self.outer * len(self.units) * self.sub

    def moved(self, axis: int) -> "Layout":
        return Layout(axis, self.sub, self.units, self.outer)


@dataclasses.dataclass
class Producer:
    node: ir.Node
    kind: str  # conv | matmul | gemm | attention


@dataclasses.dataclass
class Consumer:
    node: ir.Node
    kind: str  # conv | matmul | gemm
    block: int  # rows of the consumer's [K, N] weight per channel (k*k for Conv, spatial size after Flatten)
    flatten: ir.Node | None = None
    layout: Layout | None = None  # how its input holds the units


@dataclasses.dataclass
class ConstSlice:
    node: ir.Node
    index: int
    axis: int
    layout: Layout | None = None


@dataclasses.dataclass
class Group:
    channels: int
    unit: int = 1  # channels per unit (head size for attention heads)
    members: dict = dataclasses.field(default_factory=dict)  # id(value) -> (value, Layout)
    producers: list = dataclasses.field(default_factory=list)
    consumers: list = dataclasses.field(default_factory=list)
    slices: list = dataclasses.field(default_factory=list)
    depthwise: list = dataclasses.field(default_factory=list)
    reason: str | None = None
    start: ir.Node | None = None
    core: list = dataclasses.field(default_factory=list)  # attention-core nodes whose MACs scale with the heads
    mha: list = dataclasses.field(default_factory=list)  # com.microsoft MultiHeadAttention nodes
    reshapes: list = dataclasses.field(default_factory=list)  # Reshape nodes whose data is a member
    splits: list = dataclasses.field(default_factory=list)  # Split nodes along the units' axis
    shape_reads: list = dataclasses.field(default_factory=list)  # Shape nodes reading a member
    concat: bool = False
    parent: list = dataclasses.field(default_factory=list)  # union-find over unit ids
    klass: list = dataclasses.field(default_factory=list)  # unit id -> unit index (after _finish)
    probe: object = None  # shape_of the group was found with

    @property
    def units(self) -> int:
        return self.channels // self.unit

    @property
    def kind(self) -> str:
        if any(p.kind == "attention" for p in self.producers) or self.mha or (self.core and self.unit > 1):
            return "heads"
        if self.concat:
            return "concatenated channels"
        if self.splits:
            return "split channels"
        if len(self.producers) > 1:
            return "residual stream"
        if self.producers and self.producers[0].kind == "conv":
            return "channels"
        return "neurons"

    def describe(self) -> str:
        node = self.start
        return f"{self.kind} of {node.op_type} {node.name!r}" if node is not None else self.kind

    # ---- unit ids ----

    def new_ids(self, n: int) -> list:
        first = len(self.parent)
        self.parent.extend(range(first, first + n))
        return list(range(first, first + n))

    def find(self, u: int) -> int:
        while self.parent[u] != u:
            self.parent[u] = self.parent[self.parent[u]]
            u = self.parent[u]
        return u

    def tie(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def layouts(self):
        yield from (lay for _, lay in self.members.values())
        yield from (s.layout for s in self.slices)

    def coarsen(self, f: int) -> None:
        """Make every unit f consecutive old units (a head of f channels)."""
        if f == 1:
            return
        if len(self.parent) % f:
            raise Decline(f"{len(self.parent)} units do not split into blocks of {f}")
        for lay in self.layouts():
            u = lay.units
            if len(u) % f or any(u[i] != u[i - i % f] + i % f or u[i - i % f] % f for i in range(len(u))):
                raise Decline(f"the units cannot be taken {f} at a time (a head split of unaligned channels)")
        for lay in {id(lay): lay for lay in self.layouts()}.values():
            lay.units = [lay.units[i] // f for i in range(0, len(lay.units), f)]
            lay.sub *= f
        old = [self.find(u) for u in range(len(self.parent))]
        self.parent = list(range(len(self.parent) // f))
        for u, r in enumerate(old):
            self.tie(u // f, r // f)
        self.unit *= f

    def kept_positions(self, lay: Layout, kept: set) -> np.ndarray:
        """Indices along the layout's axis of the elements of the kept units."""
        pos = [p for p, u in enumerate(lay.units) if self.klass[self.find(u)] in kept]
        n, s = len(lay.units), lay.sub
        idx = [(o * n + p) * s + j for o in range(lay.outer) for p in pos for j in range(s)]
        return np.asarray(idx, dtype=np.int64)


def producer_kind(node: ir.Node) -> str | None:
    if node.domain in ("", "ai.onnx"):
        if node.op_type == "Conv":
            return "conv"
        if node.op_type == "MatMul" and constant_array(node.inputs[1]) is not None:
            return "matmul"
        if node.op_type == "Gemm":
            return "gemm"
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        return "attention"
    return None


def _owned_const(node: ir.Node, i: int, what: str) -> np.ndarray:
    """The constant input i of node, which pruning may replace: not shared, not overridable."""
    v = node.inputs[i] if i < len(node.inputs) else None
    a = constant_array(v)
    if a is None:
        raise Decline(f"{what} of {node.op_type} {node.name!r} is not a constant")
    return a


def _check_producer(node: ir.Node, kind: str, shape) -> int:
    """Validate a producer; return its output's channel axis."""
    if kind == "conv":
        if node.attributes.get_int("group", 1) != 1:
            raise Decline(f"grouped Conv {node.name!r} (group {node.attributes.get_int('group', 1)}) produces the channels")
        _owned_const(node, 1, "weight")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            _owned_const(node, 2, "bias")
        return 1
    if kind == "matmul":
        w = _owned_const(node, 1, "weight")
        if w.ndim != 2:
            raise Decline(f"MatMul {node.name!r} has a rank-{w.ndim} weight")
        return len(shape) - 1
    if kind == "gemm":
        if node.attributes.get_int("transA", 0):
            raise Decline(f"Gemm {node.name!r} has transA=1")
        _owned_const(node, 1, "weight")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = _owned_const(node, 2, "bias")
            if c.ndim == 2 and c.shape[0] != 1:
                raise Decline(f"Gemm {node.name!r} has a 2-D bias")
        return 1
    # com.microsoft Attention
    w = _owned_const(node, 1, "packed QKV weight")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        _owned_const(node, 2, "packed QKV bias")
    extra = [v for v in list(node.inputs)[4:] if v is not None]
    if extra or node.attributes.get("qkv_hidden_sizes") is not None:
        raise Decline(f"Attention {node.name!r} has past state, attention bias or qkv_hidden_sizes")
    if any(o.uses() or o.is_graph_output() for o in list(node.outputs)[1:]):
        raise Decline(f"Attention {node.name!r} returns its present state")
    if w.ndim != 2 or w.shape[1] % 3:
        raise Decline(f"Attention {node.name!r} weight {list(w.shape)} is not a packed [D, 3D] QKV weight")
    return len(shape) - 1


def _consumer(node: ir.Node, index: int, axis: int, shape, channels: int) -> Consumer | None:
    """The consumer role of `node` reading the channels at input `index`, or None if it is not one."""
    op = node.op_type if node.domain in ("", "ai.onnx") else None
    if index != 0:
        return None
    if op == "Conv":
        group = node.attributes.get_int("group", 1)
        w = _owned_const(node, 1, "weight")
        if axis != 1:
            raise Decline(f"Conv {node.name!r} reads the channels on axis {axis}")
        if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET" or w.ndim not in (3, 4):
            raise Decline(f"Conv {node.name!r} with auto_pad or a {w.ndim - 2}-D kernel (its patches are not rebuilt)")
        if group != 1:
            return None
        return Consumer(node, "conv", int(np.prod(w.shape[2:])))
    if op == "MatMul":
        w = constant_array(node.inputs[1])
        if w is None:
            return None
        if w.ndim != 2 or axis != len(shape) - 1:
            raise Decline(f"MatMul {node.name!r} reads the channels on a non-contracted axis or has a rank-{w.ndim} weight")
        return Consumer(node, "matmul", 1)
    if op == "Gemm":
        if node.attributes.get_int("transA", 0) or axis != 1:
            raise Decline(f"Gemm {node.name!r} does not contract the channel axis (transA or axis {axis})")
        _owned_const(node, 1, "weight")
        return Consumer(node, "gemm", 1)
    return None


def _reduce_axes(node: ir.Node, rank: int) -> list[int] | None:
    attr = node.attributes.get("axes")
    if attr is not None:
        axes = list(attr.value)
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        a = constant_array(node.inputs[1])
        if a is None:
            return None
        axes = [int(x) for x in np.ravel(a)]
    else:
        axes = []
    return sorted(a % rank for a in axes)


def find_groups(graph: ir.Graph, shape_of) -> list[Group]:
    """Every producer's group, in graph order; declined groups carry their reason.

    `shape_of(value)` gives a value's concrete shape (from a probe run) or None."""
    taken: set[int] = set()
    groups = []
    for node in graph:
        kind = producer_kind(node)
        if kind is None or id(node.outputs[0]) in taken:
            continue
        group = _walk(node, kind, shape_of)
        taken.update(group.members)
        groups.append(group)
    return groups


def _walk(start: ir.Node, kind: str, shape_of) -> Group:
    out = start.outputs[0]
    shape = shape_of(out)
    group = Group(channels=0, start=start, probe=shape_of)
    if shape is None:
        group.reason = f"no shape for {out.name!r} from the probe run"
        return group
    try:
        axis = _check_producer(start, kind, shape)
        channels = int(shape[axis])
        sub = 1
        if kind == "attention":
            heads = start.attributes.get_int("num_heads", 0)
            if heads <= 0 or channels % heads:
                raise Decline(f"Attention {start.name!r}: {channels} channels do not split into {heads} heads")
            group.unit = sub = channels // heads
        _grow(group, out, Layout(axis, sub, group.new_ids(channels // sub)), shape_of)
        _finish(group, shape_of)
    except Decline as exc:
        group.reason = str(exc)
    return group


def _grow(group: Group, first: ir.Value, layout: Layout, shape_of) -> None:
    queue = [first]
    group.members[id(first)] = (first, layout)
    done_back: set[int] = set()
    done_fwd: set[tuple[int, int]] = set()

    def add(value: ir.Value, lay: Layout):
        if id(value) in group.members:
            old = group.members[id(value)][1]
            if old.axis != lay.axis or old.sub != lay.sub or len(old.units) != len(lay.units):
                raise Decline(f"{value.name!r} joins the group on two different axes or layouts")
            for a, b in zip(old.units, lay.units):
                group.tie(a, b)
            return
        xs = shape_of(value)
        if xs is None:
            raise Decline(f"no shape for {value.name!r} from the probe run")
        size = int(xs[lay.axis])
        per = len(lay.units) * lay.sub
        if size % per:
            raise Decline(f"{value.name!r} axis {lay.axis} of size {size} does not hold the {per} channels")
        group.members[id(value)] = (value, Layout(lay.axis, lay.sub, list(lay.units), size // per))
        queue.append(value)

    while queue:
        v = queue.pop()
        shape = shape_of(v)
        if shape is None:
            raise Decline(f"no shape for {v.name!r} from the probe run")
        if v.is_graph_output():
            raise Decline(f"the channels reach graph output {v.name!r} (the interface cannot change)")
        node = v.producer()
        if node is None:
            raise Decline(f"the channels come from graph input {v.name!r}")
        if id(node) not in done_back:
            done_back.add(id(node))
            _backward(group, node, v, group.members[id(v)][1], shape_of, add)
        for use in v.uses():
            user, index = use[0], use[1]
            if (id(user), index) in done_fwd:
                continue
            done_fwd.add((id(user), index))
            _forward(group, user, index, v, group.members[id(v)][1], shape, shape_of, add)


def _grouped(node: ir.Node, shape_of):
    """(groups, inputs per group, outputs per group) of a grouped Conv with constant weights
    (depthwise included), else None."""
    if node.op_type != "Conv" or not _std(node) or node.attributes.get_int("group", 1) == 1:
        return None
    g = node.attributes.get_int("group", 1)
    w = constant_array(node.inputs[1])
    xs = shape_of(node.inputs[0])
    if w is None or xs is None or len(xs) < 2 or xs[1] != g * w.shape[1] or w.shape[0] % g:
        return None
    return g, int(w.shape[1]), int(w.shape[0]) // g


def _through_grouped(group: Group, node: ir.Node, lay: Layout, per_from: int, per_to: int, what: str) -> Layout:
    """A grouped Conv passes whole groups: each unit must hold whole groups (units of one
    channel become units of a group's channels); its layout on the other side."""
    if lay.axis != 1 or lay.outer != 1:
        raise Decline(f"grouped Conv {node.name!r} {what} on axis {lay.axis}")
    if per_from % lay.sub == 0:
        group.coarsen(per_from // lay.sub)
    if lay.sub % per_from:
        raise Decline(f"grouped Conv {node.name!r}: units of {lay.sub} channels cut through its groups of {per_from}")
    _owned_const(node, 1, "weight")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        _owned_const(node, 2, "bias")
    _once(group.depthwise, node)
    return Layout(1, lay.sub // per_from * per_to, lay.units)


def _once(nodes: list, node: ir.Node) -> None:
    if all(n is not node for n in nodes):
        nodes.append(node)


def _std(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _backward(group: Group, node: ir.Node, v: ir.Value, lay: Layout, shape_of, add) -> None:
    """`v` (a member) is an output of `node`: what node is to the group."""
    op = node.op_type
    kind = producer_kind(node)
    grouped = _grouped(node, shape_of)
    if grouped is not None and v is node.outputs[0]:
        add(node.inputs[0], _through_grouped(group, node, lay, grouped[2], grouped[1], "output used"))
        return
    if kind is not None and v is node.outputs[0]:
        axis = _check_producer(node, kind, shape_of(v))
        if axis != lay.axis:
            raise Decline(f"{op} {node.name!r} produces the channels on axis {axis}, the group has them on {lay.axis}")
        if kind == "attention":
            c = shape_of(v)[axis]
            if lay.sub != c // node.attributes.get_int("num_heads", 1) or lay.outer != 1:
                raise Decline(f"Attention {node.name!r} has another head size than the group")
        group.producers.append(Producer(node, kind))
        return
    ms = node.domain == "com.microsoft"
    if ms and op == "MultiHeadAttention" and v is node.outputs[0]:
        _mha(group, node, lay, shape_of, add)
        return
    if not ms and not _std(node):
        raise Decline(f"the channels come from {node.domain}.{op} {node.name!r}, which the grouping does not know")
    if (op in UNARY and not ms) or (ms and op in MS_UNARY_BIAS):
        if op == "Clip" and any(i is not None and constant_array(i) is None for i in list(node.inputs)[1:]):
            raise Decline(f"Clip {node.name!r} has non-constant bounds")
        if op == "PRelu":
            _operands(group, node, v, lay, shape_of, add)
            return
        add(node.inputs[0], lay)
        if ms and len(node.inputs) > 1 and node.inputs[1] is not None:
            b = _owned_const(node, 1, "bias")
            if b.shape != (lay.size(),):
                raise Decline(f"{op} {node.name!r} bias of shape {list(b.shape)}")
            group.slices.append(ConstSlice(node, 1, 0, lay.moved(0)))
        return
    if op in BINARY and not ms:
        if op == "Pow" and constant_array(node.inputs[1]) is None:
            raise Decline(f"Pow {node.name!r} with a non-constant exponent")
        _operands(group, node, v, lay, shape_of, add)
        return
    if op in POOLS and not ms:
        if lay.axis != 1:
            raise Decline(f"{op} {node.name!r} on channel axis {lay.axis}")
        add(node.inputs[0], lay)
        return
    if op == "Pad":
        _check_pad(node, lay, len(shape_of(v)))
        add(node.inputs[0], lay)
        return
    if op == "BatchNormalization":
        _check_batchnorm(node, lay)
        for i in range(1, 5):
            group.slices.append(ConstSlice(node, i, 0, lay.moved(0)))
        add(node.inputs[0], lay)
        return
    if op == "LayerNormalization":
        _check_layernorm(node, lay, len(shape_of(v)))
        add(node.inputs[0], lay)
        return
    if op in SOFTMAX:
        _check_softmax(node, lay, len(shape_of(v)))
        add(node.inputs[0], lay)
        return
    if op == "Transpose":
        perm = _perm(node, len(shape_of(v)))
        add(node.inputs[0], lay.moved(perm[lay.axis]))
        return
    if op == "Reshape":
        add(node.inputs[0], _reshape_layout(group, node, lay, shape_of(v), shape_of(node.inputs[0])))
        _once(group.reshapes, node)
        return
    if op == "MatMul":
        _core_backward(group, node, lay, shape_of, add)
        return
    if op == "Split":
        _split_backward(group, node, v, lay, shape_of, add)
        return
    if op == "Concat":
        _concat(group, node, None, lay, shape_of, add)
        return
    if op in REDUCE:
        x = node.inputs[0]
        rank = len(shape_of(x) or ())
        axes = _reduce_axes(node, rank)
        keep = node.attributes.get_int("keepdims", 1)
        if axes is None or not axes:
            raise Decline(f"{op} {node.name!r} reduces over unknown or all axes")
        in_ax = lay.axis
        if not keep:
            for a in axes:
                if a <= in_ax:
                    in_ax += 1
        if in_ax in axes:
            raise Decline(f"{op} {node.name!r} reduces over the channel axis")
        add(x, lay.moved(in_ax))
        return
    raise Decline(f"the channels come from {node.domain + '.' if node.domain else ''}{op} {node.name!r}, "
                  "which the grouping does not know")


def _operands(group: Group, node: ir.Node, v: ir.Value, lay: Layout, shape_of, add) -> None:
    """Inputs of an element-wise node whose output `v` holds the units: constants with the axis
    are sliced, activations with it join, operands broadcast along it are left alone."""
    rank = len(shape_of(v))
    size = lay.size()
    for i, x in enumerate(node.inputs):
        if x is None:
            continue
        c = constant_array(x)
        xs = c.shape if c is not None else shape_of(x)
        if xs is None:
            raise Decline(f"no shape for {x.name!r} from the probe run")
        aligned = lay.axis - (rank - len(xs))
        if aligned < 0 or xs[aligned] == 1:
            continue
        if xs[aligned] != size:
            raise Decline(f"{node.op_type} {node.name!r}: operand of shape {list(xs)} does not match {size} channels")
        if c is not None:
            if lay.outer != 1:
                raise Decline(f"{node.op_type} {node.name!r}: a constant along units repeated {lay.outer} times")
            group.slices.append(ConstSlice(node, i, aligned, lay.moved(aligned)))
        else:
            add(x, lay.moved(aligned))


def _perm(node: ir.Node, rank: int) -> list[int]:
    perm = node.attributes.get_ints("perm", None)
    return list(perm) if perm is not None else list(range(rank))[::-1]


def _check_softmax(node: ir.Node, lay: Layout, rank: int) -> None:
    axis = node.attributes.get_int("axis", -1) % rank
    if axis == lay.axis:
        raise Decline(f"{node.op_type} {node.name!r} normalizes over the units' axis")


def _check_pad(node: ir.Node, lay: Layout, rank: int) -> None:
    """A Pad that pads nothing on the units' axis keeps them (TF-style "same" padding before a
    depthwise Conv)."""
    attr = node.attributes.get_ints("pads", None)
    pads = np.asarray(attr) if attr is not None else constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.arange(rank)
    if pads is None or axes is None:
        raise Decline(f"Pad {node.name!r} with computed pads")
    axes = [int(a) % rank for a in np.ravel(axes)]
    pads = np.ravel(pads)
    if lay.axis in axes:
        k = axes.index(lay.axis)
        if pads[k] != 0 or pads[k + len(axes)] != 0:
            raise Decline(f"Pad {node.name!r} pads the channel axis")


def _check_batchnorm(node: ir.Node, lay: Layout) -> None:
    """An inference BatchNormalization is per channel: its four [C] constants are sliced."""
    if lay.axis != 1 or lay.outer != 1 or node.attributes.get_int("training_mode", 0) or len(
            [o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
        raise Decline(f"BatchNormalization {node.name!r} in training mode or on axis {lay.axis}")
    for i in range(1, 5):
        _owned_const(node, i, "scale, bias, mean and variance")


def _check_layernorm(node: ir.Node, lay: Layout, rank: int) -> None:
    if node.attributes.get_int("axis", -1) % rank <= lay.axis:
        raise Decline(f"LayerNormalization {node.name!r} normalizes over the channel axis")


def _reshape_layout(group: Group, node: ir.Node, lay: Layout, from_shape, to_shape) -> Layout:
    """The layout of the other side of a Reshape: the units keep their stride in the flat index.

    Where one unit's elements spread over several axes of the other side (a head split
    [.., H*dh] -> [.., H, dh] seen from a channel group), the units become whole blocks first."""
    from_shape, to_shape = [int(d) for d in from_shape], [int(d) for d in to_shape]
    for _ in range(2):
        inner = lay.sub * int(np.prod(from_shape[lay.axis + 1:]))
        span = inner * len(lay.units)
        coarse = None
        for j in reversed(range(len(to_shape))):  # the innermost axis that can hold them
            stride = int(np.prod(to_shape[j + 1:]))
            extent = stride * to_shape[j]
            if extent % span or extent < span:
                continue
            if stride <= inner and inner % stride == 0:
                return Layout(j, inner // stride, lay.units, extent // span)
            if stride > inner and stride % inner == 0 and coarse is None:
                coarse = stride // inner
        if coarse is None or len(lay.units) % coarse:
            break
        group.coarsen(coarse)
    raise Decline(f"Reshape {node.name!r} {from_shape} -> {to_shape} spreads each unit over several axes")


def _core_backward(group: Group, node: ir.Node, lay: Layout, shape_of, add) -> None:
    """The output of a MatMul of two activations (attention scores or context) holds the units."""
    out_rank = len(shape_of(node.outputs[0]))
    size = lay.size()
    _once(group.core, node)
    for i, x in enumerate(node.inputs[:2]):
        xs = shape_of(x)
        if xs is None:
            raise Decline(f"no shape for {x.name!r} from the probe run")
        r = len(xs)
        if lay.axis < out_rank - 2:  # batch axis (broadcast)
            a = lay.axis - (out_rank - r)
            if a < 0 or a >= r - 2 or xs[a] == 1:
                continue
            if xs[a] != size:
                raise Decline(f"MatMul {node.name!r}: operand of shape {list(xs)} does not match {size} channels")
            add(x, lay.moved(a))
        elif (lay.axis == out_rank - 2 and i == 0) or (lay.axis == out_rank - 1 and i == 1):
            if r < 2:
                raise Decline(f"MatMul {node.name!r} with a rank-1 operand")
            add(x, lay.moved(r - 2 if i == 0 else r - 1))


def _core_forward(group: Group, node: ir.Node, index: int, lay: Layout, shape, shape_of, add) -> None:
    out = node.outputs[0]
    os = shape_of(out)
    if os is None:
        raise Decline(f"no shape for {out.name!r} from the probe run")
    r, ro = len(shape), len(os)
    if r < 2:
        raise Decline(f"MatMul {node.name!r} with a rank-1 operand")
    if (index == 0 and lay.axis == r - 1) or (index == 1 and lay.axis == r - 2):
        raise Decline(f"MatMul {node.name!r} contracts the channels with an activation (the channels are not heads)")
    if lay.axis < r - 2:
        o = lay.axis + (ro - r)
    else:
        o = ro - 2 if index == 0 else ro - 1
    add(out, lay.moved(o))


def _mha(group: Group, node: ir.Node, lay: Layout, shape_of, add) -> None:
    """A com.microsoft MultiHeadAttention reading or writing the units: Q, K, V and the output
    hold the same heads (num_heads and the packed bias are rewritten)."""
    if id(node) in {id(n) for n in group.mha}:
        return
    ins = list(node.inputs) + [None] * 8
    heads = node.attributes.get_int("num_heads", 0)
    qs = shape_of(ins[0])
    if ins[1] is None or ins[2] is None or qs is None or len(qs) != 3:
        raise Decline(f"MultiHeadAttention {node.name!r} without separate rank-3 query, key and value")
    if any(v is not None for v in ins[5:8]) or any(o.uses() or o.is_graph_output() for o in list(node.outputs)[1:]):
        raise Decline(f"MultiHeadAttention {node.name!r} has an attention bias or past/present state")
    c = int(qs[2])
    if heads <= 0 or c % heads or any(shape_of(v) is None or list(shape_of(v))[-1] != c for v in ins[1:3]):
        raise Decline(f"MultiHeadAttention {node.name!r}: query, key and value are not {heads} heads of one size")
    dh = c // heads
    if dh % group.unit:
        raise Decline(f"MultiHeadAttention {node.name!r}: head size {dh} and units of {group.unit} channels")
    if lay.axis != 2 or lay.outer != 1:
        raise Decline(f"MultiHeadAttention {node.name!r} reads the channels on axis {lay.axis}")
    group.coarsen(dh // group.unit)
    if lay.sub != dh:
        raise Decline(f"MultiHeadAttention {node.name!r}: the group's units are not its heads")
    if ins[3] is not None:
        b = _owned_const(node, 3, "bias")
        if b.shape != (3 * c,):
            raise Decline(f"MultiHeadAttention {node.name!r} bias of shape {list(b.shape)}")
    group.mha.append(node)
    group.core.append(node)
    for v in (ins[0], ins[1], ins[2], node.outputs[0]):
        add(v, Layout(2, lay.sub, lay.units))


def _sizes(node: ir.Node, shape_of, axis: int, values) -> list[int]:
    sizes = []
    for v in values:
        s = shape_of(v)
        if s is None:
            raise Decline(f"no shape for {v.name!r} from the probe run")
        sizes.append(int(s[axis]))
    return sizes


def _split_axis(node: ir.Node, rank: int) -> int:
    return node.attributes.get_int("axis", 0) % rank


def _split_forward(group: Group, node: ir.Node, lay: Layout, shape, shape_of, add) -> None:
    """Split of a member: along the units' axis each output takes its range of positions."""
    axis = _split_axis(node, len(shape))
    outs = list(node.outputs)
    if axis != lay.axis:
        for o in outs:
            add(o, lay)
        return
    _share_positions(node, outs, axis, lay, shape_of, add)
    _once(group.splits, node)


def _share_positions(node: ir.Node, values, axis: int, lay: Layout, shape_of, add) -> None:
    """`values` (Split outputs, Concat inputs) hold consecutive ranges of the positions of `lay`."""
    sizes = _sizes(node, shape_of, axis, values)
    if lay.outer != 1 or any(s % lay.sub for s in sizes):
        raise Decline(f"{node.op_type} {node.name!r} cuts through the units")
    off = 0
    for x, s in zip(values, sizes):
        n = s // lay.sub
        add(x, Layout(axis, lay.sub, lay.units[off:off + n]))
        off += n


def _split_backward(group: Group, node: ir.Node, v: ir.Value, lay: Layout, shape_of, add) -> None:
    x = node.inputs[0]
    xs = shape_of(x)
    axis = _split_axis(node, len(xs))
    if axis != lay.axis:
        add(x, lay)
        return
    outs = list(node.outputs)
    sizes = _sizes(node, shape_of, axis, outs)
    if lay.outer != 1 or any(s % lay.sub for s in sizes):
        raise Decline(f"Split {node.name!r} cuts through the units")
    units = []
    for o, s in zip(outs, sizes):
        units += list(lay.units) if o is v else group.new_ids(s // lay.sub)
    add(x, Layout(axis, lay.sub, units))


def _concat(group: Group, node: ir.Node, index: int | None, lay: Layout, shape_of, add) -> None:
    """Concat touching the units: along their axis each input is its own range of positions
    (inputs not yet in the group bring new units); along another axis every input holds them."""
    out = node.outputs[0]
    os = shape_of(out)
    if os is None:
        raise Decline(f"no shape for {out.name!r} from the probe run")
    axis = node.attributes.get_int("axis", 0) % len(os)
    if axis != lay.axis:  # inputs and output have the same rank
        if index is not None:
            add(out, lay)
        else:
            _operands(group, node, out, lay, shape_of, add)
        return
    ins = list(node.inputs)
    if any(constant_array(x) is not None for x in ins):
        raise Decline(f"Concat {node.name!r} concatenates a constant along the channel axis")
    if index is None:  # from the output: split its positions among the inputs
        _share_positions(node, ins, axis, lay, shape_of, add)
    else:  # from an input: the others bring their own units
        if lay.outer != 1:
            raise Decline(f"Concat {node.name!r} joins units repeated {lay.outer} times")
        units = []
        for x in ins:
            if id(x) in group.members:
                other = group.members[id(x)][1]
                if other.sub != lay.sub or other.outer != 1:
                    raise Decline(f"Concat {node.name!r} joins inputs of different unit sizes")
                units += list(other.units)
            else:
                s = _sizes(node, shape_of, axis, [x])[0]
                if s % lay.sub:
                    raise Decline(f"Concat {node.name!r} joins inputs that cut through the units")
                ids = group.new_ids(s // lay.sub)
                add(x, Layout(axis, lay.sub, ids))
                units += ids
        add(out, Layout(axis, lay.sub, units))
    group.concat = True


def _forward(group, user: ir.Node, index: int, v, lay: Layout, shape, shape_of, add) -> None:
    """`v` (a member) is input `index` of `user`: what the user is to the group."""
    op = user.op_type
    ms = user.domain == "com.microsoft"
    C = lay.size()
    grouped = _grouped(user, shape_of)
    if grouped is not None and index == 0:
        add(user.outputs[0], _through_grouped(group, user, lay, grouped[1], grouped[2], "input read"))
        return
    if ms and op == "MultiHeadAttention" and index in (0, 1, 2):
        _mha(group, user, lay, shape_of, add)
        return
    if not ms and not _std(user):
        raise Decline(f"the channels go to {user.domain}.{op} {user.name!r} (input {index}), which the grouping does not know")
    if not ms:
        cons = _consumer(user, index, lay.axis, shape, C)
        if cons is not None:
            if lay.outer != 1 or lay.sub % group.unit:
                raise Decline(f"{op} {user.name!r} reads the units in another layout than whole channels")
            cons.block *= lay.sub // group.unit  # a grouped Conv's outputs per unit before it
            group.consumers.append(cons)
            cons.layout = lay
            return
    if op == "Flatten" and not ms and index == 0:
        if user.attributes.get_int("axis", 1) != 1 or lay.axis != 1 or lay.sub % group.unit or lay.outer != 1:
            raise Decline(f"Flatten {user.name!r} with axis != 1 or channels on axis {lay.axis}")
        flat = user.outputs[0]
        if flat.is_graph_output():
            raise Decline(f"the flattened channels reach graph output {flat.name!r}")
        block = int(np.prod(shape[2:])) * (lay.sub // group.unit)
        for use in flat.uses():
            node2, idx2 = use[0], use[1]
            fshape = shape_of(flat)
            cons = _consumer(node2, idx2, len(fshape) - 1 if node2.op_type == "MatMul" else 1, fshape, C * block)
            if cons is None:
                raise Decline(f"the flattened channels go to {node2.op_type} {node2.name!r}, not to a Gemm/MatMul")
            cons.block, cons.flatten = block, user
            cons.layout = lay
            group.consumers.append(cons)
        return
    if op == "Shape" and not ms:
        group.shape_reads.append(user)
        return
    if op == "Transpose":
        add(user.outputs[0], lay.moved(_perm(user, len(shape)).index(lay.axis)))
        return
    if op == "Reshape" and index == 0:
        add(user.outputs[0], _reshape_layout(group, user, lay, shape, shape_of(user.outputs[0])))
        _once(group.reshapes, user)
        return
    if op == "MatMul" and index in (0, 1):
        _once(group.core, user)
        _core_forward(group, user, index, lay, shape, shape_of, add)
        return
    if op in SOFTMAX:
        _check_softmax(user, lay, len(shape))
        add(user.outputs[0], lay)
        return
    if op == "Split" and index == 0:
        _split_forward(group, user, lay, shape, shape_of, add)
        return
    if op == "Pad" and index == 0:
        _check_pad(user, lay, len(shape))
        add(user.outputs[0], lay)
        return
    if op == "BatchNormalization" and index == 0:
        _check_batchnorm(user, lay)
        add(user.outputs[0], lay)
        return
    if op == "LayerNormalization" and index == 0:
        _check_layernorm(user, lay, len(shape))
        add(user.outputs[0], lay)
        return
    if op == "Concat":
        _concat(group, user, index, lay, shape_of, add)
        return
    if ((op in UNARY or op in BINARY or op in POOLS) and not ms) or (ms and op in MS_UNARY_BIAS and index == 0):
        if op == "Pow" and index == 1:
            raise Decline(f"Pow {user.name!r} uses the channels as an exponent")
        # Broadcast of the member along the other operand: the output has the channel axis (aligned).
        out = user.outputs[0]
        os = shape_of(out)
        if os is None:
            raise Decline(f"no shape for {out.name!r} from the probe run")
        out_ax = lay.axis + (len(os) - len(shape))
        if os[out_ax] != C:
            raise Decline(f"{op} {user.name!r} output does not keep the {C} channels")
        add(out, lay.moved(out_ax))
        return
    if op in REDUCE and not ms:
        axes = _reduce_axes(user, len(shape))
        if axes is None or not axes or lay.axis in axes:
            raise Decline(f"{op} {user.name!r} reduces over the channel axis (e.g. a LayerNorm)")
        keep = user.attributes.get_int("keepdims", 1)
        add(user.outputs[0], lay.moved(lay.axis if keep else lay.axis - sum(a < lay.axis for a in axes)))
        return
    if op == "Conv" and not ms:
        raise Decline(f"grouped Conv {user.name!r} (group {user.attributes.get_int('group', 1)}) reads the channels")
    where = f"{user.domain}.{op}" if user.domain else op
    raise Decline(f"the channels go to {where} {user.name!r} (input {index}), which the grouping does not know")


# ---- after the walk: units, grouped consumers, shapes ---------------------------------------------


def _finish(group: Group, shape_of) -> None:
    """Number the units in the consumers' order and check everything that depends on the count."""
    if not group.consumers:
        raise Decline("no consumer reads the channels")
    roots = sorted({group.find(u) for u in range(len(group.parent))})
    for c in group.consumers:  # the pass refits each consumer on all the units
        read = [group.find(u) for u in c.layout.units]
        where = f"{c.node.op_type} {c.node.name!r}"
        if len(set(read)) < len(read):
            raise Decline(f"{where} reads a unit twice (e.g. a Concat of a tensor with itself)")
        if len(read) != len(roots):
            raise Decline(f"{where} reads {len(read)} of the group's {len(roots)} units (e.g. one side of a Split): "
                          "each consumer must read them all")
    first = [group.find(u) for u in group.consumers[0].layout.units]
    order = {r: k for k, r in enumerate(first)}
    group.klass = [order[group.find(u)] for u in range(len(group.parent))]
    for c in group.consumers:
        if [group.klass[u] for u in c.layout.units] != list(range(len(roots))):
            raise Decline(f"{c.node.op_type} {c.node.name!r} reads the units in another order than "
                          f"{group.consumers[0].node.op_type} {group.consumers[0].node.name!r}")
    group.channels = len(roots) * group.unit
    if group.units >= 2:  # what computed shapes make of one unit fewer
        _check_shapes(group, shape_of, set(range(group.units - 1)))


def _shapes_after(group: Group, shape_of, kept: set):
    new = {}
    for value, lay in group.members.values():
        s = list(shape_of(value))
        s[lay.axis] = len(group.kept_positions(lay, kept))
        new[id(value)] = s

    def fn(v):
        return new.get(id(v), shape_of(v))

    return fn


def _check_shapes(group: Group, shape_of, kept: set) -> None:
    after = _shapes_after(group, shape_of, kept)
    for node in group.reshapes:
        _reshape_plan(node, after, group.members[id(node.outputs[0])][1].axis)
    mine = {id(n) for n in group.reshapes}
    for node in group.shape_reads:
        for user, index, value in _shape_terminals(node.outputs[0]):
            if user is not None and id(user) in mine and index == 1:
                continue
            old, new = _evaluate(value, shape_of), _evaluate(value, after)
            if old is None or new is None or old.shape != new.shape or not np.array_equal(old, new):
                where = f"{user.op_type} {user.name!r}" if user is not None else f"graph output {value.name!r}"
                raise Decline(f"the shape of {node.inputs[0].name!r} is read by {where}, which would change with the units")


def _shape_terminals(value: ir.Value, depth: int = 0):
    """(user, input index, value) where shape arithmetic starting at `value` leaves SHAPE_OPS."""
    if value.is_graph_output():
        yield None, None, value
    for use in value.uses():
        user, index = use[0], use[1]
        if _std(user) and user.op_type in SHAPE_OPS and user.op_type != "Shape" and depth < 32:
            for o in user.outputs:
                yield from _shape_terminals(o, depth + 1)
        else:
            yield user, index, value


def _evaluate(value: ir.Value | None, shape_fn, depth: int = 0):
    """The value of shape arithmetic with `shape_fn` giving the shapes Shape reads, or None."""
    if value is None:
        return None
    c = constant_array(value)
    if c is not None:
        return c
    node = value.producer()
    if node is None or not _std(node) or node.op_type not in SHAPE_OPS or depth > 32:
        return None
    op = node.op_type
    if op == "Shape":
        s = shape_fn(node.inputs[0])
        if s is None:
            return None
        a = node.attributes
        start, end = a.get_int("start", 0), a.get_int("end", len(s))
        return np.asarray(list(s), dtype=np.int64)[start:end]
    ins = [_evaluate(x, shape_fn, depth + 1) if x is not None else None for x in node.inputs]
    if any(x is None and v is not None for x, v in zip(ins, node.inputs)):
        return None
    try:
        if op == "Gather":
            return np.take(ins[0], ins[1], axis=node.attributes.get_int("axis", 0))
        if op == "Slice":
            return _slice(ins)
        if op == "Concat":
            return np.concatenate([np.atleast_1d(x) for x in ins], axis=node.attributes.get_int("axis", 0))
        if op in ("Unsqueeze", "Squeeze"):
            attr = node.attributes.get_ints("axes", None)
            axes = list(attr) if attr is not None else ([int(a) for a in np.ravel(ins[1])] if len(ins) > 1 and ins[1] is not None else None)
            if op == "Squeeze":
                return np.squeeze(ins[0], axis=tuple(axes) if axes else None)
            out = ins[0]
            rank = out.ndim + len(axes)
            for a in sorted(a % rank for a in axes):
                out = np.expand_dims(out, a)
            return out
        if op == "Cast":
            return ins[0].astype(onnx.helper.tensor_dtype_to_np_dtype(node.attributes.get_int("to")))
        if op == "Identity":
            return ins[0]
        if op == "Div":
            a, b = ins
            return (a // b) if a.dtype.kind in "iu" else a / b
        unary = {"Neg": np.negative, "Abs": np.abs, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal}
        if op in unary:
            return unary[op](ins[0])
        binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum}
        out = ins[0]
        for x in ins[1:]:
            out = binary[op](out, x)
        return out
    except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError):
        return None


def _slice(ins):
    data, starts, ends = ins[0], ins[1], ins[2]
    axes = ins[3] if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
    steps = ins[4] if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), dtype=np.int64)
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        n = data.shape[int(a)]
        s, e = int(max(min(s, n), -n - 1)), int(max(min(e, n), -n - 1))
        index[int(a)] = slice(s, e, int(st))
    return data[tuple(index)]


def _resolve(spec, in_shape, allowzero: bool):
    spec = [int(d) for d in np.ravel(spec)]
    total = int(np.prod(in_shape))
    out = [in_shape[i] if d == 0 and not allowzero and i < len(in_shape) else d for i, d in enumerate(spec)]
    if out.count(-1) == 1:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = total // known if known else 0
    return [int(d) for d in out]


def _reshape_plan(node: ir.Node, after, axis: int, graph: ir.Graph | None = None, tag: str = "pruned",
                  cache=None) -> None:
    """Check that Reshape `node` gives its output's shape under `after`; else rewrite entry `axis`
    of its target (the output's units axis; in `graph`, when given) if that makes it so."""
    spec = _evaluate(node.inputs[1], after)
    if spec is None:
        raise Decline(f"Reshape {node.name!r}: its target shape is computed by ops the grouping cannot follow")
    allowzero = bool(node.attributes.get_int("allowzero", 0))
    want = [int(d) for d in after(node.outputs[0])]
    got = _resolve(spec, [int(d) for d in after(node.inputs[0])], allowzero)
    if got == want:
        return
    j = axis
    fixed = np.array(np.ravel(spec))
    if len(got) != len(want) or fixed[j] <= 0:
        raise Decline(f"Reshape {node.name!r}: target {list(np.ravel(spec))} does not follow the kept units")
    fixed[j] = want[j]
    if _resolve(fixed, after(node.inputs[0]), allowzero) != want:
        raise Decline(f"Reshape {node.name!r}: target {list(np.ravel(spec))} does not follow the kept units")
    shape = node.inputs[1]
    const = constant_array(shape)
    if const is not None:
        if graph is not None:
            set_const(graph, node, 1, fixed.astype(const.dtype), tag)
        return
    concat = shape.producer()
    if concat is None or concat.op_type != "Concat" or not _std(concat):
        raise Decline(f"Reshape {node.name!r}: entry {j} of its target is computed, not a constant")
    off = 0
    for k, piece in enumerate(concat.inputs):
        part = _evaluate(piece, after)
        n = int(np.size(part))
        if off <= j < off + n:
            pc = constant_array(piece)
            if pc is None:
                raise Decline(f"Reshape {node.name!r}: entry {j} of its target is computed by "
                              f"{piece.producer().op_type if piece.producer() else 'a graph input'}, not a constant")
            if graph is not None:
                new_piece = np.array(pc).reshape(-1)
                new_piece[j - off] = want[j]
                _private_concat(graph, node, concat, k, new_piece.reshape(pc.shape).astype(pc.dtype), tag, cache)
            return
        off += n
    raise Decline(f"Reshape {node.name!r}: its target shape does not cover entry {j}")


def _private_concat(graph: ir.Graph, reshape: ir.Node, concat: ir.Node, k: int, piece: np.ndarray, tag: str,
                    cache: dict) -> None:
    """Give `reshape` a copy of the Concat computing its target, with piece k replaced (one copy
    per target and piece value: the group's Q, K and V reshapes share it)."""
    key = (id(concat), k, piece.tobytes())
    if key not in cache:
        names = {n.name for n in graph}
        values = {v.name for n in graph for v in n.outputs} | set(graph.initializers)
        base = concat.name or "Concat"
        n = 0
        while f"{base}.{tag}{n}" in names or f"{concat.outputs[0].name}.{tag}{n}" in values:
            n += 1
        copy = ir.Node("", "Concat", list(concat.inputs), attributes=[ir.AttrInt64("axis", concat.attributes.get_int("axis", 0))],
                       name=f"{base}.{tag}{n}", num_outputs=1)
        out = copy.outputs[0]
        out.name, out.shape, out.type = f"{concat.outputs[0].name}.{tag}{n}", concat.outputs[0].shape, concat.outputs[0].type
        graph.insert_after(concat, copy)
        set_const(graph, copy, k, piece, tag)
        cache[key] = out
    reshape.replace_input_with(1, cache[key])
    if not concat.outputs[0].uses() and not concat.outputs[0].is_graph_output():
        graph.remove(concat, safe=True)


# ---- rewriting ------------------------------------------------------------------------------------


def consumer_matrix(c: Consumer) -> np.ndarray:
    """The consumer's weight as [K, N] (rows = input features in channel-major order)."""
    w = constant_array(c.node.inputs[1])
    if c.kind == "conv":
        return w.reshape(w.shape[0], -1).T
    if c.kind == "gemm" and c.node.attributes.get_int("transB", 0):
        return w.T
    return w


def set_consumer_matrix(graph: ir.Graph, c: Consumer, m: np.ndarray, tag: str) -> None:
    w = constant_array(c.node.inputs[1])
    set_const(graph, c.node, 1, np.ascontiguousarray(_from_matrix(c, w, m), dtype=w.dtype), tag)


def _from_matrix(c: Consumer, w: np.ndarray, m: np.ndarray) -> np.ndarray:
    if c.kind == "conv":
        k = m.shape[0] // int(np.prod(w.shape[2:]))
        return m.T.reshape(w.shape[0], k, *w.shape[2:])
    if c.kind == "gemm" and c.node.attributes.get_int("transB", 0):
        return m.T
    return m


def set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, tag: str) -> ir.Value:
    """Give `node` a new initializer at input `index`, named after the one it replaces."""
    old = node.inputs[index] if index < len(node.inputs) else None
    base = old.name if old is not None and old.name else f"{node.name}.input{index}"
    name = f"{base}.{tag}"
    k = 1
    while name in graph.initializers:
        k += 1
        name = f"{base}.{tag}{k}"
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    if index < len(node.inputs):
        node.replace_input_with(index, value)
    else:
        node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
    if old is not None and not old.uses() and not old.is_graph_input() and not old.is_graph_output() \
            and old.name in graph.initializers and graph.initializers[old.name] is old:
        graph.initializers.pop(old.name)
    return value


def consumer_rows(c: Consumer, channels: np.ndarray, unit: int = 1) -> np.ndarray:
    """Rows of the consumer matrix that belong to the given channels (the group's channel order)."""
    channels = np.asarray(channels, dtype=np.int64)
    return (channels[:, None] * c.block + np.arange(c.block)[None, :]).ravel()


def unit_channels(group: Group, units) -> np.ndarray:
    u = group.unit
    return np.sort(np.concatenate([np.arange(k * u, (k + 1) * u) for k in units])) if len(units) else np.zeros(0, int)


def kept_columns(group: Group, keep: np.ndarray) -> dict:
    """id(producer node) -> its output columns kept, for the group's Conv / MatMul / Gemm producers."""
    kept = set(int(k) for k in np.asarray(keep) // group.unit)
    return {id(p.node): _positions(group, group.members[id(p.node.outputs[0])][1], kept)
            for p in group.producers if p.kind != "attention"}


def _positions(group: Group, lay: Layout, kept: set) -> np.ndarray:
    return group.kept_positions(lay, kept)


def apply(graph: ir.Graph, group: Group, keep: np.ndarray, tag: str = "pruned") -> None:
    """Physically remove every channel of the group not in `keep` (sorted channel indices)."""
    keep = np.asarray(keep, dtype=np.int64)
    kept = set(int(k) for k in keep // group.unit)
    member = {k: lay for k, (_, lay) in group.members.items()}
    for p in group.producers:
        node = p.node
        w = constant_array(node.inputs[1])
        idx = _positions(group, member[id(node.outputs[0])], kept)
        if p.kind == "conv":
            set_const(graph, node, 1, w[idx], tag)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                set_const(graph, node, 2, constant_array(node.inputs[2])[idx], tag)
        elif p.kind == "matmul":
            set_const(graph, node, 1, np.ascontiguousarray(w[:, idx]), tag)
        elif p.kind == "gemm":
            trans = node.attributes.get_int("transB", 0)
            set_const(graph, node, 1, np.ascontiguousarray(w[idx] if trans else w[:, idx]), tag)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = constant_array(node.inputs[2])
                if c.size > 1:
                    set_const(graph, node, 2, c.reshape(c.shape[:-1] + (-1,))[..., idx], tag)
        else:  # attention: the same head channels in the Q, K and V blocks of the packed weight
            C = w.shape[1] // 3
            heads = node.attributes.get_int("num_heads", 1)
            cols = np.concatenate([idx, C + idx, 2 * C + idx])
            set_const(graph, node, 1, np.ascontiguousarray(w[:, cols]), tag)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                set_const(graph, node, 2, constant_array(node.inputs[2])[cols], tag)
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", len(idx) // (C // heads))
    for node in group.mha:
        lay = member[id(node.inputs[0])]
        idx = _positions(group, lay, kept)
        C = lay.size()
        node.attributes["num_heads"] = ir.AttrInt64("num_heads", len(idx) // lay.sub)
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            cols = np.concatenate([idx, C + idx, 2 * C + idx])
            set_const(graph, node, 3, constant_array(node.inputs[3])[cols], tag)
    for node in group.depthwise:  # grouped Convs: the kept groups' output channels
        idx = _positions(group, member[id(node.outputs[0])], kept)
        w = constant_array(node.inputs[1])
        per_out = w.shape[0] // node.attributes.get_int("group", 1)
        set_const(graph, node, 1, w[idx], tag)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            set_const(graph, node, 2, constant_array(node.inputs[2])[idx], tag)
        node.attributes["group"] = ir.AttrInt64("group", len(idx) // per_out)
    for s in group.slices:
        idx = _positions(group, s.layout, kept)
        set_const(graph, s.node, s.index, np.ascontiguousarray(np.take(constant_array(s.node.inputs[s.index]), idx, axis=s.axis)), tag)
    for node in group.splits:
        sizes = np.asarray([len(_positions(group, member[id(o)], kept)) for o in node.outputs], dtype=np.int64)
        if "split" in node.attributes:
            node.attributes["split"] = ir.AttrInt64s("split", [int(s) for s in sizes])
        else:
            node.attributes.pop("num_outputs", None)
            set_const(graph, node, 1, sizes, tag)
    for c in group.consumers:
        set_consumer_matrix(graph, c, consumer_matrix(c)[consumer_rows(c, keep)], tag)
        if c.flatten is not None:
            _set_dim(c.flatten.outputs[0], 1, len(keep) * c.block)
    # Reshape targets, evaluated with the shapes every member has now.
    after = _shapes_after(group, group.probe, kept)
    cache: dict = {}
    for node in group.reshapes:
        try:
            _reshape_plan(node, after, group.members[id(node.outputs[0])][1].axis, graph, tag, cache)
        except Decline as exc:  # checked when the group was found: this is a bug
            raise RuntimeError(f"pruning {group.describe()}: {exc}") from exc
    for v, lay in group.members.values():
        _set_dim(v, lay.axis, len(_positions(group, lay, kept)))


def _set_dim(v: ir.Value, axis: int, n: int) -> None:
    if v.shape is not None and axis < len(v.shape) and isinstance(v.shape.dims[axis], int):
        dims = list(v.shape.dims)
        dims[axis] = n
        v.shape = ir.Shape(dims)


def zero(graph: ir.Graph, group: Group, drop: np.ndarray):
    """Zero the consumer rows of the channels `drop` (what removing them means); return an undo."""
    saved = []
    for c in group.consumers:
        m = consumer_matrix(c).copy()
        m[consumer_rows(c, drop)] = 0.0
        old = c.node.inputs[1]
        w = constant_array(old)
        new = _from_matrix(c, w, m)
        name = f"{old.name}.zeroed"
        tensor = ir.tensor(np.ascontiguousarray(new, dtype=w.dtype), name=name)
        value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(new.shape), type=ir.TensorType(tensor.dtype))
        graph.register_initializer(value)
        c.node.replace_input_with(1, value)
        saved.append((c, old, value))

    def undo():
        for c, old, value in saved:
            c.node.replace_input_with(1, old)
            graph.initializers.pop(value.name)

    return undo
