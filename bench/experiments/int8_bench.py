"""int8 benchmark on real trained weights: onnxopt's calibrated QDQ beside onnxruntime.quantization.

`python -m onnxopt.bench.experiments.int8_bench [--models digits,minilm,efficientnet,bert] [--no-peers] [-o out.json]`

* digits: the trained digits CNN, accuracy on the 450-image test split (calibration: 256 train images).
* minilm: all-MiniLM-L6-v2 sentence embeddings (mean of last_hidden_state over the attention
  mask), cosine fp32 vs int8 for each of 160 held-out real sentences (`real_sentences`: scikit-learn's
  dataset descriptions and docstrings), calibration on 120 other sentences, padded to 64 tokens, at the
  defaults; compile time, layers int8, and the pass's own validation / calibration figures.
* efficientnet: EfficientNet-Lite0 (ImageNet weights) top-1 agreement fp32 vs int8 on 400 random
  224 crops of scikit-image's sample photos (calibration: 128 other crops), with `--int8-metric top1`
  and with the default cosine metric, each at its default target, and batch-1 latency against fp32 -O2.
* bert: BERT-base latency of int8 vs fp32 -O3 on the CPU EP (onnxruntime graph optimizations on,
  alternating rounds) for each of BERT_RECIPES, calibration time vs plain inference over the same
  samples; memory: peak memory growth of calibration at 64 vs 512 samples.

Peers: onnxruntime's quantize_static (QDQ, per-channel, u8/s8) with MinMax and with Entropy
(num_bins=2048), and quantize_dynamic for BERT latency, on the same models in the same run. On an
x86 CPU without VNNI the peers get reduce_range=True, as onnxruntime's documentation advises there
(its u8 x s8 kernels saturate with 8-bit weights); onnxopt decides that by itself. Every model is
evaluated with onnxruntime's graph optimizations on: the integer kernels a user runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxopt.bench.fingerprint import machine
from onnxopt.host import u8s8_saturates

SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "Quarterly revenue rose by twelve percent, beating analyst expectations.",
    "Please remember to water the tomatoes before you leave for the airport.",
    "The mitochondria is often described as the powerhouse of the cell.",
    "He missed the last train and had to walk home in the rain.",
    "Our new database migration reduced query latency by half.",
    "The orchestra tuned their instruments as the audience settled in.",
    "She baked a lemon cake for her grandmother's ninetieth birthday.",
    "Volcanic eruptions can cool the planet by injecting ash into the stratosphere.",
    "The referee's decision sparked outrage among the home supporters.",
    "I can't find my keys anywhere; have you seen them?",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "The museum will be closed on Monday for maintenance.",
    "A gentle breeze carried the scent of pine through the valley.",
    "The compiler rejected the program because of a missing semicolon.",
    "Interest rates are expected to remain unchanged until next spring.",
    "The children built a sandcastle that was washed away by the tide.",
    "Our flight was delayed for three hours due to a snowstorm in Chicago.",
    "The detective noticed a faint smell of almonds in the study.",
    "Regular exercise improves both physical and mental health.",
    "The startup raised forty million dollars in its latest funding round.",
    "He plays the violin in a small jazz band on weekends.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Astronomers discovered a planet orbiting a distant red dwarf.",
    "Turn left at the bakery and the library is on your right.",
    "The medieval castle overlooks a river full of trout.",
    "My laptop battery drains much faster than it used to.",
    "The committee postponed the vote until more data is available.",
    "Bees communicate the location of flowers through a waggle dance.",
    "She finally finished writing her thesis on renaissance poetry.",
    "The ferry to the island leaves every hour from the north pier.",
    "Heavy traffic on the bridge made everyone late for the meeting.",
    "A good night's sleep helps consolidate long-term memories.",
    "The painter mixed ultramarine and burnt sienna for the shadows.",
    "Customers complained that the update removed their favorite feature.",
    "The old lighthouse keeper told stories about shipwrecks and storms.",
    "Glaciers in the Alps have been shrinking for more than a century.",
    "Could you send me the slides from yesterday's presentation?",
    "The puppy chewed through the garden hose while we were at work.",
    "Solar panels on the roof now cover most of the household's electricity.",
    "The tenor's voice cracked on the final high note of the aria.",
    "Researchers trained the model on millions of annotated images.",
]
MINILM_SEQ = 64
N_CALIB_SENTENCES = 120
N_HELD_OUT_SENTENCES = 160
# scikit-learn modules whose estimator docstrings give more real English sentences.
_DOC_MODULES = ("sklearn.linear_model", "sklearn.ensemble", "sklearn.cluster", "sklearn.decomposition", "sklearn.svm",
                "sklearn.neighbors", "sklearn.preprocessing", "sklearn.tree", "sklearn.naive_bayes", "sklearn.mixture")


def _split_sentences(text: str) -> list[str]:
    import re

    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(text.split())):
        s = re.sub(r"`([^`<]*)<[^>]*>`_*", r"\1", s).replace("`", "")
        if 6 <= len(s.split()) <= 60 and s[-1] in ".!?" and re.search("[a-z]", s) and not re.search(r"[<>{}=]|::", s):
            out.append(s)
    return out


def real_sentences() -> list[str]:
    """Real English sentences available offline, deduplicated, in a fixed shuffled order: the
    scikit-learn dataset descriptions (descr/*.rst, markup lines dropped), the hand-written SENTENCES,
    and the first paragraphs of scikit-learn estimator docstrings."""
    import importlib
    import inspect

    import sklearn.datasets

    pool: list[str] = []
    descr = Path(sklearn.datasets.__file__).parent / "descr"
    for f in sorted(descr.glob("*.rst")):
        paragraphs, current = [], []
        for line in f.read_text().splitlines():
            s = line.strip()
            if not s or s.startswith(("..", ":", "=", "-", "|", "*", "+")) or set(s) <= set("=-~^*"):
                paragraphs.append(" ".join(current))
                current = []
            else:
                current.append(s)
        paragraphs.append(" ".join(current))
        for para in paragraphs:
            pool += _split_sentences(para)
    pool += SENTENCES
    for name in _DOC_MODULES:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr)
            doc = inspect.getdoc(obj) if inspect.isclass(obj) or inspect.isfunction(obj) else None
            for para in (doc or "").split("\n\n")[:3]:
                if para.strip().startswith(("Parameters", "..", ">>>", "Read more")) or "---" in para:
                    break
                pool += _split_sentences(para)
    pool = list(dict.fromkeys(pool))
    order = np.random.default_rng(0).permutation(len(pool))
    return [pool[k] for k in order]
PEER_METHODS = ("minmax", "entropy", "entropy2048")
# (calibration method, --int8-metric, --int8-target or None for the default) runs for EfficientNet;
# --effnet-configs overrides.
EFFNET_CONFIGS = [("entropy", "top1", None), ("entropy", "cosine", None)]
# BERT-base exports whose int8 latency is measured: the zoo's default (legacy exporter, opset 14) and a
# legacy opset-17 export (both with dynamic batch and sequence axes, as the zoo exports them).
BERT_RECIPES = {"legacy-op14": {"exporter": "legacy", "opset": 14}, "legacy-op17": {"exporter": "legacy", "opset": 17},
                "legacy-op17-sdpa": {"exporter": "legacy", "opset": 17, "attention": "sdpa"}}


def _session(path, optimize: bool = True, threads: int | None = None, profile: str | None = None):
    from onnxopt import sessions

    so = sessions.options(optimize=optimize, threads=threads)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return sessions.session(path, so)


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _onnxopt_int8(path, feeds, out: Path, opt_level=2, method="entropy", **kw):
    import onnxopt

    t = time.perf_counter()
    result = onnxopt.compile(str(path), opt_level=opt_level, int8=True, calibration_data=feeds,
                             calibration_method=method, verify_outputs=False, **kw)
    elapsed = time.perf_counter() - t
    result.save(out)
    rec = next(r for r in result.report["passes"] if r["name"] == "quantize_int8")
    return out, {"compile_s": round(elapsed, 2), "fired": rec["fired"], "declined": rec["declined_count"],
                 "details": rec.get("details"), "ops": {k: v for k, v in result.report["ops_after"].items()
                                                        if "quantize" in k.lower() or k in ("MatMul", "Gemm", "Conv")}}


def _int8_summary(info: dict) -> dict:
    """What the report says of the int8 pass: layers, the figures on its validation and calibration parts, times."""
    d = info.get("details") or {}
    fid = d.get("fidelity", {})
    keep = {k: v for k, v in info.items() if k != "details"}
    return {**keep, "layers_int8": d.get("quantized"), "layers": (d.get("quantized") or 0) + (d.get("float") or 0),
            "samples": d.get("samples"), "metric": d.get("metric"), "target": d.get("target"),
            "validation": fid.get("validation"), "calibration": fid.get("calibration"),
            "calibration_time_s": d.get("calibration_time_s"), "control_time_s": d.get("control_time_s"),
            "control_times_s": d.get("control_times_s"), "evaluations": d.get("evaluations")}


def _peer(fn, *args):
    """Run a peer; its failure is a result to report, not a crash of the benchmark."""
    try:
        got = fn(*args)
        return got if isinstance(got, tuple) else (got, {})
    except Exception as exc:  # noqa: BLE001
        return None, {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"}


# What a careful onnxruntime user sets on this machine (see the module docstring).
_REDUCE_RANGE = u8s8_saturates()


def ort_dynamic(src: Path, out: Path) -> Path:
    """onnxruntime's quantize_dynamic (s8 weights; its recipe for transformers on CPU) of `src` into `out`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, reduce_range=_REDUCE_RANGE,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return out


def _ort_static(path, feeds, out: Path, method: str):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    import importlib

    # The package re-exports a function named `quantize`: take the module itself.
    ortq = importlib.import_module("onnxruntime.quantization.quantize")

    # quantize_static has no option for the Entropy calibrator's bins (always 128 bins for 128
    # quantized bins); "entropy2048" injects num_bins=2048 into the calibrator it creates.
    original = ortq.create_calibrator

    def with_bins(*args, **kwargs):
        kwargs["extra_options"] = {**(kwargs.get("extra_options") or {}), "num_bins": 2048}
        return original(*args, **kwargs)

    if method == "entropy2048":
        ortq.create_calibrator = with_bins
    t = time.perf_counter()
    try:
        quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=_REDUCE_RANGE,
                        calibrate_method=CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Entropy)
    finally:
        ortq.create_calibrator = original
    return out, {"compile_s": round(time.perf_counter() - t, 2)}


# ---- digits ----------------------------------------------------------------------------------


def bench_digits(tmp: Path, peers: bool) -> dict:
    from onnxopt.bench import zoo

    path = zoo.build("digits_cnn")
    x_tr, _, x_te, y_te = zoo.digits_data()
    feeds = [{"input": x_tr[i : i + 1]} for i in range(256)]

    def acc(p):
        s = _session(p)
        return float((s.run(None, {"input": x_te})[0].argmax(1) == y_te).mean())

    res = {"fp32_accuracy": acc(path)}
    for method in ("entropy", "minmax", "percentile"):
        p, info = _onnxopt_int8(path, feeds, tmp / f"digits-{method}.onnx", method=method)
        res[f"onnxopt_{method}"] = {"accuracy": acc(p), **{k: v for k, v in info.items() if k != "details"}}
    if peers:
        for method in PEER_METHODS:
            p, info = _peer(_ort_static, path, feeds, tmp / f"digits-ort-{method}.onnx", method)
            res[f"ort_{method}"] = {"accuracy": acc(p), **info} if p else info
    return res


# ---- MiniLM ----------------------------------------------------------------------------------


def _minilm_feeds(sentences):
    from transformers import AutoTokenizer

    from onnxopt.bench import zoo

    tok = AutoTokenizer.from_pretrained(str(zoo.minilm_dir()), local_files_only=True)
    feeds = []
    for s in sentences:
        # One padded length for all (onnxruntime's Entropy calibrator stacks samples); the mean
        # pooling uses the attention mask, so padding does not change the embedding.
        enc = tok(s, return_tensors="np", padding="max_length", max_length=MINILM_SEQ, truncation=True)
        feeds.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return feeds


def _embed(sess, feeds):
    out = []
    for f in feeds:
        h = sess.run(["last_hidden_state"], f)[0][0]
        m = f["attention_mask"][0].astype(np.float64)[:, None]
        out.append((h * m).sum(0) / m.sum())
    return out


def bench_minilm(tmp: Path, peers: bool, opt_levels=(2, 3)) -> dict:
    from onnxopt.bench import zoo

    path = zoo.build("minilm")
    sentences = real_sentences()
    calib = _minilm_feeds(sentences[:N_CALIB_SENTENCES])
    held = _minilm_feeds(sentences[N_CALIB_SENTENCES:N_CALIB_SENTENCES + N_HELD_OUT_SENTENCES])
    ref = _embed(_session(path), held)

    def fidelity(p):
        got = _embed(_session(p), held)
        cos = [_cos(a, b) for a, b in zip(ref, got)]
        return {"min_cosine": round(min(cos), 5), "mean_cosine": round(float(np.mean(cos)), 5),
                "below_0.99": int(sum(c < 0.99 for c in cos))}

    res = {"held_out_sentences": len(held), "calibration_sentences": len(calib), "seq": MINILM_SEQ}
    for level in opt_levels:
        p, info = _onnxopt_int8(path, calib, tmp / f"minilm-O{level}.onnx", opt_level=level)
        res[f"onnxopt_O{level}_entropy"] = {**fidelity(p), **_int8_summary(info)}
    if peers:
        for method in PEER_METHODS:
            p, info = _peer(_ort_static, path, calib, tmp / f"minilm-ort-{method}.onnx", method)
            res[f"ort_{method}"] = {**fidelity(p), **info} if p else info
    return res


# ---- EfficientNet-Lite0 ----------------------------------------------------------------------


def _photo_crops(n: int, seed: int) -> list[np.ndarray]:
    """Random crops of scikit-image's sample photos, resized to 224, ImageNet-normalized NCHW."""
    from skimage import data, transform

    photos = [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left",
                                                 "hubble_deep_field", "immunohistochemistry", "retina", "cat")
              if hasattr(data, name)]
    photos = [p[..., :3] for p in photos if p.ndim == 3]
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for k in range(n):
        img = photos[k % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = transform.resize(img[y : y + side, x : x + side], (224, 224), anti_aliasing=True).astype(np.float32)
        if crop.max() > 1.5:
            crop = crop / 255.0
        out.append(((crop - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
    return out


def bench_efficientnet(tmp: Path, peers: bool, n_calib: int = 128, n_eval: int = 400) -> dict:
    """Top-1 agreement on `n_eval` crops (400: at 100 the binomial standard error, ~1.7 points, is
    as large as the differences in question) and batch-1 latency against fp32 -O2."""
    import onnxopt
    from onnxopt.bench import zoo

    path = zoo.build("efficientnet_lite0")
    calib = [{"input": x} for x in _photo_crops(n_calib, seed=1)]
    evals = _photo_crops(n_eval, seed=2)
    x_eval = np.concatenate(evals)

    def top1(p):
        s = _session(p)
        return np.concatenate([s.run(None, {"input": x_eval[i : i + 25]})[0] for i in range(0, len(x_eval), 25)]).argmax(1)

    from onnxopt.kernels import fidelity

    ref = top1(path)
    s_ref = _session(path)
    logits = np.concatenate([s_ref.run(None, {"input": x_eval[i : i + 25]})[0] for i in range(0, len(x_eval), 25)])
    _, ties = fidelity.top2_margins({"logits": logits})
    res = {"eval_crops": n_eval, "calibration_crops": n_calib, "eval_near_ties": int(ties.sum())}
    fp32 = onnxopt.compile(str(path), opt_level=2, verify_outputs=False).save(tmp / "effnet-fp32.onnx")
    paths = {"fp32_O2": fp32}
    for method, metric, target in EFFNET_CONFIGS:
        key = f"onnxopt_O2_{method}_{metric}" + (f"_{target}" if target is not None else "_default")
        p, info = _onnxopt_int8(path, calib, tmp / f"{key}.onnx", opt_level=2, method=method, int8_metric=metric,
                                int8_target=target)
        same = top1(p) == ref
        res[key] = {"top1_agreement": float(same.mean()), "top1_agreement_without_near_ties": float(same[~ties].mean()),
                    **_int8_summary(info)}
        paths[key] = p
    if peers:
        for method in PEER_METHODS:
            p, info = _peer(_ort_static, path, calib, tmp / f"effnet-ort-{method}.onnx", method)
            res[f"ort_{method}"] = {"top1_agreement": float((top1(p) == ref).mean()), **info} if p else info
            if p:
                paths[f"ort_{method}"] = p
    lat = _latency(paths, {"input": evals[0]}, rounds=30)
    res["latency_ms"] = {k: v["p50_ms"] for k, v in lat.items()}
    res["latency_ratio_vs_fp32_O2"] = {k: v["ratio"] for k, v in lat.items()}
    return res


# ---- BERT-base latency -----------------------------------------------------------------------


def _latency(paths: dict[str, Path], feed, rounds: int = 20, threads: int | None = None) -> dict[str, dict]:
    """p50 (ms) and the per-round ratio to the first variant, rounds alternating in rotating order
    (bench/experiments/latency.py)."""
    from onnxopt.bench import timing

    sessions = {k: _session(p, threads=threads) for k, p in paths.items()}
    lat = timing.alternating(sessions, feed, rounds, per_round=3, warmup=3)
    base = lat[next(iter(paths))]
    return {k: {"p50_ms": round(v["p50"], 2), "ratio": timing.round_ratios(v, base)} for k, v in lat.items()}


def _op_profile(path: Path, feed, tmp: Path) -> dict[str, int]:
    s = _session(path, profile=str(tmp / "prof"))
    s.run(None, feed)
    prof = s.end_profiling()
    events = json.loads(Path(prof).read_text())
    counts: dict[str, int] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            counts[op] = counts.get(op, 0) + 1
    os.unlink(prof)
    return counts


def bench_bert(tmp: Path, peers: bool, seq: int = 128, n_calib: int = 32) -> dict:
    """Latency only, for each of BERT_RECIPES: the zoo's BERT-base has no trained weights, so fidelity
    is not the question here and every MatMul is kept quantized (int8_min_cosine=0). Calibration cost
    is measured on the zoo default (legacy-op14)."""
    res = {}
    for name, recipe in BERT_RECIPES.items():
        res[name] = _bench_bert_recipe(tmp, peers, recipe, seq, n_calib, calibration_cost=name == "legacy-op14")
    return res


def _bench_bert_recipe(tmp: Path, peers: bool, recipe: dict, seq: int, n_calib: int, calibration_cost: bool) -> dict:
    import onnxopt
    from onnxopt import verify
    from onnxopt.bench import zoo
    from onnxopt.passes.int8.quantize import QuantizeInt8Pass

    path = zoo.build("bert", size="base", **recipe)
    rng = np.random.default_rng(0)

    def feeds(n):
        return [{"input_ids": rng.integers(1000, 30522, (1, seq)).astype(np.int64),
                 "attention_mask": np.ones((1, seq), np.int64),
                 "token_type_ids": np.zeros((1, seq), np.int64)} for _ in range(n)]

    calib = feeds(n_calib)
    fp32 = tmp / "bert-O3.onnx"
    compiled = onnxopt.compile(str(path), opt_level=3, verify_outputs=False)
    compiled.save(fp32)
    res = {"seq": seq, "calibration_samples": n_calib}
    paths = {"fp32_O3": fp32}
    for level in (3, 2):
        p, info = _onnxopt_int8(path, calib, tmp / f"bert-int8-O{level}.onnx", opt_level=level, int8_min_cosine=0.0)
        res[f"onnxopt_int8_O{level}"] = {k: v for k, v in info.items() if k != "details"}
        paths[f"int8_O{level}"] = p
    if peers:
        dyn = tmp / "bert-dyn.onnx"
        p, info = _peer(ort_dynamic, fp32, dyn)
        if p is None:
            res["ort_dynamic"] = info
        else:
            paths["ort_dynamic"] = dyn
    feed = calib[0]
    lat = _latency(paths, feed)
    res["latency_ms"] = {k: v["p50_ms"] for k, v in lat.items()}
    res["latency_ratio_vs_fp32_O3"] = {k: v["ratio"] for k, v in lat.items()}
    res["ort_kernels"] = {k: _op_profile(paths[k], feed, tmp) for k in paths}
    res["recipe"] = recipe
    if not calibration_cost:
        return res
    # Calibration cost vs plain inference over the same samples (onnxruntime optimizations off in both).
    model = compiled.ir_model
    qp = QuantizeInt8Pass()
    qp.configure({"calibration_data": calib, "calibration_method": "entropy", "int8_min_cosine": 0.0,
                  "target": "cpu", "make_session": verify.session})
    qp(model)
    plain = _session(fp32, optimize=False)
    t = time.perf_counter()
    for f in calib:
        plain.run(None, f)
    plain_s = time.perf_counter() - t
    cal = qp.details["calibration_time_s"]
    res["calibration"] = {"plain_inference_s": round(plain_s, 2), **cal,
                          "ratio_vs_plain": round(cal["total_s"] / plain_s, 3)}
    return res


def bench_memory(tmp: Path, peers: bool) -> dict:
    """Peak Python-heap growth (numpy included, via tracemalloc) of calibration, 64 vs 512 samples
    (MiniLM, sentences cycled)."""
    import tracemalloc

    import onnxopt
    from onnxopt import verify
    from onnxopt.bench import zoo
    from onnxopt.passes.int8.quantize import QuantizeInt8Pass

    path = zoo.build("minilm")
    base = _minilm_feeds(SENTENCES)
    res = {}
    for n in (64, 512):
        model = onnxopt.compile(str(path), opt_level=2, verify_outputs=False).ir_model
        qp = QuantizeInt8Pass()
        qp.configure({"calibration_data": (base[k % len(base)] for k in range(n)), "calibration_method": "entropy",
                      "int8_min_cosine": 0.0, "target": "cpu", "make_session": verify.session})
        tracemalloc.start()
        qp(model)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        res[f"samples_{n}"] = {"peak_mb": round(peak / 2**20, 1), **qp.details["calibration_time_s"]}
    res["peak_ratio_512_vs_64"] = round(res["samples_512"]["peak_mb"] / res["samples_64"]["peak_mb"], 3)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onnxopt.bench.experiments.int8_bench")
    ap.add_argument("--models", default="digits,minilm,efficientnet,bert,memory")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("-o", "--output")
    ap.add_argument("--bert-recipes", help=f"comma-separated subset of {', '.join(BERT_RECIPES)}")
    ap.add_argument("--effnet-configs", help="method:metric[:target],... e.g. entropy:top1,entropy:cosine:0.999")
    args = ap.parse_args(argv)
    if args.effnet_configs:  # method:metric[:target],...
        EFFNET_CONFIGS[:] = [(x.split(":")[0], x.split(":")[1], float(x.split(":")[2]) if x.count(":") > 1 else None)
                             for x in args.effnet_configs.split(",")]
    if args.bert_recipes:
        keep = args.bert_recipes.split(",")
        for name in list(BERT_RECIPES):
            if name not in keep:
                del BERT_RECIPES[name]
    results = {"machine": {**machine(), "u8s8_saturates": _REDUCE_RANGE}}
    benches = {"digits": bench_digits, "minilm": bench_minilm, "efficientnet": bench_efficientnet, "bert": bench_bert,
               "memory": bench_memory}
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            t = time.perf_counter()
            results[name] = benches[name](Path(d), not args.no_peers)
            results[name]["bench_s"] = round(time.perf_counter() - t, 1)
            print(json.dumps({name: results[name]}, indent=1, default=str), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
