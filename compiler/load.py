"""Load and validate a model: path, onnx.ModelProto or onnx_ir.Model in, onnx_ir.Model out.

Validation refuses, with one clear line each: a missing, empty, non-protobuf or truncated file; an
opset newer than the installed onnx knows; a graph that is not a DAG; a tensor produced twice; a
value used but never produced; missing external data; external data whose location is absolute or
escapes the model's folder. External weights are memory-mapped by onnx_ir, not copied.
"""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxopt import weights, wire
from onnxopt.errors import CompileError

_STANDARD_DOMAINS = ("", "ai.onnx")


def load(model, *, base_dir: str | os.PathLike | None = None) -> ir.Model:
    """Validate `model` and return it as an onnx_ir.Model the caller may rewrite freely.

    The caller's object is never modified: a ModelProto or ir.Model is copied first.
    """
    try:
        return _load(model, base_dir)
    except (ir.serde.SerdeError, UnicodeError) as exc:
        # Protobuf parses what onnx_ir cannot represent (e.g. a name that is not UTF-8): say what.
        while exc.__cause__ is not None:
            exc = exc.__cause__
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompileError(f"the model is malformed: {first}") from None


def _load(model, base_dir) -> ir.Model:
    if isinstance(model, ir.Model):
        # An in-memory model has no folder: its external tensors may read only below `base_dir`.
        _confine_external_tensors(model, Path(base_dir) if base_dir is not None else None)
        # Validate the weightless skeleton; the copy shares tensors (they are immutable).
        proto, _ = weights.skeleton(model)
        _check_opsets(proto)
        _check_graph(proto.graph, outer=frozenset())
        return _checked(model.clone())
    if isinstance(model, onnx.ModelProto):
        validate(model, base_dir)
        return _checked(_to_ir(_densified(model), base_dir))
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto = read_proto(path)
        # Relative external data resolves against the real file's folder (symlinks followed).
        folder = path.resolve().parent
        validate(proto, folder)
        return _checked(_to_ir(_densified(proto), folder))
    raise CompileError(f"cannot load a {type(model).__name__}: give a path, ModelProto or onnx_ir.Model")


def read_proto(path: Path) -> onnx.ModelProto:
    """Parse the file's protobuf, leaving large weights in the file as external references."""
    if not path.exists():
        raise CompileError(f"{path}: no such file")
    if not path.is_file():
        raise CompileError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CompileError(f"{path}: file is empty")
    real = path.resolve()
    try:
        if real.stat().st_nlink > 1:
            # onnx_ir refuses to map hard-linked files (a guard against link attacks): parse it all.
            proto = onnx.load(str(real), load_external_data=False)
        else:
            # Weights stay in the file (memory-mapped on use): see compiler/wire.py.
            proto = wire.load_mapped(real)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CompileError(f"{path}: not a valid ONNX protobuf file (truncated or corrupt?): {exc}") from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise CompileError(f"{path}: not an ONNX model (no graph or IR version; truncated or not a model?)")
    return proto


def validate(proto: onnx.ModelProto, base_dir) -> None:
    """Structural checks on the proto; the ONNX checker runs on the IR afterwards (`_checked`)."""
    _check_opsets(proto)
    _check_graph(proto.graph, outer=frozenset())
    _check_interface_types(proto.graph)
    _check_external_data(proto, Path(base_dir) if base_dir is not None else None)
    _check_tensor_sizes(proto)


def _check_interface_types(graph: onnx.GraphProto) -> None:
    """Graph inputs and outputs need a type, and tensors an element type, to be fed or compared."""
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            if not v.HasField("type") or v.type.WhichOneof("value") is None:
                raise CompileError(f"graph {kind} {v.name!r} has no type")
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
                raise CompileError(f"graph {kind} {v.name!r} has no element type")


