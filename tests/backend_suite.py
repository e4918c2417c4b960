"""The ONNX backend test-suite models shipped in the onnx wheel, through onnxopt -O3.

`run_all()` takes every model under onnx/backend/test/data/{light,pytorch-converted,
pytorch-operator,simple} that onnxruntime can load, compiles it at -O3 with its own test inputs as
the verification sample (`input_data`), runs the result and compares it with the stored expected
outputs (rtol 1e-3, atol 1e-5 as floats; exact otherwise). Each model ends as one of:
  match          - compiled, and its outputs equal the stored ones;
  refused        - onnxopt refused it with a one-line reason (CompileError);
  mismatch       - compiled, outputs differ from the stored ones (an onnxopt defect);
  invalid        - the compiled model fails the full ONNX checker (an onnxopt defect);
  not-loadable   - onnxruntime cannot load or run the original (not counted);
  ort-differs    - onnxruntime's own run of the original differs from the stored outputs
                   (not counted: nothing to compare against).
`python tests/backend_suite.py` prints the table.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import onnxopt

SUITES = ("light", "pytorch-converted", "pytorch-operator", "simple")
RTOL, ATOL = 1e-3, 1e-5


def data_root() -> str:
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")


def cases() -> list[tuple[str, str, list[str], list[str]]]:
    """(name, model path, input .pb paths, expected output .pb paths); light models have no
    stored inputs (the backend runner makes them: see `_light_inputs`)."""
    found = []
    for suite in SUITES:
        folder = os.path.join(data_root(), suite)
        for path in sorted(glob.glob(os.path.join(folder, "*.onnx"))):  # light: model beside outputs
            stem = path[: -len(".onnx")]
            found.append((os.path.basename(stem), path, [], sorted(glob.glob(stem + "_output_*.pb"))))
        for model in sorted(glob.glob(os.path.join(folder, "*", "model.onnx"))):
            data = os.path.join(os.path.dirname(model), "test_data_set_0")
            found.append((os.path.basename(os.path.dirname(model)), model,
                          sorted(glob.glob(os.path.join(data, "input_*.pb")), key=_index),
                          sorted(glob.glob(os.path.join(data, "output_*.pb")), key=_index)))
    return found


def _index(path: str) -> int:
    return int(os.path.basename(path).split("_")[-1].split(".")[0])


def _read(path: str) -> np.ndarray:
    tensor = onnx.TensorProto()
    with open(path, "rb") as f:
        tensor.ParseFromString(f.read())
    return numpy_helper.to_array(tensor)


def _light_inputs(model: onnx.ModelProto) -> list[np.ndarray]:
    """What onnx's backend runner feeds light models (Runner.generate_dummy_data, random=False)."""
    inits = {t.name for t in model.graph.initializer}
    arrays = []
    for x in model.graph.input:
        if x.name in inits:
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in x.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        arrays.append((np.arange(n).reshape(shape) / n).astype(np.float32))
    return arrays


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    if got.shape != want.shape:
        return False
    if np.issubdtype(want.dtype, np.inexact):
        return bool(np.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True))
    return bool(np.array_equal(got, want))


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_one(path: str, inputs: list[str], outputs: list[str]) -> tuple[str, str]:
    model = onnx.load(path)
    true_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    arrays = [_read(p) for p in inputs] if inputs else _light_inputs(model)
    feeds = dict(zip(true_inputs, arrays))
    expected = [_read(p) for p in outputs]
    try:
        original = _run(model, feeds)
    except Exception as exc:
        return "not-loadable", str(exc).strip().splitlines()[0][:160]
    if not all(_close(g, w) for g, w in zip(original, expected)):
        return "ort-differs", "onnxruntime's run of the original differs from the stored outputs"
    try:
        result = onnxopt.compile(model, opt_level=3, input_data=feeds)
    except onnxopt.CompileError as exc:
        return "refused", str(exc)
    try:
        onnx.checker.check_model(result.model, full_check=True)
    except onnx.checker.ValidationError as exc:
        return "invalid", f"the compiled model fails the ONNX checker: {str(exc).strip().splitlines()[0]}"
    got = _run(result.model, feeds)
    bad = [o.name for o, g, w in zip(result.model.graph.output, got, expected) if not _close(g, w)]
    return ("mismatch", f"output {bad[0]!r} differs from the stored one") if bad else ("match", "")


def run_all() -> dict[str, tuple[str, str]]:
    return {name: run_one(path, ins, outs) for name, path, ins, outs in cases()}


if __name__ == "__main__":
    start = time.perf_counter()
    results = run_all()
    for name, (status, why) in sorted(results.items(), key=lambda kv: (kv[1][0], kv[0])):
        print(f"{status:13} {name:45} {why}")
    counts: dict[str, int] = {}
    for status, _ in results.values():
        counts[status] = counts.get(status, 0) + 1
    print(counts, f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
