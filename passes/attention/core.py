"""Attention fusion, stage 1 (-O3, onnxruntime targets): the attention core becomes one kernel.

    out = merge_heads(softmax(scale * split_heads(Q) split_heads(K)^T + mask) split_heads(V))
        = com.microsoft.MultiHeadAttention(Q, K, V, key_padding_mask=mask_index,
                                           num_heads=H, scale=scale, unidirectional=causal)

for Q, K, V of shape (batch, seq, hidden), whatever computes them; stage 2 (packed.py) then takes
constant projections of one input into com.microsoft.Attention.

The block is found from each Softmax and walked through uses and producers; every structural
fact is checked, and a candidate that fails a check is declined with the reason (in the compile
report), leaving the block to the merged-QKV pass (-O2, runs after this one):
  * Softmax over the last axis of rank-4 scores (batch, heads, q, k).
  * Q, K^T and V reach the score and context MatMuls through Reshape/Transpose chains whose
    effect is proved, by following the chain's symbolic shapes (passes/_lib/symbolic_shapes.py), to be exactly
    "split the hidden axis into H heads of size D and move heads before the sequence"; the context
    comes back through Transpose/Reshape to (batch, seq, H * D). H and D are read from the reshape
    targets and must agree for Q, K and V (V's head size may differ) and with the weights' width.
  * scale: the product of every scalar Mul/Div on Q, on K^T and on the scores (exporters use
    Div by sqrt(D), Mul by 1/sqrt(D), or sqrt(1/sqrt(D)) on each of Q and K^T) must equal
    1/sqrt(D) (relative 1e-5); it is written into the `scale` attribute as read.
  * mask: the terms added to (or Where-selected into) the scores are checked by
    mask_analysis.analyze: a function of one 2-D 0/1 integer graph input with the block's
    (batch, key length) dims that is 0 on kept keys and <= -1e4 on masked ones, kept meaning
    mask = 1 (padding, becomes mask_index) or mask = 1 and k <= q (causal, unidirectional=1),
    or a causal mask with no input at all; no mask at all (ViT) is fine too.
  * after Softmax only a Cast to float32 or the SDPA NaN guard Where(IsNaN(p), 0, p) may
    come before the context MatMul.
  * every intermediate value of the block is used only inside it (Shape reads aside), so the
    old nodes all die; Q, K and V are rank 3, with the same (batch, seq) dims as the mask.
Soundness caveats: the mask input must hold only 0/1 (the attention_mask contract; the kernels
read "> 0" as "keep"); rows in which every key is masked (an all-zero attention_mask row) have no
meaningful result in any exporter's graph (eager gives a uniform row, SDPA zeros) and get yet
another one from the fused kernel. mask_filter_value is the exporter's fill (float32's lowest for
-inf), so partly masked rows match exactly.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnxopt.kernels import catalogue
from onnxopt.passes._lib import graph as lib
from onnxopt.passes._lib.graph import new_initializer
from onnxopt.passes._lib.mask_analysis import MaskError, MaskInfo, MaskTerm, analyze
from onnxopt.passes._lib.symbolic_shapes import Dim, SymbolicShapes
from onnxopt.passes.attention.layout import Layout
from onnxopt.passes.base import Decline, OptPass
from onnxopt.passes.registry import register

MS_DOMAIN = lib.MS
SCALE_RTOL = 1e-5


def _constant(value: ir.Value | None) -> np.ndarray | None:
    # The legacy exporter shares weights through Identity nodes.
    return lib.constant_array(value, through_identity=True)


def _scalar(value: ir.Value | None) -> float | None:
    return lib.scalar(value, through_identity=True, max_rank=None)


@dataclasses.dataclass
class _Block:
    softmax: ir.Node
    out: ir.Value
    heads: int
    head_size: int
    v_head_size: int
    scale: float
    q: ir.Value
    k: ir.Value
    v: ir.Value
    mask: MaskInfo | None
    nodes: list[ir.Node]  # the core, from the Q/K/V chains to `out`
    flat: bool = False  # `out` is (batch * seq, hidden): the fused output is reshaped to it


def _is_float32_cast(node: ir.Node) -> bool:
    attr = node.attributes.get("to")
    return node.op_type == "Cast" and attr is not None and attr.value == ir.DataType.FLOAT


# Ops whose output has the element type of some of their inputs: op -> those inputs (None: all).
_SAME_DTYPE = {
    **dict.fromkeys(("Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Concat", "Max", "Min", "Sum", "BiasGelu"), None),
    **dict.fromkeys(
        ("Reshape", "Transpose", "Split", "Squeeze", "Unsqueeze", "Gather", "Expand", "Slice", "Flatten", "Pow",
         "ReduceMean", "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Softmax",
         "Relu", "Gelu", "FastGelu", "Erf", "Tanh", "Sigmoid", "Sqrt", "Identity", "Attention",
         "MultiHeadAttention", "Conv"),
        (0,),
    ),
    "Where": (1, 2),
}


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    """The element type of a value: declared, else found through type-preserving producers."""
    stack, seen = [value], set()
    while stack and len(seen) < 512:
        value = stack.pop()
        if value is None or value in seen:
            continue
        seen.add(value)
        if value.dtype is not None:
            return value.dtype
        if value.const_value is not None:
            return value.const_value.dtype
        node = value.producer()
        if node is None:
            continue
        if node.op_type == "Cast" and "to" in node.attributes:
            return ir.DataType(node.attributes["to"].value)
        if node.op_type in _SAME_DTYPE:
            indices = _SAME_DTYPE[node.op_type] or range(len(node.inputs))
            stack.extend(node.inputs[i] for i in reversed(indices) if i < len(node.inputs))
    return None


def _leads_to_scores(value: ir.Value) -> bool:
    """Whether value is computed from a MatMul of two computed tensors through score ops."""
    for _ in range(8):
        node = value.producer()
        if node is None:
            return False
        if lib.standard(node, "MatMul"):
            return all(_constant(v) is None for v in node.inputs)
        if lib.standard(node, "Add", "Mul", "Div", "Cast", "Where"):
            data = node.inputs[1:] if node.op_type == "Where" else node.inputs
            nonconst = [v for v in data if v is not None and _constant(v) is None]
            if not nonconst:
                return False
            value = nonconst[0]
            continue
        return False
    return False


@register("attention", level=3, stage="fusion", targets=catalogue.kernel("MultiHeadAttention").emit_targets, order=50)
class AttentionCorePass(OptPass):
    """Self-attention cores (scores, mask, softmax, context) become com.microsoft MultiHeadAttention."""

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        shapes = SymbolicShapes(graph)
        self._mask_casts: dict[ir.Value, ir.Value] = {}
        self._masks: dict[tuple, MaskInfo | Decline] = {}
        count = 0
        for softmax in [n for n in graph if lib.standard(n, "Softmax")]:
            if softmax.graph is not graph:
                continue
            try:
                block = self._match(softmax, shapes)
            except Decline as exc:
                self.decline(None, softmax, str(exc))
                continue
            self._rewrite(model, block)
            count += 1
        return count

    # -- matching ----------------------------------------------------------------------------
    def _match(self, softmax: ir.Node, shapes: SymbolicShapes) -> _Block:
        graph = softmax.graph
        opset = graph.opset_imports.get("", 13)
        rank = shapes.rank(softmax.inputs[0])
        attr = softmax.attributes.get("axis")
        axis = attr.value if attr is not None else (-1 if opset >= 13 else 1)
        if rank is None:
            raise Decline("the rank of the softmax input is unknown")
        if rank != 4:
            raise Decline(f"softmax input has rank {rank}, not 4 (batch, heads, q, k)")
        if axis % rank != rank - 1:
            raise Decline(f"softmax over axis {axis}, not the last axis")
        nodes: list[ir.Node] = [softmax]
        dtype = _dtype(softmax.inputs[0])
        if dtype != ir.DataType.FLOAT:
            # The catalogue has float16 MultiHeadAttention on cuda, but the mask and scale proofs here
            # are made for float32 (the fill value is float32's lowest) and no cuda device checks them.
            raise Decline(f"the scores are {dtype.name if dtype is not None else 'of unknown type'}, not float32")

        # After the softmax: optional float32 Cast, optional NaN guard, then probs @ V.
        probs = softmax.outputs[0]
        ctx_mm = None
        for _ in range(4):
            uses = [u.node for u in probs.uses()]
            if len(uses) == 1 and lib.standard(uses[0], "Cast") and _is_float32_cast(uses[0]):
                nodes.append(uses[0])
                probs = uses[0].outputs[0]
                continue
            guard = self._nan_guard(probs, uses)
            if guard is not None:
                nodes.extend(guard)
                probs = guard[-1].outputs[0]
                continue
            if len(uses) == 1 and lib.standard(uses[0], "MatMul") and uses[0].inputs[0] is probs:
                ctx_mm = uses[0]
            break
        if ctx_mm is None:
            raise Decline("the softmax output does not feed a single MatMul with V")
        nodes.append(ctx_mm)

        scores_mm, score_scale, terms, score_nodes = self._scores(softmax.inputs[0])
        nodes.extend(score_nodes)
        nodes.append(scores_mm)

        q4, q_chain, q_scale = self._walk_back(scores_mm.inputs[0], allow_scale=True)
        k4, k_chain, k_scale = self._walk_back(scores_mm.inputs[1], allow_scale=True)
        v4, v_chain, _ = self._walk_back(ctx_mm.inputs[1], allow_scale=False)
        nodes.extend(q_chain + k_chain + v_chain)

        q_layout = self._replay(q4, q_chain, shapes, "query")
        k_layout = self._replay(k4, k_chain, shapes, "key")
        v_layout = self._replay(v4, v_chain, shapes, "value")
        if not q_layout.same([("b",), ("h",), ("s",), ("d",)]):
            raise Decline(f"query reaches the scores as {q_layout.describe()}, not [b, h, s, d]")
        if not k_layout.same([("b",), ("h",), ("d",), ("s",)]):
            raise Decline(f"key reaches the scores as {k_layout.describe()}, not [b, h, d, s] (K transposed)")
        if not v_layout.same([("b",), ("h",), ("s",), ("d",)]):
            raise Decline(f"value reaches the context MatMul as {v_layout.describe()}, not [b, h, s, d]")
        heads, head_size = q_layout.head_dims()
        k_heads, k_head_size = k_layout.head_dims()
        v_heads, v_head_size = v_layout.head_dims()
        if not (heads == k_heads == v_heads):
            raise Decline(f"heads inconsistent: query {heads}, key {k_heads}, value {v_heads}")
        if head_size != k_head_size:
            raise Decline(f"query head size {head_size} != key head size {k_head_size}")
        if not (heads.is_int and head_size.is_int and v_head_size.is_int):
            raise Decline("the number of heads or the head size is not a constant")
        heads, head_size, v_head_size = int(heads), int(head_size), int(v_head_size)
        batch, q_len = q_layout.sizes["b"], q_layout.sizes["s"]
        if k_layout.sizes["b"] != batch or v_layout.sizes["b"] != batch:
            raise Decline("query, key and value are not proven to have the same batch")
        kv_len = k_layout.sizes["s"]
        if v_layout.sizes["s"] != kv_len:
            raise Decline("key and value are not proven to have the same length")

        # Back to (batch, seq, heads * head size).
        out, out_chain, flat = self._walk_out(ctx_mm.outputs[0], batch, q_len, heads, v_head_size, shapes)
        nodes.extend(out_chain)

        scale = score_scale * q_scale * k_scale
        expected = 1.0 / math.sqrt(head_size)
        if not math.isclose(scale, expected, rel_tol=SCALE_RTOL):
            raise Decline(f"scale {scale:.6g} != 1/sqrt({head_size}) = {expected:.6g}")

        mask = self._analyze_mask(terms, shapes, batch, q_len, kv_len, heads) if terms else None

        block = _Block(
            softmax=softmax, out=out, heads=heads, head_size=head_size, v_head_size=v_head_size,
            scale=scale, q=q4, k=k4, v=v4, mask=mask, nodes=nodes, flat=flat,
        )
        for name, value in (("query", q4), ("key", k4), ("value", v4)):
            if shapes.rank(value) != 3:
                raise Decline(f"the {name} input of the block is not a 3-D (batch, seq, hidden) tensor")
        self._check_exclusive(block)
        return block

    def _analyze_mask(self, terms, shapes, batch, q_len, kv_len, heads) -> MaskInfo:
        # Every layer adds the same mask value: evaluate it once per pass run.
        key = (tuple((t.value, t.fill, t.keep_when) for t in terms), batch, q_len, kv_len, heads)
        if key not in self._masks:
            try:
                self._masks[key] = analyze(terms, shapes, batch, q_len, kv_len, heads)
            except MaskError as exc:
                self._masks[key] = Decline(str(exc))
        result = self._masks[key]
        if isinstance(result, Decline):
            raise Decline(str(result))
        return result

    @staticmethod
    def _nan_guard(probs: ir.Value, uses: list[ir.Node]) -> list[ir.Node] | None:
        """Where(IsNaN(p), 0, p), the NaN guard SDPA exports put after the softmax."""
        if len(uses) != 2:
            return None
        isnan = next((n for n in uses if lib.standard(n, "IsNaN")), None)
        where = next((n for n in uses if lib.standard(n, "Where")), None)
        if isnan is None or where is None:
            return None
        zero = _constant(where.inputs[1])
        if (
            where.inputs[0] is not isnan.outputs[0]
            or where.inputs[2] is not probs
            or zero is None
            or zero.size != 1
            or float(zero.reshape(-1)[0]) != 0.0
            or len(isnan.outputs[0].uses()) != 1
        ):
            return None
        return [isnan, where]

    def _scores(self, value: ir.Value):
        """Walk back from the softmax input to the Q @ K^T MatMul: scale factor and mask terms."""
        terms: list[MaskTerm] = []
        nodes: list[ir.Node] = []
        factor = 1.0
        scaled = False
        for _ in range(16):
            node = value.producer()
            if node is None or node.domain not in ("", "ai.onnx"):
                break
            op = node.op_type
            if op == "MatMul":
                if any(_constant(v) is not None for v in node.inputs):
                    raise Decline("the scores MatMul has a constant operand")
                return node, factor, terms, nodes
            if op in ("Mul", "Div"):
                c = _scalar(node.inputs[1]) if op == "Div" else (_scalar(node.inputs[0]) or _scalar(node.inputs[1]))
                if c is None or c == 0.0:
                    raise Decline(f"the scores are scaled by a {op} with a non-scalar or non-constant factor")
                if op == "Mul" and _scalar(node.inputs[0]) is not None and _scalar(node.inputs[1]) is None:
                    data = node.inputs[1]
                else:
                    data = node.inputs[0]
                factor *= c if op == "Mul" else 1.0 / c
                scaled = True
                nodes.append(node)
                value = data
                continue
            if op == "Add":
                sides = [_leads_to_scores(v) for v in node.inputs]
                if sides.count(True) != 1:
                    raise Decline("cannot tell the scores from the mask in the Add before the softmax")
                if scaled:
                    raise Decline("the mask is added before the scores are scaled")
                scores, mask = (node.inputs[0], node.inputs[1]) if sides[0] else (node.inputs[1], node.inputs[0])
                terms.append(MaskTerm(mask))
                nodes.append(node)
                value = scores
                continue
            if op == "Where":
                cond, a, b = node.inputs
                fill_b, fill_a = _scalar(b), _scalar(a)
                if scaled:
                    raise Decline("the mask is applied before the scores are scaled")
                if fill_b is not None and fill_a is None:
                    terms.append(MaskTerm(cond, fill=fill_b, keep_when=True))
                    value = a
                elif fill_a is not None and fill_b is None:
                    terms.append(MaskTerm(cond, fill=fill_a, keep_when=False))
                    value = b
                else:
                    raise Decline("the Where before the softmax does not select between scores and a constant")
                nodes.append(node)
                continue
            if op == "Cast" and _is_float32_cast(node):
                nodes.append(node)
                value = node.inputs[0]
                continue
            raise Decline(f"the softmax input is computed by {op}, not from Q @ K^T, a scale and a mask")
        raise Decline("the softmax input is not computed from a MatMul of Q and K^T")

    @staticmethod
    def _walk_back(value: ir.Value, *, allow_scale: bool):
        """Back through Reshape/Transpose (and scalar Mul/Div) to the projected tensor."""
        chain: list[ir.Node] = []
        factor = 1.0
        for _ in range(16):
            node = value.producer()
            if lib.standard(node, "Transpose", "Reshape"):
                chain.append(node)
                value = node.inputs[0]
                continue
            if allow_scale and lib.standard(node, "Mul", "Div"):
                c = _scalar(node.inputs[1])
                data = node.inputs[0]
                if c is None and node.op_type == "Mul":
                    c, data = _scalar(node.inputs[0]), node.inputs[1]
                if c is not None and c != 0.0 and _constant(data) is None:
                    chain.append(node)
                    factor *= c if node.op_type == "Mul" else 1.0 / c
                    value = data
                    continue
            break
        return value, chain[::-1], factor

    @staticmethod
    def _replay(start: ir.Value, chain: list[ir.Node], shapes: SymbolicShapes, what: str) -> Layout:
        dims = shapes.dims(start)
        if dims is None or len(dims) != 3:
            rank = None if dims is None else len(dims)
            raise Decline(f"the {what} projection is not a (batch, seq, hidden) tensor (rank {rank})")
        if not dims[2].is_int:
            raise Decline(f"the {what} hidden size is not a constant")
        layout = Layout([("b",), ("s",), ("n",)], {"b": dims[0], "s": dims[1], "n": dims[2]})
        for node in chain:
            if node.op_type == "Transpose":
                perm = node.attributes.get("perm")
                layout = layout.transpose(perm.value if perm is not None else None)
            elif node.op_type == "Reshape":
                try:
                    layout = layout.reshape(shapes.dims(node.outputs[0]) or ())
                except Decline as exc:
                    raise Decline(f"{what}: {exc}") from None
        return layout

    def _walk_out(self, ctx: ir.Value, batch, q_len, heads, v_head_size, shapes):
        """Forward from the context MatMul through Transpose/Reshape to (batch, seq, H * Dv), or to
        (batch * seq, H * Dv) when the exporter flattens straight for the output projection."""
        sizes = {"b": batch, "s": q_len, "h": Dim(heads), "d": Dim(v_head_size)}
        layout = Layout([("b",), ("h",), ("s",), ("d",)], sizes)
        targets = {
            Layout([("b",), ("s",), ("h", "d")], sizes).normalized(): False,
            Layout([("b", "s"), ("h", "d")], sizes).normalized(): True,
        }
        value, chain = ctx, []
        for _ in range(8):
            if chain and layout.normalized() in targets:
                return value, chain, targets[layout.normalized()]
            # Shape reads of the context do not need it materialized.
            uses = [u.node for u in value.uses() if not lib.standard(u.node, "Shape")]
            if len(uses) != 1 or value.is_graph_output() or not lib.standard(uses[0], "Transpose", "Reshape") or uses[0].inputs[0] is not value:
                break
            node = uses[0]
            if node.op_type == "Transpose":
                perm = node.attributes.get("perm")
                layout = layout.transpose(perm.value if perm is not None else None)
            else:
                layout = layout.reshape(shapes.dims(node.outputs[0]) or ())
            chain.append(node)
            value = node.outputs[0]
        raise Decline(f"the attention context is not brought back to [b, s, h*d] (got {layout.describe()})")

    # -- uses --------------------------------------------------------------------------------
    def _check_exclusive(self, block: _Block) -> None:
        inside = set(block.nodes)
        for node in inside:
            for value in node.outputs:
                if value is block.out:
                    continue
                if value.is_graph_output():
                    raise Decline(f"{value.name!r} inside the attention block is a graph output")
                for use in value.uses():
                    if use.node not in inside and not lib.standard(use.node, "Shape"):
                        raise Decline(f"{value.name!r} inside the attention block is also used by {use.node.op_type} "
                                       f"{use.node.name!r}")

    # -- rewriting ---------------------------------------------------------------------------
    def _rewrite(self, model: ir.Model, block: _Block) -> None:
        graph = model.graph
        anchor = block.out.producer()
        new_nodes = []
        mask_index = None
        if block.mask is not None and block.mask.input is not None:
            mask_index = self._mask_index(graph, block.mask.input)
        attrs = {"num_heads": block.heads, "scale": float(block.scale)}
        if block.mask is not None and (block.mask.input is not None or block.mask.causal):
            attrs["unidirectional"] = int(block.mask.causal)
            attrs["mask_filter_value"] = float(block.mask.filter_value)
        inputs = [block.q, block.k, block.v, None, mask_index]
        op = "MultiHeadAttention"
        while inputs and inputs[-1] is None:
            inputs.pop()
        node = ir.Node(MS_DOMAIN, op, inputs, attributes=[_attr(k, v) for k, v in attrs.items()],
                       name=f"{block.softmax.name}.{op}", num_outputs=1)
        new_nodes.append(node)
        result = node.outputs[0]
        if block.flat:
            width = block.heads * block.v_head_size
            shape = new_initializer(graph, np.array([-1, width], np.int64), f"{block.out.name}.shape")
            flatten = ir.Node("", "Reshape", [result, shape], name=f"{block.softmax.name}.{op}.flatten", num_outputs=1)
            new_nodes.append(flatten)
            result = flatten.outputs[0]
        graph.insert_before(anchor, new_nodes)
        old = block.out
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        lib.remove_dead(graph, anchor)
        result.name, result.type, result.shape = old.name, old.type, old.shape
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        graph.opset_imports.setdefault(MS_DOMAIN, 1)

    def _mask_index(self, graph: ir.Graph, mask: ir.Value) -> ir.Value:
        if mask.dtype == ir.DataType.INT32:
            return mask
        if mask not in self._mask_casts:
            cast = ir.Node("", "Cast", [mask], attributes=[ir.AttrInt64("to", ir.DataType.INT32)],
                           name=f"{mask.name}.int32", num_outputs=1)
            cast.outputs[0].name = f"{mask.name}.int32"
            cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(ir.DataType.INT32), mask.shape
            first = next(iter(graph), None)
            if first is None:
                graph.append(cast)
            else:
                graph.insert_before(first, cast)
            self._mask_casts[mask] = cast.outputs[0]
        return self._mask_casts[mask]


def _attr(name: str, value) -> ir.Attr:
    if isinstance(value, bool) or isinstance(value, int):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    return ir.AttrInt64s(name, [int(v) for v in value])
