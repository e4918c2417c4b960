"""Variants of one model built by onnxopt and by its peers, each in a fresh process, and their fidelity.

A tool is one entry in `TOOLS`: a name (the variant's name in reports), the modules it needs (a missing
one is a skip with the reason, never a crash), and a `build(src, out, ctx)` function that runs in a
child process (`python -m onnxopt.bench.peers --job ...`), so its compile time and peak memory are its
own:

  time_s   wall time of load + optimize + save; the tool's imports happen before the clock starts
  peak_mb  peak resident memory during that work minus resident memory just before it (VmHWM reset
           through /proc/self/clear_refs, else getrusage's lifetime peak)

Adding a variant (say onnxopt int8 once it exists) is adding one `Tool(...)` line.

onnxruntime's transformer optimizer must be told the model type, number of heads and hidden size.
`transformer_hints` infers them from the graph: hidden size from the square projection weights of
MatMul/Gemm (Q, K, V and output projections are hidden x hidden), heads from the constants of the
attention reshapes ([..., heads, head_dim] with heads * head_dim = hidden, or [..., -1, head_dim]).
A graph without them (a CNN) gets the transformer optimizer skipped with the reason.

Fidelity compares each variant's outputs with the original's on the same inputs, both run by
onnxruntime with graph optimizations off (onnxopt.verify.session): max relative error (max|got - ref| /
max|ref|, the verifier's measure) and cosine similarity, the worst over the outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from onnxopt.bench.session_job import _status_mb  # one /proc reader for both measuring jobs

JOB_MARKER = "ONNXOPT-JOB "


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    kind: str  # "onnxopt" or "peer"
    build: Callable[[str, str, dict], None]
    requires: tuple[str, ...] = ()
    needs_hints: bool = False  # needs transformer_hints (model type, heads, hidden size)
    lossy: bool = False


def _onnxopt(level: int, verify: bool = True):
    def build(src: str, out: str, ctx: dict) -> None:
        import onnxopt

        shapes = {k: tuple(v) for k, v in (ctx.get("input_shapes") or {}).items()}
        onnxopt.compile(src, opt_level=level, target=ctx.get("target", "cpu"), verify_outputs=verify,
                        input_shapes=shapes).save(out)

    return build


def _ort_transformers(src: str, out: str, ctx: dict) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    h = ctx["hints"]
    model = optimize_model(src, model_type=h["model_type"], num_heads=h["num_heads"], hidden_size=h["hidden_size"],
                           use_gpu=ctx.get("target") in ("cuda", "tensorrt"))
    model.save_model_to_file(out)


def _onnxsim(src: str, out: str, ctx: dict) -> None:
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(src))
    if not ok:
        raise RuntimeError("onnxsim's own check of the simplified model failed")
    onnx.save(model, out)


def _onnxslim(src: str, out: str, ctx: dict) -> None:
    import onnxslim

    onnxslim.slim(src, out)


def _onnxoptimizer(src: str, out: str, ctx: dict) -> None:
    import onnx
    import onnxoptimizer

    onnx.save(onnxoptimizer.optimize(onnx.load(src)), out)


def _ort_int8(src: str, out: str, ctx: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxopt.host import u8s8_saturates

    # reduce_range where onnxruntime's documentation asks for it (x86 without VNNI: u8 x s8 saturates).
    quantize_dynamic(src, out, weight_type=QuantType.QInt8, reduce_range=u8s8_saturates())


TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("onnxopt-O1", "onnxopt", _onnxopt(1)),
    Tool("onnxopt-O2", "onnxopt", _onnxopt(2)),
    Tool("onnxopt-O3", "onnxopt", _onnxopt(3)),
    Tool("onnxopt-O3-noverify", "onnxopt", _onnxopt(3, verify=False)),
    Tool("ort-transformer-optimizer", "peer", _ort_transformers, ("onnxruntime.transformers.optimizer",),
         needs_hints=True),
    Tool("onnxsim", "peer", _onnxsim, ("onnxsim",)),
    Tool("onnxslim", "peer", _onnxslim, ("onnxslim",)),
    Tool("onnxoptimizer", "peer", _onnxoptimizer, ("onnxoptimizer",)),
    Tool("ort-quantize-dynamic", "peer", _ort_int8, ("onnxruntime.quantization",), lossy=True),
)}

# What `onnxopt bench --peers` builds unless --variants says otherwise.
DEFAULT_PEERS = ("onnxopt-O2", "onnxopt-O3", "ort-transformer-optimizer", "onnxsim", "onnxslim",
                 "ort-quantize-dynamic")


def missing_requirement(tool: Tool) -> str | None:
    for module in tool.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            package = module.split(".")[0]
            return f"{module} is not installed (pip install {package})"
    return None


# --- transformer hints ---------------------------------------------------------------------------

def _ints(value) -> list[int] | None:
    """Constant integers behind `value` (an initializer or Constant, through Unsqueeze/Cast/Identity)."""
    if value is None:
        return None
    if value.const_value is not None:
        arr = value.const_value.numpy()
    else:
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant":
            attr = node.attributes.get("value")
            if attr is None:
                ints = node.attributes.get("value_ints") or node.attributes.get("value_int")
                return None if ints is None else list(np.atleast_1d(ints.value).tolist())
            arr = attr.as_tensor().numpy()
        elif node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
            return _ints(node.inputs[0])
        else:
            return None
    return arr.reshape(-1).tolist() if arr.dtype.kind in "iu" else None


def _shape_elements(value) -> list[int | None]:
    """A Reshape's target shape, element by element, None where not constant."""
    known = _ints(value)
    if known is not None:
        return known
    node = value.producer()
    if node is None or node.op_type != "Concat":
        return []
    elems: list[int | None] = []
    for part in node.inputs:
        vals = _ints(part)
        elems.extend(vals if vals is not None else [None])
    return elems


