"""One of each graph primitive the passes share: op tests, constant readers, use-def walkers, the
MatMul + bias finder, `new_initializer` and dead-node removal.

Everything walks onnx_ir's uses and producers (never a map keyed by tensor names). Readers return
None when the value is not what they look for; the `constant`/`rewritable_constant` forms raise
`Decline` with a reason a person can read (onnxopt.passes.base). The MatchResult helpers `ok` and
`fail` are for onnxscript rule classes' `check`.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.passes.base import Decline

STD_DOMAINS = ("", "ai.onnx")
MS = "com.microsoft"


# -- MatchResult helpers for rule classes ---------------------------------------------------------
def ok() -> pattern.MatchResult:
    return pattern.MatchResult()


def fail(reason: str, *sources) -> pattern.MatchResult:
    return pattern.MatchResult().fail(reason, *sources)


def declines_as_fail(check):
    """For a rule's `check`: a Decline raised inside (by need() or a reader) becomes the failed
    MatchResult onnxscript expects, so rule classes say no the same way imperative passes do."""
    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except Decline as exc:
            return fail(str(exc))
    return wrapper


# -- ops and the model's opsets --------------------------------------------------------------------
def standard(node: ir.Node | None, *ops: str) -> bool:
    """`node` is a standard (ai.onnx) op, one of `ops` when given."""
    return node is not None and node.domain in STD_DOMAINS and (not ops or node.op_type in ops)


def model_opset(model: ir.Model) -> int:
    return model.graph.opset_imports.get("", model.opset_imports.get("", 1))


def ensure_opset(model: ir.Model, domain: str, version: int = 1) -> None:
    model.graph.opset_imports.setdefault(domain, version)
    model.opset_imports.setdefault(domain, version)


def optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


# -- use-def walkers -------------------------------------------------------------------------------
def produced_by(value: ir.Value | None, *ops: str) -> ir.Node | None:
    """The node computing `value` if it is one of the standard ops `ops`, else None."""
    node = value.producer() if value is not None else None
    return node if standard(node, *ops) else None


def only_use(value: ir.Value) -> ir.Node | None:
    """The single node consuming `value` (None when it has several uses or is a graph output)."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """For a binary node with `value` as one operand, the other operand."""
    a, b = node.inputs[0], node.inputs[1]
    if a is value:
        return b
    return a if b is value else None


def outside_uses(nodes: list[ir.Node], final: ir.Value) -> str | None:
    """None when every value computed by `nodes`, except `final`, is used by `nodes` only."""
    inside = set(nodes)
    for node in nodes:
        for value in node.outputs:
            if value is final:
                continue
            if value.is_graph_output() or any(u.node not in inside for u in value.uses()):
                return f"intermediate {value.name!r} ({node.op_type}) is also used outside the pattern"
    return None


# -- constants -------------------------------------------------------------------------------------
def constant_array(value: ir.Value | None, *, through_identity: bool = False) -> np.ndarray | None:
    """The value's numpy array if it is a constant the model cannot override, else None.

    `through_identity`: look through Identity nodes first (the legacy exporter shares weights so)."""
    for _ in range(8 if through_identity else 0):
        node = value.producer() if value is not None and not value.is_graph_input() else None
        if not standard(node, "Identity"):
            break
        value = node.inputs[0]
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar(value: ir.Value | None, *, through_identity: bool = False, max_rank: int | None = 1) -> float | None:
    """The float value of a constant holding one element of rank <= `max_rank` (None: any), else None.

    Rank <= 1 by default so that broadcasting it cannot change the other operand's shape (for
    operands of rank >= 1, which every pattern here has)."""
    array = constant_array(value, through_identity=through_identity)
    if array is None or array.size != 1 or (max_rank is not None and array.ndim > max_rank) or array.dtype.kind != "f":
        return None
    return float(array.reshape(-1)[0])


def split_constant(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    """(computed operand, constant operand) of a binary node with exactly one constant operand."""
    a, b = node.inputs[0], node.inputs[1]
    a_const, b_const = constant_array(a) is not None, constant_array(b) is not None
    if a_const == b_const:
        return None, None
    return (b, a) if a_const else (a, b)


def constant(value: ir.Value | None, what: str) -> np.ndarray:
    """The constant's array; raises Decline saying why `value` is not one."""
    if value is None:
        raise Decline(f"{what} is missing")
    if value.is_graph_input():
        if value.const_value is not None:
            raise Decline(f"{what} '{value.name}' is a graph input with an initializer "
                          "(a default the caller may override)")
        raise Decline(f"{what} '{value.name}' is a graph input")
    array = constant_array(value)
    if array is None:
        raise Decline(f"{what} '{value.name}' is not a constant")
    return array