def _checked(model: ir.Model) -> ir.Model:
    try:
        # On the skeleton: checking the proto itself would serialize every weight again.
        weights.check(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise CompileError(f"model fails the ONNX checker: {first}") from None
    return model


def _check_opsets(proto: onnx.ModelProto) -> None:
    if proto.ir_version > onnx.IR_VERSION:
        raise CompileError(
            f"model IR version {proto.ir_version} is newer than onnx {onnx.__version__} supports "
            f"({onnx.IR_VERSION}); upgrade onnx"
        )
    if not any(op.domain in _STANDARD_DOMAINS for op in proto.opset_import):
        raise CompileError("model imports no ai.onnx opset")
    known = onnx.defs.onnx_opset_version()
    for op in proto.opset_import:
        if op.domain in _STANDARD_DOMAINS and op.version > known:
            raise CompileError(
                f"model uses opset {op.version}, newer than the {known} that onnx {onnx.__version__} knows; "
                "upgrade onnx"
            )


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _check_graph(graph: onnx.GraphProto, outer: frozenset[str]) -> None:
    """Single assignment, every use defined, no cycle; subgraphs see the outer scope."""
    producer: dict[str, int | str] = {}
    for v in graph.input:
        producer[v.name] = "input"
    for t in graph.initializer:
        producer.setdefault(t.name, "initializer")
    for t in graph.sparse_initializer:
        producer.setdefault(t.values.name, "initializer")
    for i, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer:
                raise CompileError(
                    f"tensor {out!r} is produced twice (by node {_node_label(graph, i)} and "
                    f"{_node_label(graph, producer[out])})"
                )
            producer[out] = i
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(graph.node)))
    scope = outer | producer.keys()
    for i, node in enumerate(graph.node):
        used = [n for n in node.input if n]
        for sub in _subgraphs(node):
            used.extend(_free_names(sub))
            _check_graph(sub, scope)
        for name in used:
            src = producer.get(name)
            if src is None:
                if name not in outer:
                    raise CompileError(
                        f"node {_node_label(graph, i)} uses {name!r}, which no node, input or initializer produces"
                    )
            elif isinstance(src, int):
                dag.add_edge(src, i)
    for out in graph.output:
        if out.name not in producer and out.name not in outer:
            raise CompileError(f"graph output {out.name!r} is never produced")
    if not nx.is_directed_acyclic_graph(dag):
        cycle = nx.find_cycle(dag)
        names = " -> ".join(_node_label(graph, a) for a, _ in cycle)
        raise CompileError(f"graph is not a DAG: cycle {names}")


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph uses from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            used |= _free_names(sub)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def _node_label(graph: onnx.GraphProto, index) -> str:
    if not isinstance(index, int):
        return str(index)
    node = graph.node[index]
    return f"{node.name or '#' + str(index)} ({node.op_type})"


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length) of an external tensor, refusing malformed entries."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not location:
        raise CompileError(f"tensor {tensor.name!r} uses external data but names no location")
    numbers = {}
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is None:
            continue
        try:
            numbers[key] = int(text)
        except ValueError:
            raise CompileError(f"tensor {tensor.name!r}: external data {key} {text!r} is not a number") from None
        if numbers[key] < 0:
            raise CompileError(f"tensor {tensor.name!r}: external data {key} {numbers[key]} is negative")
    return location, numbers.get("offset", 0), numbers.get("length")


def _confined(name: str, location: str, root: Path | None, where: Path | None = None) -> Path:
    """The file `location` names, which must lie inside `root` (the model's folder)."""
    if os.path.isabs(location) or Path(location).drive:
        raise CompileError(f"tensor {name!r}: external data location {location!r} is absolute; refused")
    if root is None:
        raise CompileError(
            f"tensor {name!r} has external data {location!r} but the model was given without a folder: "
            "load it from its path, or pass base_dir= (the folder its weights may be read from)"
        )
    root = root.resolve()
    target = ((where or root) / location).resolve()
    if root != target and root not in target.parents:
        raise CompileError(f"tensor {name!r}: external data location {location!r} escapes the model's folder; refused")
    return target


def _check_external_data(proto: onnx.ModelProto, base_dir: Path | None) -> None:
    """Refuse unsafe, malformed or missing external data."""
    for tensor in _all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location, offset, length = _external_info(tensor)
        target = _confined(tensor.name, location, base_dir)
        if not target.is_file():
            raise CompileError(f"tensor {tensor.name!r}: external data file {location!r} is missing")
        size = target.stat().st_size
        length = size - offset if length is None else length
        if offset + length > size:
            raise CompileError(
                f"tensor {tensor.name!r}: external data file {location!r} is too short "
                f"({size} bytes, needs {offset + length})"
            )


def _confine_external_tensors(model: ir.Model, base_dir: Path | None) -> None:
    """Every external tensor of an onnx_ir model must read a file inside `base_dir`."""
    for tensor in _ir_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            where = Path(tensor.base_dir) if tensor.base_dir else None
            target = _confined(tensor.name, os.fspath(tensor.location), base_dir, where)
            if not target.is_file():
                raise CompileError(f"tensor {tensor.name!r}: external data file {tensor.location!r} is missing")


