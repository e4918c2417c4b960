"""onnxopt --fp16 against onnxconverter-common's float16 converter, on real-weight models and data.

    python -m onnxopt.bench.experiments.fp16_bench [--runs 30] [--threads 2] [--out fp16.json]
    python -m onnxopt.bench.experiments.fp16_bench --probe      # re-derive kernels/fp16_support.CPU_FP16_OPS

Models: MiniLM (all-MiniLM-L6-v2) on 20 real English sentences (tokenized with the checkpoint's own
tokenizer, cosine of the mean-pooled embeddings, sentence by sentence) and EfficientNet-Lite0 on
real photos from scikit-image's `skimage.data` (center-cropped, resized to 224, ImageNet
normalization like `zoo.sample_feeds`; cosine of the logits and top-1 agreement).

Per variant: file size, worst and mean cosine against the float32 model, whether every output is
finite, and CPU latency (onnxruntime CPU EP with its default graph optimizations, batch 1, median
of `--runs` after warm-up). float16 on an x86 CPU is usually no faster: onnxruntime's CPU EP has
few float16 kernels and wraps the others in Casts.

The peer is `onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True)`
(installed with `pip install --no-deps onnxconverter-common`, which leaves onnx/torch alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password if I no longer have access to my email?",
    "She played a Chopin nocturne at the recital last night.",
    "The mitochondria is the powerhouse of the cell.",
    "Our flight to Lisbon was delayed by three hours because of fog.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The committee will publish its final report next Tuesday.",
    "A quantum computer uses qubits that can exist in superposition.",
    "He scored the winning goal in the last minute of extra time.",
    "Please turn off the lights when you leave the conference room.",
    "Volcanic eruptions can cool the global climate for several years.",
    "I think the sequel was better than the original movie.",
    "The library closes early on public holidays.",
    "Machine translation has improved dramatically with neural networks.",
    "Wolves were reintroduced to Yellowstone National Park in 1995.",
    "Can you recommend a good Italian restaurant nearby?",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "Rain is expected throughout the weekend in the northern regions.",
    "Typing with ten fingers is faster once you practice for a few weeks.",
]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def sentence_feeds(sentences=SENTENCES) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    from onnxopt.bench import zoo

    tok = AutoTokenizer.from_pretrained(str(zoo.minilm_dir()), local_files_only=True)
    enc = tok(list(sentences), padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def photo_batch(names=PHOTOS, size: int = 224) -> np.ndarray:
    """Real photos, center-cropped to a square, resized to `size`, ImageNet-normalized, NCHW."""
    import skimage.data
    import skimage.transform

    out = []
    for name in names:
        img = getattr(skimage.data, name)()[..., :3].astype(np.float32) / 255.0
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = skimage.transform.resize(img[top:top + s, left:left + s], (size, size), anti_aliasing=True)
        out.append(((img - _MEAN) / _STD).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / m.sum(1)


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _session(path: Path, threads: int, optimize: bool = True):
    from onnxopt import sessions

    return sessions.session(path, sessions.options(optimize=optimize, threads=threads))


def _cast_feeds(sess, feeds: dict) -> dict:
    types = {i.name: i.type for i in sess.get_inputs()}
    return {k: v.astype(np.float16) if types[k] == "tensor(float16)" else v for k, v in feeds.items()}


def _latencies_ms(sessions: list, feeds: dict, runs: int) -> list[float]:
    """Median latency of each session, runs interleaved round-robin so that load from other
    processes on a shared machine falls on all variants alike."""
    per = [_cast_feeds(s, feeds) for s in sessions]
    for s, f in zip(sessions, per):
        for _ in range(3):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, (s, f) in enumerate(zip(sessions, per)):
            t = time.perf_counter()
            s.run(None, f)
            times[k].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def _variants(name: str, path: Path, tmp: Path):
    """(label, saved path) of the float32 reference, onnxopt --fp16 variants and the peer."""
    import onnx
    from onnxconverter_common import float16

    import onnxopt

    level = 3 if name == "minilm" else 2
    exact = onnxopt.compile(str(path), opt_level=level, target="cpu", verify_outputs=False)
    yield f"fp32 onnxopt -O{level}", exact.save(tmp / f"{name}.fp32.onnx"), None
    for target in ("cpu", "cuda"):
        t = time.perf_counter()
        res = onnxopt.compile(str(path), opt_level=level, target=target, fp16=True)
        secs = time.perf_counter() - t
        rec = next(r for r in res.report["passes"] if r["name"] == "fp16")
        info = {"compile_s": round(secs, 2), "fp16_nodes": rec["fired"],
                "casts": res.report["ops_after"].get("Cast", 0),
                "verification_ok": res.report["verification"]["ok"]}
        yield f"onnxopt --fp16 -O{level} --target {target}", res.save(tmp / f"{name}.fp16.{target}.onnx"), info
    # The peer on the exporter's model, and on onnxopt's float32 output (same graph as ours).
    for src_label, src in (("export", path), (f"onnxopt -O{level} fp32", tmp / f"{name}.fp32.onnx")):
        t = time.perf_counter()
        peer = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        secs = time.perf_counter() - t
        out = tmp / f"{name}.occ.{len(src_label)}.onnx"
        onnx.save(peer, str(out))
        info = {"compile_s": round(secs, 2), "casts": sum(n.op_type == "Cast" for n in peer.graph.node)}
        yield f"onnxconverter-common float16 (on {src_label})", out, info


def bench_model(name: str, runs: int, threads: int) -> list[dict]:
    from onnxopt.bench import zoo

    path = zoo.build(name)
    if name == "minilm":
        feeds = sentence_feeds()
        one = {k: v[:1] for k, v in feeds.items()}
    else:
        feeds = {"input": photo_batch()}
        one = {"input": feeds["input"][:1]}
    rows, ref, timed = [], None, []
    with tempfile.TemporaryDirectory() as d:
        for label, saved, info in _variants(name, path, Path(d)):
            row = {"model": name, "variant": label, "size_mb": round(os.path.getsize(saved) / 1e6, 2), **(info or {})}
            rows.append(row)
            try:
                sess = _session(saved, threads)
            except Exception as exc:  # the peer can emit models onnxruntime refuses
                row["error"] = str(exc).strip().splitlines()[0][:160]
                continue
            outs = sess.run(None, _cast_feeds(sess, feeds))
            row["finite"] = all(bool(np.isfinite(o.astype(np.float32)).all()) for o in outs)
            main = outs[0].astype(np.float32)
            vec = mean_pool(main, feeds["attention_mask"]) if name == "minilm" else main
            if ref is None:
                ref = vec
                row.update(cos_min=1.0, cos_mean=1.0)
            else:
                cos = _cos_rows(ref, vec)
                row.update(cos_min=round(float(cos.min()), 6), cos_mean=round(float(cos.mean()), 6))
                if name != "minilm":
                    row["top1_agree"] = f"{int((ref.argmax(1) == vec.argmax(1)).sum())}/{len(vec)}"
            timed.append((row, sess))
        for (row, _), ms in zip(timed, _latencies_ms([s for _, s in timed], one, runs)):
            row["latency_ms"] = round(ms, 2)
    return rows


def render(rows: list[dict]) -> str:
    cols = ["model", "variant", "size_mb", "cos_min", "cos_mean", "finite", "latency_ms", "casts", "top1_agree",
            "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


# ---- the probe behind kernels/fp16_support.CPU_FP16_OPS --------------------------------------------

_PROBE_SKIP = {"Constant", "If", "Loop", "Scan", "RandomNormal", "RandomUniform", "TfIdfVectorizer",
               "ConstantOfShape", "Multinomial", "Optional", "SequenceConstruct", "SplitToSequence",
               "MelWeightMatrix"}
_PROBE_ATTRS = {"Cast": {"to": 1}, "Concat": {"axis": 0}, "LRN": {"size": 3}, "LSTM": {"hidden_size": 2},
                "GRU": {"hidden_size": 2}, "RNN": {"hidden_size": 2}, "MaxPool": {"kernel_shape": [1, 1]},
                "AveragePool": {"kernel_shape": [1, 1]}, "LpPool": {"kernel_shape": [1, 1]},
                "MaxRoiPool": {"pooled_shape": [1, 1]}, "DepthToSpace": {"blocksize": 2},
                "SpaceToDepth": {"blocksize": 2}, "Einsum": {"equation": "ij->ji"},
                "MaxUnpool": {"kernel_shape": [1, 1]}}
_MS = "com.microsoft"


def _probe_one(op: str, domain: str, inputs, outputs, attrs, opset: int = 17) -> str:
    """'fp16' when onnxruntime CPU runs the node as is, 'cast' when it wraps it in Casts."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    ins = [helper.make_tensor_value_info(f"i{k}", t, None) for k, t in enumerate(inputs)]
    outs = [helper.make_tensor_value_info(f"o{k}", t, None) for k, t in enumerate(outputs)]
    node = helper.make_node(op, [v.name for v in ins], [v.name for v in outs], domain=domain, **attrs)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph([node], "probe", ins, outs), opset_imports=imports, ir_version=8)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    with tempfile.TemporaryDirectory() as d:
        opts.optimized_model_filepath = os.path.join(d, "o.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            return "error: " + str(exc).splitlines()[0][:100]
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    return "fp16" if ops.count("Cast") == (op == "Cast") else "cast"


def probe_cpu(opset: int = 17) -> dict[str, str]:
    """Which ops onnxruntime's CPU EP runs in float16 (see kernels/fp16_support.py)."""
    import onnx.defs
    from onnx import TensorProto as TP

    res = {}
    for s in onnx.defs.get_all_schemas():
        if s.domain != "" or s.name in _PROBE_SKIP:
            continue
        try:
            s = onnx.defs.get_schema(s.name, opset, "")
        except Exception:
            continue
        if s.deprecated:
            continue
        tc = {c.type_param_str: list(c.allowed_type_strs) for c in s.type_constraints}

        def pick(ts, f, tc=tc):
            allowed = tc.get(ts, [ts])
            if "tensor(float16)" in allowed:
                return f, True
            for cand, code in (("tensor(int64)", TP.INT64), ("tensor(float)", TP.FLOAT), ("tensor(bool)", TP.BOOL),
                               ("tensor(int32)", TP.INT32)):
                if cand in allowed:
                    return code, False
            return None, False

        n_in = max(s.min_input, 1) if s.inputs else 0
        picked = [pick(fi.type_str, TP.FLOAT16) for fi in s.inputs[:n_in]]
        ins = [t for t, _ in picked]
        if not any(f for _, f in picked) or None in ins:
            continue
        outs = [TP.FLOAT if s.name == "Cast" else pick(fo.type_str, TP.FLOAT16)[0]
                for fo in s.outputs[:max(s.min_output, 1)]]
        if None in outs:
            continue
        res[s.name] = _probe_one(s.name, "", ins, outs, _PROBE_ATTRS.get(s.name, {}), opset)
    F, I64 = TP.FLOAT16, TP.INT64
    contrib = {"SkipLayerNormalization": [F, F, F], "SkipSimplifiedLayerNormalization": [F, F, F],
               "BiasGelu": [F, F], "Gelu": [F], "FastGelu": [F], "QuickGelu": [F], "FusedMatMul": [F, F],
               "Attention": [F, F, F], "MultiHeadAttention": [F, F, F], "RotaryEmbedding": [F, I64, F, F]}
    for op, ins in contrib.items():
        attrs = {"num_heads": 2} if "Attention" in op else {}
        res[f"{_MS}.{op}"] = _probe_one(op, _MS, ins, [F], attrs, opset)
    res["SimplifiedLayerNormalization"] = _probe_one("SimplifiedLayerNormalization", "", [F, F], [F], {}, opset)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", action="store_true", help="probe onnxruntime CPU float16 kernels and compare")
    ap.add_argument("--models", default="minilm,efficientnet_lite0")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.probe:
        from onnxopt.kernels import fp16_support

        res = probe_cpu()
        have = {("", k) if "." not in k else (_MS, k.split(".")[-1]) for k, v in res.items() if v == "fp16"}
        for k in sorted(res):
            print(f"{k:45s} {res[k]}")
        print("matches kernels/fp16_support.CPU_FP16_OPS:", have == set(fp16_support.CPU_FP16_OPS),
              "| missing:", sorted(have - set(fp16_support.CPU_FP16_OPS)),
              "| extra:", sorted(set(fp16_support.CPU_FP16_OPS) - have))
        return 0
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args.runs, args.threads)
    print(render(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