def rewritable_constant(value: ir.Value | None, what: str) -> np.ndarray:
    """A constant this rewrite may replace: also used by one node only, and not a graph output."""
    array = constant(value, what)
    if not single_use(value):
        users = len(value.uses()) + int(value.is_graph_output())
        raise Decline(f"{what} '{value.name}' is shared ({users} uses); folding would change the other users")
    return array


def split_sizes(split: ir.Node, width: int) -> list[int]:
    """The sizes a Split cuts a `width`-wide axis into: its `split` attribute (opset < 13), its
    constant sizes input, else equal parts; Decline when they are not constant or do not fit."""
    attr = split.attributes.get("split")
    if attr is not None:
        sizes = [int(s) for s in attr.as_ints()]
    elif optional_input(split, 1) is not None:
        array = constant_array(split.inputs[1], through_identity=True)
        if array is None:
            raise Decline("the split sizes are not constant")
        sizes = [int(s) for s in array.reshape(-1)]
    else:
        n = len(split.outputs)
        if width % n:
            raise Decline(f"a {width}-wide axis does not split evenly into {n}")
        sizes = [width // n] * n
    if sum(sizes) != width:
        raise Decline(f"the split sizes {sizes} do not cover the {width}-wide axis")
    return sizes


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape if every dimension is a known integer, else None."""
    if value is None or value.shape is None:
        return None
    dims = value.shape.dims
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(dims)


def close(got: float | None, want: float, rel: float = 1e-5) -> bool:
    return got is not None and np.isfinite(got) and abs(got - want) <= rel * abs(want)


# -- MatMul + constant bias -------------------------------------------------------------------------
def matmul_bias(value: ir.Value, width: int | None = None) -> tuple[ir.Node, ir.Node, ir.Value] | None:
    """(Add, MatMul, bias value) when `value` = MatMul(a, W) + b, b a constant [N] vector and N the
    last dimension of W (and `width` when given); None otherwise."""
    add = produced_by(value, "Add")
    if add is None or len(add.inputs) != 2:
        return None
    for mm, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        matmul = produced_by(mm, "MatMul")
        bias = constant_array(b)
        if matmul is None or mm is b or bias is None or bias.ndim != 1:
            continue
        w = matmul.inputs[1]
        w_array = constant_array(w)
        w_shape = w_array.shape if w_array is not None else (w.shape.dims if w.shape is not None else None)
        n = bias.shape[0]
        if w_shape and len(w_shape) >= 2 and isinstance(w_shape[-1], int) and w_shape[-1] == n and width in (None, n):
            return add, matmul, b
    return None


# -- creating and removing -------------------------------------------------------------------------
def fresh_name(graph: ir.Graph | None, base: str) -> str:
    """`base`, or `base.N`, whichever no initializer of `graph` has yet."""
    taken = graph.initializers if graph is not None else {}
    name, n = base, 1
    while name in taken:
        name, n = f"{base}.{n}", n + 1
    return name


def new_initializer(graph: ir.Graph, array: np.ndarray, base: str, op=None) -> ir.Value:
    """An initializer holding `array`: an existing one with the same dtype, shape and bytes if the
    graph has it (-O1 stores equal initializers once, so a second compile finds nothing to
    deduplicate), else a new one named `base` or `base.N`, never a name already taken.

    `op`: the onnxscript rewriter's builder inside a rule's `rewrite`, which registers the new
    initializer when the rewrite is applied."""
    array = np.ascontiguousarray(array)
    for value in graph.initializers.values():
        tensor = value.const_value
        if (tensor is not None and not value.is_graph_input() and tuple(tensor.shape) == array.shape
                and tensor.dtype.numpy() == array.dtype and np.array_equal(tensor.numpy(), array)):
            return value
    name = fresh_name(graph, base)
    tensor = ir.tensor(array, name=name)
    if op is not None:
        return op.initializer(tensor, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def replace(graph: ir.Graph, nodes: list[ir.Node], final: ir.Value, new: ir.Node, at: ir.Node) -> None:
    """Put `new` after `at`, route `final`'s users (graph outputs included) to its first output,
    and remove `nodes`."""
    ir.convenience.replace_nodes_and_values(graph, at, nodes, [new], [final], [new.outputs[0]])


def substitute(graph: ir.Graph, last: ir.Node, new_nodes: list[ir.Node], result: ir.Value) -> None:
    """Insert `new_nodes` before `last`, route the users of `last`'s first output (graph outputs
    included) to `result`, which takes that output's name, type and shape, and remove what is left
    unused (`last` and, transitively, its producers)."""
    graph.insert_before(last, new_nodes)
    old = last.outputs[0]
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    remove_dead(graph, last)
    result.name, result.type, result.shape = old.name, old.type, old.shape


def need_kernel(target: str, op: str, dtype: ir.DataType | None, domain: str = MS) -> None:
    """Decline unless the target runs the fused kernel `domain.op` in `dtype` (kernels/catalogue.py)."""
    from onnxopt.kernels import catalogue

    name = dtype.numpy().name if dtype is not None else None
    if name is None or not catalogue.has_kernel(target, op, domain, name):
        runs = ", ".join(catalogue.kernel(op, domain).dtypes.get(target, ())) if catalogue.kernel(op, domain) else "nothing"
        raise Decline(f"{op} on {target} takes {runs}, not {name or 'an unknown type'}")


def fuse(model: ir.Model, nodes: list[ir.Node], final: ir.Value, new: ir.Node, at: ir.Node) -> None:
    """`replace` in the main graph, importing the new node's domain (e.g. com.microsoft) if needed."""
    if new.domain not in STD_DOMAINS:
        ensure_opset(model, new.domain)
    replace(model.graph, nodes, final, new, at)