def transformer_hints(model) -> tuple[dict | None, str]:
    """(hints, how) for onnxruntime's transformer optimizer, or (None, why not) from an onnx_ir.Model.

    The model type comes from the zoo's metadata when present, else: a causal mask (Trilu, or the
    LessOrEqual of position ranges that transformers exports) means gpt2, a 4-D float input vit, else bert.
    """
    hidden_counts: collections.Counter = collections.Counter()
    ops = collections.Counter()
    for node in model.graph:
        ops[node.op_type] += 1
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
            w = node.inputs[1]
            if w.const_value is not None and w.shape is not None and len(w.shape) == 2 and w.shape[0] == w.shape[1]:
                hidden_counts[int(w.shape[0])] += 1
    if not hidden_counts:
        return None, "not a transformer: no square (hidden x hidden) MatMul weights in the graph"
    hidden = hidden_counts.most_common(1)[0][0]
    heads_counts: collections.Counter = collections.Counter()
    for node in model.graph:
        if node.op_type != "Reshape" or len(node.inputs) < 2:
            continue
        elems = _shape_elements(node.inputs[1])
        if len(elems) < 3 or elems[-1] is None or elems[-2] is None:
            continue
        a, b = elems[-2], elems[-1]
        if b > 1 and a > 1 and a * b == hidden:
            heads_counts[a] += 1
        elif b > 1 and a == -1 and hidden % b == 0 and hidden // b > 1:
            heads_counts[hidden // b] += 1
    if not heads_counts:
        return None, f"no attention reshape to [..., heads, head_dim] found (hidden size {hidden})"
    heads = heads_counts.most_common(1)[0][0]
    zoo_name = dict(model.metadata_props).get("onnxopt.zoo.name", "")
    if zoo_name in ("bert", "minilm", "gpt2", "vit"):
        model_type = "bert" if zoo_name == "minilm" else zoo_name
    elif ops.get("Trilu") or ops.get("LessOrEqual"):
        model_type = "gpt2"
    elif any(v.shape is not None and len(v.shape) == 4 and v.dtype is not None and v.dtype.is_floating_point()
             for v in model.graph.inputs):
        model_type = "vit"
    else:
        model_type = "bert"
    return {"model_type": model_type, "num_heads": heads, "hidden_size": hidden}, "inferred from the graph"


# --- building variants in child processes ---------------------------------------------------------

def _job(tool_name: str, src: str, out: str, ctx_json: str) -> dict:
    """Runs in the child: import the tool's modules, then time and measure one build."""
    import resource

    tool = TOOLS[tool_name]
    for module in tool.requires + (("onnxopt",) if tool.kind == "onnxopt" else ()):
        importlib.import_module(module)
    ctx = json.loads(ctx_json)
    base = _status_mb("VmRSS") or 0.0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss"
    start = time.perf_counter()
    tool.build(src, out, ctx)
    elapsed = time.perf_counter() - start
    peak = _status_mb("VmHWM") if method == "VmHWM" else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"time_s": elapsed, "peak_mb": max(peak - base, 0.0), "peak_method": method}