def _ir_tensors(model: ir.Model):
    """Every tensor an onnx_ir model holds: initializers and tensor attributes, subgraphs included."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from attr.value


def external_paths(proto: onnx.ModelProto, folder: Path) -> list[Path]:
    """The files a model's relative external-data locations name (before validation: for the
    overlap check of compiler/files.py; unsafe locations are refused by `validate`)."""
    locations = {_external_info(t)[0] for t in _all_tensors(proto) if external_data_helper.uses_external_data(t)}
    return sorted({(folder / loc).resolve() for loc in locations if not os.path.isabs(loc)})


def external_files(model: ir.Model) -> list[Path]:
    """The files an onnx_ir model's external tensors read (for compiler/files.py)."""
    return sorted({Path(t.path).resolve() for t in _ir_tensors(model) if isinstance(t, ir.ExternalTensor)})


def _all_tensors(proto: onnx.ModelProto):
    """Every TensorProto of the model, sparse initializers' values and indices included."""
    yield from external_data_helper._get_all_tensors(proto)
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            graphs.extend(_subgraphs(node))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices


# The typed field that holds each element type's values when there is no raw data.
_FIELD_OF = {
    onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.COMPLEX64: "float_data",
    onnx.TensorProto.DOUBLE: "double_data", onnx.TensorProto.COMPLEX128: "double_data",
    onnx.TensorProto.INT64: "int64_data", onnx.TensorProto.UINT32: "uint64_data",
    onnx.TensorProto.UINT64: "uint64_data",
}


def _check_tensor_sizes(proto: onnx.ModelProto) -> None:
    """A tensor's data must hold exactly dims x dtype: a mismatch is a corrupt file, refused here
    (onnxruntime would refuse it later, with a less clear message, or read past the tensor)."""
    for tensor in _all_tensors(proto):
        if tensor.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
            continue
        if any(d < 0 for d in tensor.dims):
            raise CompileError(f"tensor {tensor.name!r} has a negative dimension {list(tensor.dims)}")
        count = 1
        for d in tensor.dims:
            count *= d
        try:
            bits = ir.DataType(tensor.data_type).bitwidth
        except ValueError:
            raise CompileError(f"tensor {tensor.name!r} has unknown element type {tensor.data_type}") from None
        expected = (count * bits + 7) // 8
        if external_data_helper.uses_external_data(tensor):
            got = _external_info(tensor)[2]  # (compiler/wire.py maps large raw data this way too)
        elif tensor.HasField("raw_data"):
            got = len(tensor.raw_data)
        else:
            field = _FIELD_OF.get(tensor.data_type, "int32_data")
            n = len(getattr(tensor, field))
            per = 2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
            # Sub-byte types pack several elements per entry: their byte check is the raw data's.
            if n == count * per or bits < 8:
                continue
            raise CompileError(f"tensor {tensor.name!r} is declared {list(tensor.dims)} ({count * per} values) "
                               f"but holds {n}; the file is corrupt")
        if got is not None and got != expected:
            raise CompileError(
                f"tensor {tensor.name!r} is declared {list(tensor.dims)} of "
                f"{onnx.TensorProto.DataType.Name(tensor.data_type).lower()} ({expected} bytes) "
                f"but holds {got} bytes; the file is corrupt"
            )


def _densified(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Sparse initializers become dense ones (onnx_ir has none; same values, same names)."""
    if not any(g.sparse_initializer for g in _graphs(proto.graph)):
        return proto
    from onnx import numpy_helper

    proto = _copy(proto)
    for graph in _graphs(proto.graph):
        for sparse in graph.sparse_initializer:
            values = numpy_helper.to_array(sparse.values)
            indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
            dims = tuple(sparse.dims)
            dense = np.zeros(dims, dtype=values.dtype)
            try:
                if indices.ndim == 1:  # linear indices into the flattened tensor
                    dense.reshape(-1)[indices] = values
                else:  # [NNZ, rank] coordinates
                    dense[tuple(indices.T)] = values
            except (IndexError, ValueError) as exc:
                raise CompileError(f"sparse initializer {sparse.values.name!r} is malformed: {exc}") from None
            graph.initializer.append(numpy_helper.from_array(dense, sparse.values.name))
        del graph.sparse_initializer[:]
    return proto


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _to_ir(proto: onnx.ModelProto, base_dir) -> ir.Model:
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises several types on malformed protos
        raise CompileError(f"cannot read the model into the IR: {exc}") from None
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    return model
