"""--fp16: weights and compute in float16, with float32 islands where precision or kernels need it.

Rewrite: every node N that touches float32 tensors gets a precision p(N) in {fp16, fp32}; its
float32 inputs/outputs bound to the same type parameter (ONNX schema) take that type. A value whose
producer and consumer disagree is converted by one Cast per (value, type), shared by its uses.

    p(N) = fp32  if N is a precision island (Softmax, Exp, Pow, Log, sum/mean reductions, ...;
                 kernels/fp16_support.PRECISION_ISLANDS), or the target has no float16 kernel for
                 N (kernels/fp16_support.runs_fp16; on onnxruntime CPU that is all arithmetic), or
                 LayerNormalization with stash_type != 1, or N has a small constant input with a
                 nonzero value that float16 would flush to 0 (an epsilon: x + 1e-12 must stay
                 x + 1e-12), or N holds a subgraph;
    p(N) = the majority precision of N's float neighbours otherwise (producers of its inputs,
                 consumers of its outputs, graph inputs/outputs at their interface type, and large
                 constants count as fp16 since they are stored in fp16). Candidates start at, and
                 ties go to, the target's compute precision (fp16 where MatMul has a float16
                 kernel, fp32 on onnxruntime CPU); repeated to a fixed point (a local optimum, not
                 a global minimum of Casts). This puts Casts where fewer values cross and keeps
                 data movement (Reshape, Transpose) on the side of its neighbours instead of
                 adding Cast pairs around it.

Constants: stored in float16 when a fp16 node reads them or when they are large (more than
`LARGE_CONSTANT` elements: the file halves even where compute stays fp32; a Cast to float32 feeds
fp32 readers, which onnxruntime folds at session start). Finite values beyond the float16 range are
clamped to +-65504; infinities and NaN keep their meaning. Small constants read in both precisions
are stored twice (`{name}.fp16`) instead of cast at run time.

Interface: graph inputs and outputs keep float32 unless `fp16_io` (then every float32 input and
output becomes float16, cast where a fp32 island reads or writes it).

Casts: afterwards Cast(x, to=dtype(x)) is removed and Cast(Cast(x)) with both Casts to float16 or
float32 becomes one Cast (or x itself when the outer Cast returns x's type), so no two such Casts
are adjacent (the model's own float -> int -> float chains are left alone).

Not converted: models with control flow (If/Loop/Scan subgraphs) are declined as a whole.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.kernels import fp16_support
from onnxopt.passes.base import OptPass
from onnxopt.passes.registry import register

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = fp16_support.FP16_MAX
# Smallest positive float16 (subnormal): nonzero magnitudes below half of it round to 0.
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)
LARGE_CONSTANT = 64  # elements; above this a fp32-only constant is still stored in fp16
SMALL_CONSTANT = 16  # elements; an epsilon-like constant this small decides its reader's precision
MAX_SWEEPS = 20
# Model metadata marking a converted model: the pass runs once (its fp32 islands are on purpose).
DONE_KEY = "onnxopt.fp16"


def _underflows(arr: np.ndarray) -> bool:
    a = np.abs(np.asarray(arr, dtype=np.float64))
    return bool(np.any((a > 0) & (a < FP16_TINY / 2)))


def _const(value: ir.Value | None) -> np.ndarray | None:
    # An initializer's value only (not a Constant node's): what this pass stores in float16 itself.
    if value is None or value.is_graph_input() or value.const_value is None:
        return None
    return value.const_value.numpy()


def _schema(node: ir.Node, opset: int):
    if node.domain not in ("", "ai.onnx"):
        return None
    try:
        return onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:
        return None


class _NodeInfo:
    """The float32 slots of one node that follow its precision."""

    __slots__ = ("inputs", "outputs", "fixed", "reason", "prec")

    def __init__(self) -> None:
        self.inputs: set[int] = set()
        self.outputs: set[int] = set()
        self.fixed = False
        self.reason = ""
        self.prec = F16


@register("fp16", level=0, stage="lossy", flag="fp16")
class Fp16Pass(OptPass):
    """float32 -> float16 weights and compute, fp32 islands for precision and missing kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.target = "cpu"
        self.fp16_io = False
        self.stats: dict = {}

    def configure(self, options: dict) -> None:
        self.target = options.get("target", "cpu")
        self.fp16_io = bool(options.get("fp16_io", False))

    # ---- analysis ------------------------------------------------------------------------------

    def _slots(self, node: ir.Node, opset: int) -> _NodeInfo:
        info = _NodeInfo()
        ins = list(node.inputs)
        fixed_inputs = fp16_support.FIXED_TYPE_INPUTS.get(node.op_type, frozenset()) if node.domain in ("", "ai.onnx") else frozenset()
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            if ins and ins[0] is not None and ins[0].dtype == F32:
                info.inputs.add(0)
            if node.attributes.get_int("to", 0) == F32.value:
                info.outputs.add(0)
            return info
        schema = _schema(node, opset)
        if schema is None:
            # Fused kernels (com.microsoft) take one float type T for all float tensors.
            info.inputs = {i for i, v in enumerate(ins) if v is not None and v.dtype == F32 and i not in fixed_inputs}
            info.outputs = {i for i, v in enumerate(node.outputs) if v.dtype == F32}
            return info
        formal_in, formal_out = list(schema.inputs), list(schema.outputs)
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

        def param(formals, i):
            if not formals:
                return None
            return formals[min(i, len(formals) - 1)].type_str

        params = set()
        for i, v in enumerate(ins):
            p = param(formal_in, i)
            if v is not None and v.dtype == F32 and i not in fixed_inputs and "tensor(float16)" in allowed.get(p, ()):
                params.add(p)
        for i, v in enumerate(node.outputs):
            p = param(formal_out, i)
            if v.dtype == F32 and p in allowed and "tensor(float16)" in allowed[p] and not any(
                param(formal_in, j) == p for j in range(len(ins))
            ):
                params.add(p)  # an output-only type parameter (e.g. EyeLike's) follows the node
        info.inputs = {i for i, v in enumerate(ins)
                       if v is not None and v.dtype == F32 and i not in fixed_inputs and param(formal_in, i) in params}
        info.outputs = {i for i, v in enumerate(node.outputs) if v.dtype == F32 and param(formal_out, i) in params}
        return info

    def _fix_reason(self, node: ir.Node, info: _NodeInfo) -> str:
        if any(isinstance(a.value, (ir.Graph, list)) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            return "holds a subgraph"
        if fp16_support.is_precision_island(node.op_type, node.domain):
            return f"precision island: {node.op_type} stays float32"
        if not fp16_support.runs_fp16(self.target, node.op_type, node.domain):
            dom = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            return f"target {self.target} has no float16 kernel for {dom}{node.op_type}"
        if node.op_type == "LayerNormalization" and node.attributes.get_int("stash_type", 1) != 1:
            return "LayerNormalization with stash_type != 1 computes its statistics in the input type"
        for i in info.inputs:
            arr = _const(node.inputs[i])
            if arr is not None and arr.size <= SMALL_CONSTANT and _underflows(arr):
                return f"constant input {node.inputs[i].name!r} has nonzero values that float16 flushes to 0"
        return ""

    def _io_dtype(self):
        return F16 if self.fp16_io else F32

    def _value_prec(self, v: ir.Value, infos: dict) -> ir.DataType | None:
        """Precision a value arrives in (None for constants: they follow their readers)."""
        if v.is_graph_input():
            return self._io_dtype()
        if v.const_value is not None:
            return None
        prod = v.producer()
        if prod is None:
            return F32
        info = infos.get(prod)
        if info is not None and v.index() in info.outputs:
            return info.prec
        return F32

    def _use_prec(self, node: ir.Node, idx: int, infos: dict) -> ir.DataType:
        info = infos.get(node)
        if info is not None and idx in info.inputs:
            return info.prec
        return F32

    def _neighbour_vote(self, node: ir.Node, info: _NodeInfo, infos: dict) -> tuple[int, int]:
        n16 = n32 = 0
        for i in info.inputs:
            v = node.inputs[i]
            p = self._value_prec(v, infos)
            if p is None:
                if v.const_value is not None and v.const_value.size > LARGE_CONSTANT:
                    n16 += 1  # stored in fp16: reading it in fp16 saves a Cast of the weight
                continue
            n16, n32 = (n16 + 1, n32) if p == F16 else (n16, n32 + 1)
        for o in info.outputs:
            v = node.outputs[o]
            if v.is_graph_output():
                n16, n32 = (n16 + 1, n32) if self._io_dtype() == F16 else (n16, n32 + 1)
            for user, idx in v.uses():
                p = self._use_prec(user, idx, infos)
                n16, n32 = (n16 + 1, n32) if p == F16 else (n16, n32 + 1)
        return n16, n32

    # ---- rewrite -------------------------------------------------------------------------------

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        self.stats = {"fp16_nodes": 0, "fp32_nodes": 0, "casts_inserted": 0, "casts_removed": 0,
                      "constants_fp16": 0, "constants_clamped": 0}
        if any(n.graph is not graph for n in ir.traversal.RecursiveGraphIterator(graph)):
            self.decline("fp16", None, "control flow (If/Loop/Scan subgraphs) is not converted")
            return 0
        if model.metadata_props.get(DONE_KEY) or not any(v.dtype == F32 for v in _all_values(graph)):
            return 0  # already converted (fp32 islands remain by design) or nothing in float32
        opset = model.opset_imports.get("", 13)
        self._lift_float_constants(graph)
        _infer_missing_dtypes(graph, opset)

        infos: dict[ir.Node, _NodeInfo] = {}
        for node in graph:
            info = self._slots(node, opset)
            if not info.inputs and not info.outputs:
                continue
            reason = self._fix_reason(node, info)
            if reason:
                info.fixed, info.reason, info.prec = True, reason, F32
                self.decline("fp16", node, reason)
            infos[node] = info

        # Ties go to the precision the target computes in: float16 where its arithmetic kernels
        # take float16, float32 on onnxruntime CPU (where only data movement does).
        tie = F16 if fp16_support.runs_fp16(self.target, "MatMul") else F32
        order = [n for n in graph if n in infos and not infos[n].fixed]
        for node in order:
            infos[node].prec = tie
        for _ in range(MAX_SWEEPS):
            changed = False
            for node in order + order[::-1]:
                info = infos[node]
                n16, n32 = self._neighbour_vote(node, info, infos)
                want = F16 if n16 > n32 else F32 if n32 > n16 else tie
                if want != info.prec:
                    info.prec, changed = want, True
            if not changed:
                break

        orig = {id(v): v.dtype for v in _all_values(graph)}
        fired = self._retype(graph, infos, orig)
        removed = _simplify_casts(graph)
        self.stats["casts_removed"] = removed
        graph.sort()
        model.metadata_props[DONE_KEY] = f"target={self.target};io={'float16' if self.fp16_io else 'float32'}"
        return fired

    def _lift_float_constants(self, graph: ir.Graph) -> None:
        """float32 Constant nodes become initializers, so all constants are stored one way."""
        for node in list(graph):
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or "value" not in node.attributes:
                continue
            tensor = node.attributes["value"].as_tensor()
            if tensor.dtype != F32:
                continue
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            value = ir.Value(name=out.name, type=ir.TensorType(F32), shape=ir.Shape(tensor.shape.dims),
                             const_value=ir.tensor(tensor.numpy(), name=out.name))
            out.replace_all_uses_with(value)
            graph.remove(node, safe=True)
            graph.register_initializer(value)

    def _retype(self, graph: ir.Graph, infos: dict, orig: dict) -> int:
        io = self._io_dtype()
        fired = 0
        # 1. node outputs and attributes
        for node, info in infos.items():
            if info.prec == F16:
                self.stats["fp16_nodes"] += 1
                fired += 1
                for o in info.outputs:
                    node.outputs[o].dtype = F16
                if node.op_type == "Cast" and 0 in info.outputs:
                    node.attributes["to"] = ir.AttrInt64("to", F16.value)
            else:
                self.stats["fp32_nodes"] += 1
        # 2. graph inputs at the interface type
        if self.fp16_io:
            for v in graph.inputs:
                if v.dtype == F32 and v.const_value is None:
                    v.dtype = F16
        # 3. constants: storage type and copies for readers in the other type
        for v in list(graph.initializers.values()):
            if v.is_graph_input() or v.dtype != F32 or v.const_value is None:
                continue
            wants = {self._use_prec(u, i, infos) for u, i in v.uses()}
            if v.is_graph_output():
                wants.add(io)
            size = v.const_value.size
            if F16 not in wants and size <= LARGE_CONSTANT:
                continue
            arr = v.const_value.numpy()
            half = fp16_support.to_fp16_array(arr)
            self.stats["constants_clamped"] += int(np.any(np.isfinite(arr) & (np.abs(arr) > FP16_MAX)))
            if F32 in wants and size <= LARGE_CONSTANT:
                # small and read both ways: keep the fp32 tensor, add a fp16 copy for fp16 readers
                copy = ir.Value(name=f"{v.name}.fp16", type=ir.TensorType(F16), shape=v.shape,
                                const_value=ir.tensor(half, name=f"{v.name}.fp16"))
                graph.register_initializer(copy)
                for user, idx in list(v.uses()):
                    if self._use_prec(user, idx, infos) == F16:
                        user.replace_input_with(idx, copy)
                self.stats["constants_fp16"] += 1
                continue
            v.const_value = ir.tensor(half, name=v.name)
            v.dtype = F16
            self.stats["constants_fp16"] += 1
            fired += 1
        # 4. Casts where a value's type and a reader's type differ; a reader outside the slots
        #    of a retyped node expects the type the value had before the pass.
        casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        inserted: set[int] = set()

        def converted(v: ir.Value, dtype: ir.DataType) -> ir.Value:
            key = (id(v), dtype)
            if key not in casts:
                suffix = "fp16" if dtype == F16 else "fp32"
                cast = ir.node("Cast", [v], attributes={"to": dtype.value}, name=f"{v.name}.to_{suffix}")
                out = cast.outputs[0]
                out.name, out.dtype, out.shape = f"{v.name}.{suffix}", dtype, v.shape
                graph.append(cast)
                inserted.add(id(cast))
                self.stats["casts_inserted"] += 1
                casts[key] = out
            return casts[key]

        for v in list(_all_values(graph)):
            if v.dtype not in (F16, F32):
                continue
            for user, idx in list(v.uses()):
                if id(user) in inserted:
                    continue
                info = infos.get(user)
                want = info.prec if info is not None and idx in info.inputs else orig.get(id(v), v.dtype)
                if want != v.dtype:
                    user.replace_input_with(idx, converted(v, want))
        # 5. graph outputs at the interface type
        for i, v in enumerate(list(graph.outputs)):
            want = io if orig.get(id(v)) == F32 else orig.get(id(v), v.dtype)
            if v.dtype in (F16, F32) and v.dtype != want:
                name = v.name
                cast = ir.node("Cast", [v], attributes={"to": want.value}, name=f"{name}.to_interface")
                out = cast.outputs[0]
                v.name = f"{name}.{'fp16' if v.dtype == F16 else 'fp32'}"
                out.name, out.dtype, out.shape = name, want, v.shape
                graph.append(cast)
                graph.outputs[i] = out
                self.stats["casts_inserted"] += 1
        return fired


def _all_values(graph: ir.Graph):
    seen = set()
    for v in list(graph.inputs) + list(graph.initializers.values()):
        if id(v) not in seen:
            seen.add(id(v))
            yield v
    for node in list(graph):
        for v in node.outputs:
            if id(v) not in seen:
                seen.add(id(v))
                yield v


def _infer_missing_dtypes(graph: ir.Graph, opset: int) -> None:
    """Element types the model left unset: from the op schema's type parameters, Cast's `to`, or
    (fused kernels) the first float input. Values that stay unknown are left alone by the pass."""
    for node in graph:
        missing = [v for v in node.outputs if v.dtype is None and v.name]
        if not missing:
            continue
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            node.outputs[0].dtype = ir.DataType(node.attributes.get_int("to", 0))
            continue
        if node.op_type in ("Shape", "Size"):
            node.outputs[0].dtype = ir.DataType.INT64
            continue
        schema = _schema(node, opset)
        ins = list(node.inputs)
        if schema is None:
            first = next((v.dtype for v in ins if v is not None and v.dtype in (F32, F16)), None)
            for v in missing:
                if first is not None and v.index() == 0:
                    v.dtype = first
            continue
        bound = {}
        for i, v in enumerate(ins):
            if v is not None and v.dtype is not None and schema.inputs:
                bound.setdefault(schema.inputs[min(i, len(schema.inputs) - 1)].type_str, v.dtype)
        for v in missing:
            if schema.outputs:
                p = schema.outputs[min(v.index(), len(schema.outputs) - 1)].type_str
                if p in bound:
                    v.dtype = bound[p]


def _simplify_casts(graph: ir.Graph) -> int:
    """Cast(x, to=dtype(x)) -> x; Cast(Cast(x, to=A), to=B) -> Cast(x, to=B) when A and B are
    float16/float32, or x when dtype(x) == B (dropping a float16 rounding: the chain x -> fp16 -> fp32
    only ever arises at an island boundary, where the rounding is an artifact, not the model's).
    Returns the number of Casts removed."""
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
                continue
            src, out = node.inputs[0], node.outputs[0]
            to = ir.DataType(node.attributes.get_int("to", 0))
            if src is None:
                continue
            inner = src.producer()
            # Only float -> float chains: Cast(Cast(x, float16), int64) truncates a rounded value,
            # and int -> float -> int round trips are the model's own business.
            if inner is not None and inner.op_type == "Cast" and inner.domain in ("", "ai.onnx") \
                    and src.dtype in (F16, F32) and to in (F16, F32) and inner.inputs[0] is not None:
                origin = inner.inputs[0]
                node.replace_input_with(0, origin)
                src_now = origin
                if not src.uses() and not src.is_graph_output():
                    graph.remove(inner, safe=True)
                    removed += 1
                changed = True
            else:
                src_now = src
            if src_now.dtype == to and not out.is_graph_output():
                out.replace_all_uses_with(src_now)
                graph.remove(node, safe=True)
                removed += 1
                changed = True
    return removed