def compile_in_subprocess(tool: str, src, out, ctx: dict, repeat: int = 1, timeout_s: float | None = None) -> dict:
    """Build `out` from `src` with `tool` in a fresh process, `repeat` times; medians of time and memory."""
    runs = []
    for _ in range(max(1, repeat)):
        cmd = [sys.executable, "-m", "onnxopt.bench.peers", "--job", tool, os.path.abspath(src), os.path.abspath(out),
               json.dumps(ctx)]
        try:
            # In the output's folder: temporary files some tools leave in the working directory stay there.
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  cwd=os.path.dirname(os.path.abspath(out)))
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"took longer than {timeout_s:g} s"}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(JOB_MARKER)]
        result = json.loads(lines[-1][len(JOB_MARKER):]) if lines else None
        if result is None or "error" in result:
            reason = result["error"] if result else (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return {"status": "failed", "reason": reason[:300]}
        runs.append(result)
    return {
        "status": "ok",
        "time_s": round(statistics.median(r["time_s"] for r in runs), 4),
        "time_runs_s": [round(r["time_s"], 4) for r in runs],
        "peak_mb": round(statistics.median(r["peak_mb"] for r in runs), 1),
        "peak_method": runs[-1]["peak_method"],
    }


# --- fidelity ------------------------------------------------------------------------------------

def outputs(path, feeds: dict) -> dict[str, np.ndarray]:
    """Outputs of the model at `path` in onnxruntime with graph optimizations off (the verifier's session)."""
    from onnxopt import verify

    sess = verify.session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def fidelity(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """Worst max relative error and cosine over the outputs, and each output's figures."""
    per = []
    for name, r in ref.items():
        g = got.get(name)
        if g is None or g.shape != r.shape:
            per.append({"name": name, "max_rel": None, "cosine": None,
                        "note": "missing" if g is None else f"shape {list(g.shape)} != {list(r.shape)}"})
            continue
        r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        finite = np.isfinite(r64) & np.isfinite(g64)
        err = float(np.max(np.abs(g64 - r64)[finite])) if finite.any() else 0.0
        scale = max(float(np.max(np.abs(r64[finite]))) if finite.any() else 0.0, 1e-6)
        norm = float(np.linalg.norm(r64[finite]) * np.linalg.norm(g64[finite]))
        cos = float(np.dot(r64[finite], g64[finite]) / norm) if norm > 0 else 1.0
        per.append({"name": name, "max_rel": err / scale, "cosine": cos,
                    "note": "" if finite.all() else "non-finite values ignored"})
    rels = [p["max_rel"] for p in per]
    coss = [p["cosine"] for p in per]
    return {
        "max_rel": None if None in rels else max(rels, default=0.0),
        "cosine": None if None in coss else min(coss, default=1.0),
        "outputs": per,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 5 or argv[0] != "--job":
        print("usage: python -m onnxopt.bench.peers --job TOOL SRC OUT CTX_JSON (run by onnxopt bench)",
              file=sys.stderr)
        return 2
    try:
        result = _job(*argv[1:])
    except Exception as exc:  # reported as a failed variant, with the tool's own message
        text = str(exc).strip()
        result = {"error": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip()}
    print(JOB_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
