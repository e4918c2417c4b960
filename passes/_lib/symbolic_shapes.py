"""Symbolic dimensions for the attention matcher (a helper module: it registers no pass).

The attention fusion has to prove facts such as "this Reshape keeps the batch and sequence axes of
the projection" or "the attention mask has the same batch and sequence sizes as the hidden state".
Exporters compute reshape targets at run time (`Concat(Shape(x)[0], Shape(x)[1], -1, 16)`), and
the legacy exporter leaves intermediate values without shapes, so declared shapes are not enough.

`SymbolicShapes(graph)` propagates, forward through the graph, for every value:
  * its dims, each a `Dim`: a monomial `coef * s1 * s2 ...` over symbols, where a symbol is a
    named dimension of a graph input (ONNX: equal dim_param means equal size) or an unknown
    dimension of one particular value (equal only to itself);
  * for small integer tensors (shape arithmetic), their contents as Dims.
A rule exists for the ops exporters use around attention (elementwise with broadcasting, MatMul,
Gemm, Reshape, Transpose, Gather, Slice, Concat, Split, reductions, the com.microsoft norms,
GELUs and attention ops...); any other op's outputs get their declared shape or fresh symbols.
Every rule only claims equalities that hold for every input on which the model runs without
error, so "two dims are the same Dim" is a proof, and "different" only means "not proven".
"""

from __future__ import annotations

import itertools
import math

import onnx_ir as ir

_MAX_DATA = 16  # longest integer tensor tracked by value (shape tensors are rank-sized)
_ids = itertools.count(1)