def remove_dead(graph: ir.Graph, start: ir.Node) -> None:
    """Remove `start` if nothing uses it and, transitively, producers left without uses."""
    stack = [start]
    while stack:
        node = stack.pop()
        if node.graph is not graph:
            continue
        if any(v.uses() or v.is_graph_output() for v in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for v in inputs:
            producer = v.producer()
            if producer is not None and producer.graph is graph:
                stack.append(producer)


def session_of(model: ir.Model, make_session, extra: list[ir.Value] = ()):
    """`make_session(model)` on the model as it stands, also returning the values `extra`, with
    unused initializers left out (onnxruntime drops unused initializers and then fails to find
    them among the external ones); the model is given back unchanged."""
    graph = model.graph
    added = [v for v in extra if not v.is_graph_output() and not v.is_graph_input()]
    for v in added:
        graph.outputs.append(v)
    unused = [(n, v) for n, v in graph.initializers.items()
              if not v.uses() and not v.is_graph_input() and not v.is_graph_output()]
    for name, _ in unused:
        graph.initializers.pop(name)
    try:
        return make_session(model)
    finally:
        for v in added:
            graph.outputs.remove(v)
        for _, v in unused:
            graph.register_initializer(v)


def run_shards(options: dict, model: ir.Model, extra: list[ir.Value], work, shards, job, take, *,
               optimize: bool = False) -> None:
    """Map `work(session, shard, job)` over `shards` on a session of `model` fetching `extra` too,
    calling `take(index, result)` in shard index order. Through `options["shard_runner"]` (the
    compiler's worker processes or Ray tasks, onnxopt.scaleout) when given, else here, one shard after
    another on one session from `options["make_session"]` (`make_kernel_session` when `optimize`)."""
    runner = options.get("shard_runner")
    if runner is not None:
        return runner(model, extra, work, shards, job, take, optimize=optimize)
    make_session = (options.get("make_kernel_session") if optimize else None) or options["make_session"]
    session = session_of(model, make_session, extra)
    for i, shard in enumerate(shards):
        take(i, work(session, shard, job))
