"""Dependency groups for structured pruning, found by walking uses and producers.

A group is one channel axis shared by a set of tensors: removing channel j removes it from all of
them at once. The walk starts at a producer's output (Conv output channels, MatMul / Gemm output
columns, a fused com.microsoft Attention's heads) and follows every use and every producer of
every member tensor:

* per-channel ops pass the axis on: unary activations (Relu, Clip, Sigmoid, HardSwish, Erf, ...,
  BiasGelu/FastGelu with their bias sliced), pools, reductions over other axes (SE squeezes),
  depthwise Conv (weights, bias and `group` sliced), Add/Sub/Mul/Div/Pow with a constant
  (sliced where it has the channel axis) or with another activation: an activation with the
  channel axis joins the group (residual Adds couple a whole residual stream, SE gates couple
  the expand Conv with the block it gates), one broadcast along it does not;
* consumers end the walk: Conv (group 1) input channels, MatMul / Gemm rows, Flatten -> Gemm /
  MatMul blocks of rows.

Anything else touching a member (a LayerNorm reducing over the channel axis, Reshape head
splits, Concat, a grouped Conv, a graph input or output, a shared weight) declines the whole
group with the reason; nothing is skipped silently. Units are channels, or for Attention whole
heads (head size channels, Q/K/V columns of the packed weight sliced per head, num_heads updated).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._lib.graph import constant_array

UNARY = {"Relu", "Sigmoid", "Tanh", "Erf", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Gelu",
         "Softplus", "Neg", "Abs", "Identity", "Clip", "Sqrt", "Exp", "PRelu"}
MS_UNARY_BIAS = {"BiasGelu", "FastGelu", "Gelu", "QuickGelu"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1"}


class Decline(Exception):
    """A group cannot be pruned; the message says why."""


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


@dataclasses.dataclass
class ConstSlice:
    node: ir.Node
    index: int
    axis: int


@dataclasses.dataclass
class Group:
    channels: int
    unit: int = 1  # channels per unit (head size for attention heads)
    members: dict = dataclasses.field(default_factory=dict)  # id(value) -> (value, axis)
    producers: list = dataclasses.field(default_factory=list)
    consumers: list = dataclasses.field(default_factory=list)
    slices: list = dataclasses.field(default_factory=list)
    depthwise: list = dataclasses.field(default_factory=list)
    reason: str | None = None
    start: ir.Node | None = None

    @property
    def units(self) -> int:
        return self.channels // self.unit

    @property
    def kind(self) -> str:
        if any(p.kind == "attention" for p in self.producers):
            return "heads"
        if len(self.producers) > 1:
            return "residual stream"
        if self.producers and self.producers[0].kind == "conv":
            return "channels"
        return "neurons"

    def describe(self) -> str:
        node = self.start
        return f"{self.kind} of {node.op_type} {node.name!r}" if node is not None else self.kind


def producer_kind(node: ir.Node) -> str | None:
    if node.domain in ("", "ai.onnx"):
        if node.op_type == "Conv":
            return "conv"
        if node.op_type == "MatMul":
            return "matmul"
        if node.op_type == "Gemm":
            return "gemm"
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        return "attention"
    return None


def _const(node: ir.Node, i: int) -> np.ndarray | None:
    inputs = node.inputs
    return constant_array(inputs[i]) if i < len(inputs) else None


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
        if group != 1:
            return None
        w = _owned_const(node, 1, "weight")
        if axis != 1:
            raise Decline(f"Conv {node.name!r} reads the channels on axis {axis}")
        if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET" or w.ndim not in (3, 4):
            raise Decline(f"Conv {node.name!r} with auto_pad or a {w.ndim - 2}-D kernel (its patches are not rebuilt)")
        return Consumer(node, "conv", int(np.prod(w.shape[2:])))
    if op == "MatMul":
        w = constant_array(node.inputs[1])
        if w is None:
            raise Decline(f"MatMul {node.name!r} multiplies the channels by an activation (e.g. attention scores)")
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
    group = Group(channels=0, start=start)
    if shape is None:
        group.reason = f"no shape for {out.name!r} from the probe run"
        return group
    try:
        axis = _check_producer(start, kind, shape)
        group.channels = int(shape[axis])
        if kind == "attention":
            heads = start.attributes.get_int("num_heads", 0)
            if heads <= 0 or group.channels % heads:
                raise Decline(f"Attention {start.name!r}: {group.channels} channels do not split into {heads} heads")
            group.unit = group.channels // heads
        _grow(group, out, axis, shape_of)
        if not group.consumers:
            raise Decline("no consumer reads the channels")
    except Decline as exc:
        group.reason = str(exc)
    return group


def _grow(group: Group, first: ir.Value, first_axis: int, shape_of) -> None:
    C = group.channels
    queue = [(first, first_axis)]
    group.members[id(first)] = (first, first_axis)
    done_back: set[int] = set()
    done_fwd: set[tuple[int, int]] = set()

    def add(value: ir.Value, axis: int):
        if id(value) in group.members:
            if group.members[id(value)][1] != axis:
                raise Decline(f"{value.name!r} joins the group on two different axes")
            return
        group.members[id(value)] = (value, axis)
        queue.append((value, axis))

    while queue:
        v, ax = queue.pop()
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
            _backward(group, node, v, ax, shape_of, add)
        for use in v.uses():
            user, index = use.node if hasattr(use, "node") else use[0], use.idx if hasattr(use, "idx") else use[1]
            if (id(user), index) in done_fwd:
                continue
            done_fwd.add((id(user), index))
            _forward(group, user, index, v, ax, shape, shape_of, add, C)


def _is_depthwise(node: ir.Node, channels: int) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return False
    w = constant_array(node.inputs[1])
    return (w is not None and node.attributes.get_int("group", 1) == channels == w.shape[0] and w.shape[1] == 1)


def _backward(group: Group, node: ir.Node, v: ir.Value, ax: int, shape_of, add) -> None:
    """`v` (a member) is an output of `node`: what node is to the group."""
    C = group.channels
    op = node.op_type
    kind = producer_kind(node)
    if _is_depthwise(node, C):
        if v is not node.outputs[0] or ax != 1:
            raise Decline(f"depthwise Conv {node.name!r} output used on axis {ax}")
        _owned_const(node, 1, "weight")
        group.depthwise.append(node)
        add(node.inputs[0], 1)
        return
    if kind is not None and v is node.outputs[0]:
        axis = _check_producer(node, kind, shape_of(v))
        if axis != ax:
            raise Decline(f"{op} {node.name!r} produces the channels on axis {axis}, the group has them on {ax}")
        if kind == "attention" and group.unit != C // node.attributes.get_int("num_heads", 1):
            raise Decline(f"Attention {node.name!r} has another head size than the group")
        if kind != "attention" and group.unit != 1:
            raise Decline(f"{op} {node.name!r} and attention heads share the channels")
        group.producers.append(Producer(node, kind))
        return
    ms = node.domain == "com.microsoft"
    if (op in UNARY and not ms) or (ms and op in MS_UNARY_BIAS):
        if op == "Clip" and any(i is not None and constant_array(i) is None for i in list(node.inputs)[1:]):
            raise Decline(f"Clip {node.name!r} has non-constant bounds")
        if op == "PRelu":
            _binary(group, node, v, ax, shape_of, add)
            return
        add(node.inputs[0], ax)
        if ms and len(node.inputs) > 1 and node.inputs[1] is not None:
            b = _owned_const(node, 1, "bias")
            if b.shape != (C,):
                raise Decline(f"{op} {node.name!r} bias of shape {list(b.shape)}")
            group.slices.append(ConstSlice(node, 1, 0))
        return
    if op in BINARY and not ms:
        if op == "Pow" and constant_array(node.inputs[1]) is None:
            raise Decline(f"Pow {node.name!r} with a non-constant exponent")
        _binary(group, node, v, ax, shape_of, add)
        return
    if op in POOLS and not ms:
        if ax != 1:
            raise Decline(f"{op} {node.name!r} on channel axis {ax}")
        add(node.inputs[0], 1)
        return
    if op in REDUCE and not ms:
        x = node.inputs[0]
        rank = len(shape_of(x) or ())
        axes = _reduce_axes(node, rank)
        keep = node.attributes.get_int("keepdims", 1)
        if axes is None or not axes:
            raise Decline(f"{op} {node.name!r} reduces over unknown or all axes")
        in_ax = ax
        if not keep:
            for a in axes:
                if a <= in_ax:
                    in_ax += 1
        if in_ax in axes:
            raise Decline(f"{op} {node.name!r} reduces over the channel axis")
        add(x, in_ax)
        return
    raise Decline(f"the channels come from {node.domain + '.' if node.domain else ''}{op} {node.name!r}, "
                  "which the grouping does not know")


def _binary(group: Group, node: ir.Node, v: ir.Value, ax: int, shape_of, add) -> None:
    C = group.channels
    rank = len(shape_of(v))
    for i, x in enumerate(node.inputs):
        if x is None:
            continue
        c = constant_array(x)
        if c is not None:
            aligned = ax - (rank - c.ndim)
            if aligned < 0 or c.shape[aligned] == 1:
                continue
            if c.shape[aligned] != C:
                raise Decline(f"{node.op_type} {node.name!r}: constant of shape {list(c.shape)} does not match {C} channels")
            group.slices.append(ConstSlice(node, i, aligned))
            continue
        xs = shape_of(x)
        if xs is None:
            raise Decline(f"no shape for {x.name!r} from the probe run")
        aligned = ax - (rank - len(xs))
        if aligned < 0 or xs[aligned] == 1:
            continue
        if xs[aligned] != C:
            raise Decline(f"{node.op_type} {node.name!r}: operand {x.name!r} of shape {list(xs)} does not match {C} channels")
        add(x, aligned)


def _forward(group, user: ir.Node, index: int, v, ax: int, shape, shape_of, add, C) -> None:
    """`v` (a member) is input `index` of `user`: what the user is to the group."""
    op = user.op_type
    ms = user.domain == "com.microsoft"
    if _is_depthwise(user, C) and index == 0:
        add(user.outputs[0], 1)
        return
    if not ms:
        cons = _consumer(user, index, ax, shape, C)
        if cons is not None:
            if group.unit != 1 and cons.block != 1:
                raise Decline(f"attention heads consumed by {op} {user.name!r}")
            group.consumers.append(cons)
            return
    if op == "Flatten" and not ms and index == 0:
        if user.attributes.get_int("axis", 1) != 1 or ax != 1:
            raise Decline(f"Flatten {user.name!r} with axis != 1 or channels on axis {ax}")
        flat = user.outputs[0]
        if flat.is_graph_output():
            raise Decline(f"the flattened channels reach graph output {flat.name!r}")
        block = int(np.prod(shape[2:]))
        for use in flat.uses():
            node2, idx2 = use[0], use[1]
            fshape = shape_of(flat)
            cons = _consumer(node2, idx2, len(fshape) - 1 if node2.op_type == "MatMul" else 1, fshape, C * block)
            if cons is None:
                raise Decline(f"the flattened channels go to {node2.op_type} {node2.name!r}, not to a Gemm/MatMul")
            cons.block, cons.flatten = block, user
            group.consumers.append(cons)
        return
    if ((op in UNARY or op in BINARY or op in POOLS) and not ms) or (ms and op in MS_UNARY_BIAS and index == 0):
        if op in BINARY and index == 1 and op in ("Pow",):
            raise Decline(f"Pow {user.name!r} uses the channels as an exponent")
        # Broadcast of the member along the other operand: the output has the channel axis (aligned).
        out = user.outputs[0]
        os = shape_of(out)
        if os is None:
            raise Decline(f"no shape for {out.name!r} from the probe run")
        out_ax = ax + (len(os) - len(shape))
        if os[out_ax] != C:
            raise Decline(f"{op} {user.name!r} output does not keep the {C} channels")
        add(out, out_ax)
        return
    if op in REDUCE and not ms:
        axes = _reduce_axes(user, len(shape))
        if axes is None or not axes or ax in axes:
            raise Decline(f"{op} {user.name!r} reduces over the channel axis (e.g. a LayerNorm)")
        keep = user.attributes.get_int("keepdims", 1)
        add(user.outputs[0], ax if keep else ax - sum(a < ax for a in axes))
        return
    if op == "Conv" and not ms:
        raise Decline(f"grouped Conv {user.name!r} (group {user.attributes.get_int('group', 1)}) reads the channels")
    where = f"{user.domain}.{op}" if user.domain else op
    raise Decline(f"the channels go to {where} {user.name!r} (input {index}), which the grouping does not know")


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
    if c.kind == "conv":
        k = m.shape[0] // int(np.prod(w.shape[2:]))
        new = m.T.reshape(w.shape[0], k, *w.shape[2:])
    elif c.kind == "gemm" and c.node.attributes.get_int("transB", 0):
        new = m.T
    else:
        new = m
    set_const(graph, c.node, 1, np.ascontiguousarray(new, dtype=w.dtype), tag)


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
    """Rows of the consumer matrix that belong to the given channels."""
    return (np.asarray(channels)[:, None] * c.block + np.arange(c.block)[None, :]).ravel()


def unit_channels(group: Group, units) -> np.ndarray:
    u = group.unit
    return np.sort(np.concatenate([np.arange(k * u, (k + 1) * u) for k in units])) if len(units) else np.zeros(0, int)


def apply(graph: ir.Graph, group: Group, keep: np.ndarray, tag: str = "pruned") -> None:
    """Physically remove every channel of the group not in `keep` (sorted channel indices)."""
    keep = np.asarray(keep, dtype=np.int64)
    n = len(keep)
    C = group.channels
    for p in group.producers:
        node = p.node
        w = constant_array(node.inputs[1])
        if p.kind == "conv":
            set_const(graph, node, 1, w[keep], tag)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                set_const(graph, node, 2, constant_array(node.inputs[2])[keep], tag)
        elif p.kind == "matmul":
            set_const(graph, node, 1, np.ascontiguousarray(w[:, keep]), tag)
        elif p.kind == "gemm":
            trans = node.attributes.get_int("transB", 0)
            set_const(graph, node, 1, np.ascontiguousarray(w[keep] if trans else w[:, keep]), tag)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = constant_array(node.inputs[2])
                if c.size > 1:
                    set_const(graph, node, 2, c.reshape(c.shape[:-1] + (-1,))[..., keep], tag)
        else:  # attention: the same head channels in the Q, K and V blocks of the packed weight
            cols = np.concatenate([keep, C + keep, 2 * C + keep])
            set_const(graph, node, 1, np.ascontiguousarray(w[:, cols]), tag)
            set_const(graph, node, 2, constant_array(node.inputs[2])[cols], tag)
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", n // group.unit)
    for node in group.depthwise:
        set_const(graph, node, 1, constant_array(node.inputs[1])[keep], tag)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            set_const(graph, node, 2, constant_array(node.inputs[2])[keep], tag)
        node.attributes["group"] = ir.AttrInt64("group", n)
    for s in group.slices:
        set_const(graph, s.node, s.index, np.ascontiguousarray(np.take(constant_array(s.node.inputs[s.index]), keep, axis=s.axis)), tag)
    for c in group.consumers:
        m = consumer_matrix(c)
        set_consumer_matrix(graph, c, m[consumer_rows(c, keep)], tag)
        if c.flatten is not None:
            _set_dim(c.flatten.outputs[0], 1, n * c.block)
    for v, ax in group.members.values():
        _set_dim(v, ax, n)


def _set_dim(v: ir.Value, axis: int, n: int) -> None:
    if v.shape is not None and axis < len(v.shape):
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
        if c.kind == "conv":
            new = m.T.reshape(w.shape)
        elif c.kind == "gemm" and c.node.attributes.get_int("transB", 0):
            new = m.T
        else:
            new = m
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