class Dim:
    """coef * product(symbols), symbols as sorted ids; coef == 0 stands for the size 0."""

    __slots__ = ("coef", "syms")

    def __init__(self, coef: int, syms: tuple[int, ...] = ()):
        self.coef = int(coef)
        self.syms = tuple(sorted(syms)) if coef else ()

    @property
    def is_int(self) -> bool:
        return not self.syms

    def __mul__(self, other: Dim) -> Dim:
        return Dim(self.coef * other.coef, self.syms + other.syms)

    def divide(self, other: Dim) -> Dim | None:
        """self / other when it is a monomial with an integer coefficient, else None."""
        if other.coef == 0:
            return None
        rest = list(self.syms)
        for s in other.syms:
            if s not in rest:
                return None
            rest.remove(s)
        if self.coef % other.coef:
            return None
        return Dim(self.coef // other.coef, tuple(rest))

    def __eq__(self, other) -> bool:
        if isinstance(other, int):
            return self.is_int and self.coef == other
        return isinstance(other, Dim) and self.coef == other.coef and self.syms == other.syms

    def __hash__(self) -> int:
        return hash((self.coef, self.syms))

    def __int__(self) -> int:
        if not self.is_int:
            raise ValueError(f"{self} is symbolic")
        return self.coef

    def __repr__(self) -> str:
        parts = ([str(self.coef)] if self.coef != 1 or not self.syms else []) + [f"s{s}" for s in self.syms]
        return "*".join(parts)


def _product(dims) -> Dim | None:
    out = Dim(1)
    for d in dims:
        if d is None:
            return None
        out = out * d
    return out


_UNARY = {
    "Abs", "Cast", "CastLike", "Ceil", "Clip", "Cos", "Dropout", "Elu", "Erf", "Exp", "Floor",
    "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log",
    "LogSoftmax", "LpNormalization", "Mish", "Neg", "Not", "QuickGelu", "Reciprocal", "Relu",
    "Round", "Selu", "Sigmoid", "Sign", "Sin", "Softmax", "Softplus", "Softsign", "Sqrt", "Tanh",
    "ThresholdedRelu", "Trilu", "LayerNormalization", "SimplifiedLayerNormalization",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu", "BatchNormalization",
    "InstanceNormalization", "GroupNormalization",
}
_BROADCAST = {
    "Add", "And", "BiasGelu", "BitShift", "Div", "Equal", "Greater", "GreaterOrEqual", "Less",
    "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Sum", "Where",
    "Xor",
}
# com.microsoft ops with a rule of their own, and every com.microsoft op this module knows.
_CONTRIB_RULES = {"Attention", "MultiHeadAttention", "FusedMatMul"}
_CONTRIB_OPS = _CONTRIB_RULES | {
    "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization", "LayerNormalization",
}
_REDUCE = {
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
}


class SymbolicShapes:
    """Symbolic dims (and small integer contents) of every value of `graph`, computed on demand."""

    def __init__(self, graph: ir.Graph) -> None:
        self._graph = graph
        self._opset = graph.opset_imports.get("", 1) if graph.opset_imports else 1
        self._named: dict[str, int] = {}
        self._dims: dict[ir.Value, tuple | None] = {}
        self._data: dict[ir.Value, list | None] = {}
        self._done: set[ir.Node] = set()
        # symbol id -> (a, c): the symbol is min(a, c) for a Dim a and an int c >= 1 (a Slice of a
        # constant table by a run-time length, as position embeddings do).
        self._min_of: dict[int, tuple[Dim, int]] = {}

    # -- public queries ---------------------------------------------------------------------
    def dims(self, value: ir.Value | None) -> tuple | None:
        """The value's dims (tuple of Dim or None per axis), or None when even the rank is unknown."""
        if value is None:
            return None
        self._ensure(value)
        return self._dims.get(value)

    def rank(self, value: ir.Value | None) -> int | None:
        d = self.dims(value)
        return None if d is None else len(d)

    def data(self, value: ir.Value | None) -> list | None:
        """Contents of a small integer tensor as Dims (None entries unknown), flattened."""
        if value is None:
            return None
        self._ensure(value)
        return self._data.get(value)

    def named(self, name: str) -> Dim:
        if name not in self._named:
            self._named[name] = next(_ids)
        return Dim(1, (self._named[name],))

    # -- propagation ------------------------------------------------------------------------
    def _ensure(self, value: ir.Value) -> None:
        if value in self._dims:
            return
        producer = value.producer()
        if producer is None or producer.graph is not self._graph:
            self._dims[value] = self._declared(value)
            self._data[value] = self._const_data(value)
            return
        # Iterative post-order over producers (graphs are deep; recursion would overflow).
        stack = [producer]
        while stack:
            node = stack[-1]
            if node in self._done:
                stack.pop()
                continue
            pending = []
            for inp in node.inputs:
                if inp is None or inp in self._dims:
                    continue
                p = inp.producer()
                if p is None or p.graph is not self._graph:
                    self._dims[inp] = self._declared(inp)
                    self._data[inp] = self._const_data(inp)
                elif p not in self._done:
                    pending.append(p)
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self._done.add(node)
            self._infer(node)

    def _fresh(self) -> Dim:
        return Dim(1, (next(_ids),))

    def _declared(self, value: ir.Value) -> tuple | None:
        shape = value.shape
        const = value.const_value
        if shape is None and const is not None:
            shape = const.shape
        if shape is None:
            return None
        out = []
        for d in shape.dims:
            if isinstance(d, int):
                out.append(Dim(d))
            elif getattr(d, "value", None):
                out.append(self.named(str(d.value)))
            else:
                out.append(self._fresh())
        return tuple(out)

    @staticmethod
    def _const_data(value: ir.Value) -> list | None:
        if value.is_graph_input():
            return None
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None or tensor.size > _MAX_DATA:
            return None
        array = tensor.numpy()
        if array.dtype.kind not in "iub":
            return None
        return [Dim(int(x)) for x in array.reshape(-1).tolist()]

    def _set(self, value: ir.Value, dims, data=None) -> None:
        if dims is None:
            dims = self._declared(value)
        elif value.shape is not None and len(value.shape.dims) == len(dims):
            # Fill dims we could not derive from the declared shape's integers.
            dims = tuple(
                Dim(d) if (x is None and isinstance(d, int)) else x for x, d in zip(dims, value.shape.dims)
            )
        self._dims[value] = tuple(x if x is not None else self._fresh() for x in dims) if dims is not None else None
        if data is None and value.const_value is not None:
            data = self._const_data(value)
        self._data[value] = data

    def _int_attr(self, node: ir.Node, name: str, default=None):
        attr = node.attributes.get(name)
        return default if attr is None else attr.value

    def _const_ints(self, value: ir.Value | None) -> list[int] | None:
        data = self.data(value)
        if data is None or any(d is None or not d.is_int for d in data):
            return None
        return [int(d) for d in data]

    def _infer(self, node: ir.Node) -> None:  # noqa: C901 - one rule per op family
        op = node.op_type
        ins = [self.dims(v) if v is not None else None for v in node.inputs]
        outs = node.outputs
        if not outs:
            return
        domain = "" if node.domain == "ai.onnx" else node.domain
        rule = getattr(self, f"_op_{op}", None) if (domain == "com.microsoft") == (op in _CONTRIB_RULES) else None
        try:
            if domain not in ("", "com.microsoft") or (domain == "com.microsoft" and op not in _CONTRIB_OPS):
                result = None
            elif rule is not None:
                result = rule(node, ins)
            elif op in _UNARY:
                result = [ins[0]] if ins and ins[0] is not None else None
            elif op in _BROADCAST:
                result = [self._broadcast([d for d in ins if True])]
            elif op in _REDUCE:
                result = [self._reduce(node, ins)]
            else:
                result = None
        except (ValueError, IndexError, TypeError, ZeroDivisionError):
            result = None
        datas = None
        if result is not None and isinstance(result, tuple):
            result, datas = result
        for i, value in enumerate(outs):
            dims = result[i] if result is not None and i < len(result) else None
            data = datas[i] if datas is not None and i < len(datas) else None
            self._set(value, dims, data)
        if op in ("Add", "Mul", "Sub", "Div", "Equal", "Where", "Cast", "Max", "Min", "Identity") and domain == "":
            self._data[outs[0]] = self._data_elementwise(node) or self._data.get(outs[0])

    # -- helpers ----------------------------------------------------------------------------
    def _broadcast(self, dims_list) -> tuple | None:
        if any(d is None for d in dims_list):
            return None
        rank = max(len(d) for d in dims_list)
        out = []
        for axis in range(rank):
            cands = [d[axis - rank + len(d)] for d in dims_list if axis - rank + len(d) >= 0]
            not_one = [c for c in cands if c is None or not (c.is_int and c.coef == 1)]
            if not not_one:
                out.append(Dim(1))
                continue
            # min(a, k) broadcast with a is a: drop such candidates when a is among them.
            not_one = [c for c in not_one if not any(o is not None and self._is_min_with(c, o) for o in not_one)] or not_one
            first = not_one[0]
            if first is not None and all(c == first for c in not_one):
                out.append(first)
            else:
                ints = [c for c in not_one if c is not None and c.is_int]
                # A known size > 1 fixes the result: the others must equal it or be 1.
                out.append(ints[0] if ints else None)
        return tuple(out)

    def _is_min_with(self, c: Dim | None, a: Dim) -> bool:
        # broadcast(a, min(a, k)) is a on every input where it does not fail: either min(a, k)
        # equals a, or a > k and then the broadcast needs k == 1.
        if c is None or len(c.syms) != 1 or c.coef != 1:
            return False
        bound = self._min_of.get(c.syms[0])
        return bound is not None and bound[0] == a

    def _axes(self, node: ir.Node, input_index: int = 1) -> list[int] | None:
        attr = node.attributes.get("axes")
        if attr is not None:
            return list(attr.value)
        if len(node.inputs) > input_index and node.inputs[input_index] is not None:
            return self._const_ints(node.inputs[input_index])
        return None

    def _reduce(self, node: ir.Node, ins) -> tuple | None:
        x = ins[0]
        if x is None:
            return None
        axes = self._axes(node)
        keep = self._int_attr(node, "keepdims", 1)
        if axes is None or not axes:
            if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
                return None
            if self._int_attr(node, "noop_with_empty_axes", 0):
                return x
            axes = list(range(len(x)))
        axes = {a % len(x) for a in axes}
        if keep:
            return tuple(Dim(1) if i in axes else d for i, d in enumerate(x))
        return tuple(d for i, d in enumerate(x) if i not in axes)

    def _data_elementwise(self, node: ir.Node) -> list | None:
        op = node.op_type
        if op in ("Cast", "Identity"):
            return self.data(node.inputs[0])
        datas = [self.data(v) for v in node.inputs]
        if any(d is None for d in datas) or not datas:
            return None
        n = max(len(d) for d in datas)
        if any(len(d) not in (1, n) for d in datas):
            return None
        datas = [d * n if len(d) == 1 else d for d in datas]
        out = []
        for items in zip(*datas):
            out.append(_scalar_op(op, items))
        return out

    # -- op rules: each returns [dims per output] or ([dims...], [data...]) ------------------
    def _op_Shape(self, node, ins):
        x = ins[0]
        if x is None:
            return None
        start = self._int_attr(node, "start", 0)
        end = self._int_attr(node, "end", None)
        picked = list(x)[slice(start, end)]
        return [(Dim(len(picked)),)], [picked]

    def _op_Size(self, node, ins):
        return [()], [[_product(ins[0])]] if ins[0] is not None else None

    def _op_Constant(self, node, ins):
        tensor = ir.convenience.get_const_tensor(node.outputs[0])
        if tensor is None:
            return None
        return [tuple(Dim(d) for d in tensor.shape)], [self._const_data(node.outputs[0])]

    def _op_ConstantOfShape(self, node, ins):
        shape = self.data(node.inputs[0])
        if shape is None:
            return None
        dims = tuple(shape)
        data = None
        if len(dims) == 1 and dims[0] is not None and dims[0].is_int and dims[0].coef <= _MAX_DATA:
            attr = node.attributes.get("value")
            fill = 0 if attr is None else attr.value.numpy().reshape(-1)[0]
            if float(fill) == int(fill):
                data = [Dim(int(fill))] * dims[0].coef
        return [dims], [data]

    def _op_Unsqueeze(self, node, ins):
        x = ins[0]
        axes = self._axes(node)
        if x is None or axes is None:
            return None
        rank = len(x) + len(axes)
        axes = sorted(a % rank for a in axes)
        out, it = [], iter(x)
        for i in range(rank):
            out.append(Dim(1) if i in axes else next(it))
        data = self.data(node.inputs[0])
        return [tuple(out)], [data if data is not None and len(data) == 1 else None]

    def _op_Squeeze(self, node, ins):
        x = ins[0]
        if x is None:
            return None
        axes = self._axes(node)
        if axes is None:
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                return None
            axes = [i for i, d in enumerate(x) if d == 1]
        axes = {a % len(x) for a in axes}
        out = tuple(d for i, d in enumerate(x) if i not in axes)
        return [out], [self.data(node.inputs[0])]

    def _op_Concat(self, node, ins):
        if any(d is None for d in ins):
            return None
        axis = self._int_attr(node, "axis", 0) % len(ins[0])
        total = Dim(0)
        for d in ins:
            total = _add(total, d[axis])
        out = list(ins[0])
        out[axis] = total
        for i in range(len(out)):
            if i != axis:
                out[i] = self._broadcast([(d[i],) for d in ins])[0] if all(d[i] is not None for d in ins) else None
        data = None
        datas = [self.data(v) for v in node.inputs]
        if len(out) == 1 and all(d is not None for d in datas):
            data = [x for d in datas for x in d]
        return [tuple(out)], [data]

    def _op_Gather(self, node, ins):
        x, idx = ins[0], ins[1]
        if x is None or idx is None:
            return None
        axis = self._int_attr(node, "axis", 0) % len(x)
        out = tuple(x[:axis]) + tuple(idx) + tuple(x[axis + 1 :])
        data = None
        xdata, idata = self.data(node.inputs[0]), self._const_ints(node.inputs[1])
        if xdata is not None and idata is not None and len(x) == 1:
            data = [xdata[i] for i in idata]
        return [out], [data]

    def _op_GatherND(self, node, ins):
        # out = indices.shape[:-1] + data.shape[batch_dims + k:], k = indices.shape[-1] (dynamo
        # exports index the attention mask so).
        x, idx = ins[0], ins[1]
        if x is None or idx is None or not idx or not idx[-1].is_int:
            return None
        start = self._int_attr(node, "batch_dims", 0) + int(idx[-1])
        if start > len(x):
            return None
        return [tuple(idx[:-1]) + tuple(x[start:])], [None]

    def _op_Slice(self, node, ins):
        x = ins[0]
        if x is None:
            return None
        if len(node.inputs) < 3:  # opset < 10: attributes
            starts, ends = self._int_attr(node, "starts"), self._int_attr(node, "ends")
            axes, steps = self._int_attr(node, "axes"), None
        else:
            starts, ends = self._const_ints(node.inputs[1]), self.data(node.inputs[2])
            axes = self._const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            steps = self._const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
            if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
                return None
            if len(node.inputs) > 4 and node.inputs[4] is not None and steps is None:
                return None
        if starts is None or ends is None:
            return None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        out = list(x)
        xdata = self.data(node.inputs[0])
        data = None
        for a, s, e, st in zip(axes, starts, ends, steps):
            a %= len(x)
            e = e if isinstance(e, Dim) or e is None else Dim(e)
            d = x[a]
            if e is None:
                out[a] = None
                continue
            if d is not None and d.is_int and e.is_int:
                rng = range(d.coef)[slice(s, e.coef, st)]
                out[a] = Dim(len(rng))
                if xdata is not None and len(x) == 1 and len(xdata) == d.coef:
                    data = [xdata[i] for i in rng]
            elif st == 1 and s == 0 and (e == d or (e.is_int and e.coef >= 2**62)):
                out[a] = d
                data = xdata if len(x) == 1 else None
            elif st == 1 and s == 0 and d is not None and d.is_int and d.coef >= 1 and not e.is_int:
                out[a] = self._fresh()
                self._min_of[out[a].syms[0]] = (e, d.coef)
            else:
                out[a] = None
        return [tuple(out)], [data]

    def _op_Reshape(self, node, ins):
        x = ins[0]
        target = self.data(node.inputs[1])
        if target is None:
            shape_dims = ins[1]
            if shape_dims is None or shape_dims[0] is None or not shape_dims[0].is_int:
                return None
            return [tuple([None] * shape_dims[0].coef)]
        allowzero = self._int_attr(node, "allowzero", 0)
        out = []
        for i, t in enumerate(target):
            if t is not None and t == 0 and not allowzero:
                out.append(x[i] if x is not None and i < len(x) else None)
            else:
                out.append(t)
        if sum(1 for t in out if t is not None and t == -1) == 1:
            total = _product(x) if x is not None else None
            known = _product(t for t in out if not (t is not None and t == -1))
            inferred = total.divide(known) if total is not None and known is not None else None
            out = [inferred if (t is not None and t == -1) else t for t in out]
        data = self.data(node.inputs[0]) if len(out) == 1 else None
        return [tuple(out)], [data]

    def _op_Expand(self, node, ins):
        shape = self.data(node.inputs[1])
        if shape is None or ins[0] is None:
            return None
        return [self._broadcast([ins[0], tuple(shape)])]

    def _op_Transpose(self, node, ins):
        x = ins[0]
        if x is None:
            return None
        perm = self._int_attr(node, "perm", None)
        perm = list(range(len(x)))[::-1] if perm is None else list(perm)
        return [tuple(x[p] for p in perm)]

    def _op_MatMul(self, node, ins):
        a, b = ins
        if a is None or b is None or len(a) < 1 or len(b) < 1:
            return None
        if len(a) == 1 or len(b) == 1:
            if len(a) == 1 and len(b) == 1:
                return [()]
            if len(a) == 1:
                return [tuple(b[:-2]) + (b[-1],)]
            return [tuple(a[:-1])]
        batch = self._broadcast([tuple(a[:-2]), tuple(b[:-2])])
        if batch is None:
            return None
        return [tuple(batch) + (a[-2], b[-1])]

    def _op_Gemm(self, node, ins):
        a, b = ins[0], ins[1]
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m = a[1] if self._int_attr(node, "transA", 0) else a[0]
        n = b[0] if self._int_attr(node, "transB", 0) else b[1]
        return [(m, n)]

    def _op_Flatten(self, node, ins):
        x = ins[0]
        if x is None:
            return None
        axis = self._int_attr(node, "axis", 1) % (len(x) + 1) if len(x) else 0
        return [(_product(x[:axis]), _product(x[axis:]))]

    def _op_Split(self, node, ins):
        x = ins[0]
        if x is None:
            return None
        axis = self._int_attr(node, "axis", 0) % len(x)
        sizes = self._int_attr(node, "split", None)
        if sizes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = self._const_ints(node.inputs[1])
            if sizes is None:
                return None
        if sizes is None:
            n = len(node.outputs)
            d = x[axis]
            part = d.divide(Dim(n)) if d is not None else None
            sizes = [part] * n
        else:
            sizes = [Dim(s) for s in sizes]
        return [tuple(s if i == axis else d for i, d in enumerate(x)) for s in sizes]

    def _op_Conv(self, node, ins):
        x, w = ins[0], ins[1]
        if x is None or w is None or len(x) != len(w) or len(x) < 3:
            return None
        spatial = static_ints(x[2:])
        kernel = self._int_attr(node, "kernel_shape", None) or static_ints(w[2:])
        if spatial is None or kernel is None:
            return [(x[0], w[0]) + (None,) * len(spatial or x[2:])]
        n = len(spatial)
        strides = self._int_attr(node, "strides", None) or [1] * n
        dilations = self._int_attr(node, "dilations", None) or [1] * n
        pads = self._int_attr(node, "pads", None) or [0] * (2 * n)
        auto_pad = self._int_attr(node, "auto_pad", "NOTSET")
        out = []
        for i in range(n):
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out.append(Dim(-(-spatial[i] // strides[i])))
                continue
            if auto_pad == "VALID":
                pads = [0] * (2 * n)
            span = dilations[i] * (kernel[i] - 1) + 1
            out.append(Dim((spatial[i] + pads[i] + pads[i + n] - span) // strides[i] + 1))
        return [(x[0], w[0]) + tuple(out)]

    def _op_Range(self, node, ins):
        start, limit, delta = (self.data(v) for v in node.inputs)
        if start and delta and limit and start[0] == 0 and delta[0] == 1 and limit[0] is not None:
            return [(limit[0],)]
        return [(None,)]

    def _op_Trilu(self, node, ins):
        return [ins[0]]

    def _op_Attention(self, node, ins):
        x, w = ins[0], ins[1]
        if x is None or w is None or len(x) != 3:
            return None
        sizes = self._int_attr(node, "qkv_hidden_sizes", None)
        v = Dim(sizes[2]) if sizes else (w[1].divide(Dim(3)) if w[1] is not None else None)
        return [(x[0], x[1], v)]

    def _op_MultiHeadAttention(self, node, ins):
        q = ins[0]
        if q is None or len(q) != 3:
            return None
        v = ins[2] if len(ins) > 2 else None
        return [(q[0], q[1], v[2] if v is not None and len(v) == 3 else (q[2] if v is None else None))]

    def _op_FusedMatMul(self, node, ins):
        if any(self._int_attr(node, k, 0) for k in ("transA", "transB", "transBatchA", "transBatchB")):
            return None
        return self._op_MatMul(node, ins)


def _add(a: Dim | None, b: Dim | None) -> Dim | None:
    if a is None or b is None:
        return None
    if a.coef == 0:
        return b
    if b.coef == 0:
        return a
    if a.syms == b.syms:
        return Dim(a.coef + b.coef, a.syms)
    return None


def _scalar_op(op: str, items) -> Dim | None:
    if any(x is None for x in items):
        return None
    if op == "Mul":
        return items[0] * items[1]
    if op == "Add":
        return _add(items[0], items[1])
    if op == "Sub":
        a, b = items
        if a.is_int and b.is_int:
            return Dim(a.coef - b.coef)
        return a if b == 0 else None
    if op == "Div":
        a, b = items
        if a.is_int and b.is_int and b.coef:
            return Dim(math.floor(a.coef / b.coef)) if a.coef * b.coef >= 0 else None
        return a.divide(b)
    if op in ("Max", "Min"):
        a, b = items
        if a == b:
            return a
        if a.is_int and b.is_int:
            return Dim(max(a.coef, b.coef) if op == "Max" else min(a.coef, b.coef))
        return None
    if op == "Equal":
        a, b = items
        if a == b:
            return Dim(1)
        if a.is_int and b.is_int:
            return Dim(0)
        # A symbolic size is never negative; the exporters compare shapes with -1.
        if (a.is_int and a.coef < 0 and a.syms == ()) or (b.is_int and b.coef < 0):
            return Dim(0)
        return None
    if op == "Where":
        cond, x, y = items
        if not cond.is_int:
            return None
        return x if cond.coef else y
    return None


def static_ints(dims) -> list[int] | None:
    if dims is None or any(d is None or not d.is_int for d in dims):
        return None
    return [int(d) for d in dims]
