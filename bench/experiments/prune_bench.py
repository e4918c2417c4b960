"""Structured pruning benchmark on real trained weights: onnxopt beside onnxsim 0.8 and Torch-Pruning.

`python -m onnxopt.bench.experiments.prune_bench [--models digits,minilm,efficientnet,memory,bert] [--no-peers] [-o out.json]`

* digits: the trained digits CNN (bench/zoo.py), test accuracy on the 450-image test split;
  calibration: 320 training images. onnxopt at --prune 0.3 / 0.5 (with --prune-round 4: the
  layers have 16 and 32 channels, multiples of 8 cannot approach 30%) and at the default round 8.
* minilm: all-MiniLM-L6-v2 (real weights), onnxopt -O3 output; cosine of mean-pooled embeddings
  of 160 held-out real sentences (int8_bench.real_sentences()[120:280]) dense vs pruned.
  Calibration: 128 samples made only of the 120 calibration sentences (each alone, and 8 random
  pairs of them), padded to 64 tokens like int8_bench's; and once, at the first fraction, every real
  sentence that is not held out (425), each alone.
* efficientnet: EfficientNet-Lite0 (ImageNet weights, BN folded by -O2), top-1 agreement with the
  dense model on 200 random crops of scikit-image photos; calibration: 64 other crops.
* memory: peak heap growth of pruning with 128 vs 1024 calibration samples (an .npz, streamed).
* Peers on the same models in the same run: onnxsim's apply_structured_wanda_pruning +
  apply_pruning_finetune on the form it can prune (onnxopt -O2 output for digits, -O3 for MiniLM),
  at several channel sparsities, with the MACs each result really removes, and (MiniLM,
  EfficientNet) at the sparsity that removes the same MACs as each onnxopt run; Torch-Pruning when the
  package is installed (magnitude importance, no fine-tuning, exported with torch.onnx): the digits
  CNN's channels, EfficientNet-Lite0's channels at the same MACs as each onnxopt run, and MiniLM's
  heads and FFN neurons (its export fused by onnxopt -O3 before
  counting, like onnxopt's own output).
* bert: BERT-base (zoo, random weights), speed only: --prune 0.4 compile time, latency of the pruned
  model and of the pruned model with --int8 beside -O3 (alternating rounds, A/A control).

Every digits, MiniLM and EfficientNet result also gets its parameters, file size and batch-1 latency
beside the dense model's (alternating rounds, onnxruntime's default optimizations, 2 threads, an A/A
copy of the dense model as the control).

Output: the JSON, a markdown table beside it (.md) and the fidelity-vs-MACs curves of every method (.png).

MACs: Conv/MatMul/Gemm/Attention multiply-accumulates of one batch-1 run, counted on each model
file the same way (onnxopt.passes.prune's counter at probe shapes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxopt.bench.fingerprint import machine
from onnxopt.bench.experiments.fp16_bench import _cos_rows
from onnxopt.bench.experiments.int8_bench import N_CALIB_SENTENCES, N_HELD_OUT_SENTENCES, _cos, _embed, _minilm_feeds, _peer, _session, real_sentences


def model_macs(path, feed) -> dict:
    """MACs of the layers of `path` on one run of `feed`, by op."""
    import onnx_ir as ir

    from onnxopt import verify
    from onnxopt.passes.prune.structured import _macs, _session as with_outputs

    model = ir.load(str(path))
    values = [v for n in model.graph for v in n.outputs if v.name]
    sess = with_outputs(model, verify.session, values)
    names = [v.name for v in values]
    shapes = {n: a.shape for n, a in zip(names, sess.run(names, feed))}
    shapes.update({k: np.shape(v) for k, v in feed.items()})
    by_op: dict[str, float] = {}
    for node in model.graph:
        m = _macs(node, lambda v: shapes.get(v.name) if v is not None else None)
        if m:
            by_op[node.op_type] = by_op.get(node.op_type, 0.0) + m
    return by_op


def _onnxopt(path, feeds, out: Path, **kw):
    import onnxopt

    t = time.perf_counter()
    result = onnxopt.compile(str(path), calibration_data=feeds, verify_outputs=False, **kw)
    elapsed = time.perf_counter() - t
    result.save(out)
    d = next(r for r in result.report["passes"] if r["name"] == "prune")["details"]
    return out, {"compile_s": round(elapsed, 1), "macs_removed_of_prunable": round(d.get("macs_removed_fraction", 0), 4),
                 "units": d.get("units"), "params": [d.get("params_before"), d.get("params_after")],
                 "calibration_fidelity": d.get("fidelity")}


def _onnxsim(dense_path, feeds, out: Path, sparsity: float):
    import onnx
    from onnxsim.finetune import apply_pruning_finetune
    from onnxsim.pruning import apply_structured_wanda_pruning

    t = time.perf_counter()
    pruned = apply_structured_wanda_pruning(str(dense_path), calibration_data=feeds, sparsity=sparsity)
    tuned = apply_pruning_finetune(str(dense_path), pruned, calibration_data=feeds)
    onnx.save(tuned, str(out))
    return out, {"compile_s": round(time.perf_counter() - t, 1), "sparsity": sparsity}


def _torch_pruning_digits(out: Path, ratio: float):
    """Torch-Pruning on the torch digits CNN: L2 magnitude importance, global ranking off, no
    fine-tuning; the classifier's outputs are kept; exported with the legacy exporter."""
    import torch
    import torch_pruning as tp

    from onnxopt.bench import zoo

    t = time.perf_counter()
    module, _, _ = zoo.torch_module("digits_cnn")
    module.eval()
    example = torch.zeros(1, 1, 8, 8)
    pruner = tp.pruner.MagnitudePruner(module, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=[module[-1]])
    pruner.step()
    torch.onnx.export(module, (example,), str(out), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=14, dynamo=False)
    return out, {"compile_s": round(time.perf_counter() - t, 1), "pruning_ratio": ratio}


def _torch_pruning_minilm(out: Path, ratio: float):
    """Torch-Pruning on all-MiniLM-L6-v2: whole heads (Q/K/V and the output projection's rows) and FFN
    neurons at `ratio` per layer, L2 magnitude importance, no fine-tuning; the hidden size (the
    residual stream) is left whole, like onnxopt's; exported with the legacy exporter, opset 14."""
    import torch
    import torch_pruning as tp

    from onnxopt.bench import zoo

    t = time.perf_counter()
    module, names, outputs = zoo.torch_module("minilm")
    bert = module.model
    example = _minilm_feeds(["A sentence to trace the model with."])[0]
    inputs = tuple(torch.from_numpy(example[n]) for n in names)
    num_heads, ignored = {}, [bert.pooler.dense]
    for layer in bert.encoder.layer:
        sa = layer.attention.self
        for lin in (sa.query, sa.key, sa.value):
            num_heads[lin] = sa.num_attention_heads
        ignored += [layer.attention.output.dense, layer.output.dense]
    pruner = tp.pruner.MetaPruner(
        module, inputs, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
        ignored_layers=ignored, output_transform=lambda out: out[0])
    pruner.step()
    for layer in bert.encoder.layer:
        sa = layer.attention.self
        sa.num_attention_heads = sa.query.out_features // sa.attention_head_size
        sa.all_head_size = sa.query.out_features
    with torch.no_grad():
        torch.onnx.export(module, inputs, str(out), input_names=list(names), output_names=list(outputs),
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names}, opset_version=14, dynamo=False)
    return out, {"compile_s": round(time.perf_counter() - t, 1), "pruning_ratio": ratio,
                 "heads_kept": sum(layer.attention.self.num_attention_heads for layer in bert.encoder.layer),
                 "ffn_kept": sum(layer.intermediate.dense.out_features for layer in bert.encoder.layer)}


def _torch_pruning_efficientnet(out: Path, ratio: float):
    """Torch-Pruning on EfficientNet-Lite0: L2 magnitude importance over every prunable channel at
    the uniform `ratio` (depthwise convs and the channels tied by residual adds coupled by its
    dependency graph), the classifier kept, no fine-tuning; exported with the legacy exporter, opset 13."""
    import torch
    import torch_pruning as tp

    from onnxopt.bench import zoo

    t = time.perf_counter()
    example = torch.zeros(1, 3, 224, 224)
    module, names, outputs = zoo.torch_module("efficientnet_lite0")
    tp.pruner.MagnitudePruner(module, example, importance=tp.importance.MagnitudeImportance(p=2),
                              pruning_ratio=ratio, ignored_layers=[module._fc]).step()
    with torch.no_grad():
        torch.onnx.export(module.eval(), (example,), str(out), input_names=list(names), output_names=list(outputs),
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13, dynamo=False)
    return out, {"compile_s": round(time.perf_counter() - t, 1), "pruning_ratio": round(ratio, 4)}


def _footprint(path: Path) -> dict:
    """Parameters (elements of every initializer and Constant tensor) and bytes on disk (the .onnx
    and the external data files it names, bench/runner.py's count) of one model."""
    import onnx
    from onnx import numpy_helper

    from onnxopt.bench.runner import _size_with_data

    model = onnx.load(str(path))
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    return {"params_in_file": int(sum(numpy_helper.to_array(t).size for t in tensors)),
            "file_mb": round(_size_with_data(path) / 2**20, 2)}


def _add_size_and_latency(res: dict, dense: Path, feed: dict, rounds: int = 6, per_round: int | None = None) -> None:
    """Every result with a model file (its "_path") gets its parameters, file size and batch-1
    latency beside the dense model's: alternating rounds, onnxruntime's default optimizations, 2
    threads, an A/A copy of the dense model as the control; `latency_vs_dense` is the median of the
    per-round ratios. A round of a variant runs about 50 ms of the dense model (10 to 1000 runs:
    the digits CNN takes 26 us a run). The model files are temporary: the paths are dropped."""
    from onnxopt.bench import timing

    paths = {k: Path(v.pop("_path")) for k, v in res.items() if isinstance(v, dict) and "_path" in v}
    for k, p in paths.items():
        res[k].update(_footprint(p))
    variants = {"dense": Path(dense), "dense_copy": Path(dense), **paths}
    sessions = {k: timing.session(p, threads=2) for k, p in variants.items()}
    if per_round is None:
        t = time.perf_counter()
        for _ in range(20):
            sessions["dense"].run(None, feed)
        per_round = int(np.clip(0.05 / ((time.perf_counter() - t) / 20), 10, 1000))
    lat = timing.alternating(sessions, feed, rounds, per_round, warmup=3)
    for k in paths:
        res[k]["latency_ms_p50"] = round(lat[k]["p50"], 3)
        res[k]["latency_vs_dense"] = timing.round_ratios(lat[k], lat["dense"])["median"]
    res["dense_footprint"] = _footprint(Path(dense))
    res["dense_latency_ms_p50"] = round(lat["dense"]["p50"], 3)
    res["latency_aa_control"] = timing.round_ratios(lat["dense_copy"], lat["dense"])["median"]


def _reduction(base: dict, got: dict, ops) -> float:
    b = sum(v for k, v in base.items() if k in ops)
    g = sum(v for k, v in got.items() if k in ops)
    return round(1.0 - g / b, 4) if b else 0.0


def _matched_sparsity(probe: dict, sparsity: float, key: str, target: float) -> float | None:
    """The onnxsim sparsity that removes about `target` of the MACs, from one run of it at
    `sparsity` that removed probe[key] (the removed MACs grow linearly with its uniform
    per-layer sparsity); None without that run or when no sparsity below 0.95 reaches it."""
    removed = probe.get(key)
    if not removed:
        return None
    s = round(target * sparsity / removed, 3)
    return s if s < 0.95 else None


def bench_digits(tmp: Path, peers: bool) -> dict:
    import onnxopt
    from onnxopt.bench import zoo

    path = zoo.build("digits_cnn")
    x_tr, _, x_te, y_te = zoo.digits_data()
    feeds = [{"input": x_tr[i : i + 1]} for i in range(320)]
    probe = {"input": x_te[:1]}

    def acc(p):
        return float((_session(p).run(None, {"input": x_te})[0].argmax(1) == y_te).mean())

    dense = onnxopt.compile(str(path), opt_level=2, verify_outputs=False).save(tmp / "digits-O2.onnx")
    base = model_macs(dense, probe)
    res = {"fp32_accuracy": acc(path), "dense_macs": base}

    def entry(p, info):
        m = model_macs(p, probe)
        return {"accuracy": acc(p), "conv_macs_removed": _reduction(base, m, ("Conv",)),
                "all_macs_removed": _reduction(base, m, base.keys()), "_path": str(p), **info}

    for f, rnd in ((0.3, 4), (0.5, 4), (0.3, 8), (0.5, 8)):
        p, info = _onnxopt(path, feeds, tmp / f"d-{f}-{rnd}.onnx", opt_level=2, prune=f, prune_round=rnd)
        res[f"onnxopt_prune{f}_round{rnd}"] = entry(p, info)
    if peers:
        for s in (0.1, 0.2, 0.3, 0.5):
            p, info = _peer(_onnxsim, dense, feeds[:64], tmp / f"d-sim-{s}.onnx", s)
            res[f"onnxsim_sparsity{s}"] = entry(p, info) if p else info
        for r in (0.2, 0.3, 0.5):
            p, info = _peer(_torch_pruning_digits, tmp / f"d-tp-{r}.onnx", r)
            res[f"torch_pruning_magnitude_ratio{r}"] = entry(p, info) if p else info
    _add_size_and_latency(res, dense, probe)
    return res


def _minilm_calibration(n: int = 128, seed: int = 0):
    base = real_sentences()[:N_CALIB_SENTENCES]
    pairs = [a + " " + b for a, b in itertools.permutations(base, 2)]
    rng = np.random.default_rng(seed)
    return _minilm_feeds(list(base) + [pairs[i] for i in rng.choice(len(pairs), n - len(base), replace=False)])


def bench_minilm(tmp: Path, peers: bool, fractions=(0.25, 0.5)) -> dict:
    import onnxopt
    from onnxopt.bench import zoo

    path = zoo.build("minilm")
    calib = _minilm_calibration()
    held = _minilm_feeds(real_sentences()[N_CALIB_SENTENCES:N_CALIB_SENTENCES + N_HELD_OUT_SENTENCES])
    ref = _embed(_session(path), held)
    dense = onnxopt.compile(str(path), opt_level=3, verify_outputs=False).save(tmp / "minilm-O3.onnx")
    base = model_macs(dense, held[0])

    def entry(p, info):
        got = _embed(_session(p), held)
        cos = [_cos(a, b) for a, b in zip(ref, got)]
        m = model_macs(p, held[0])
        return {"min_cosine": round(min(cos), 4), "mean_cosine": round(float(np.mean(cos)), 4),
                "encoder_macs_removed": _reduction(base, m, ("MatMul", "Attention")), "_path": str(p), **info}

    res = {"held_out_sentences": len(held), "calibration_samples": len(calib), "dense_macs": base}
    for f in fractions:
        p, info = _onnxopt(path, calib, tmp / f"m-{f}.onnx", opt_level=3, prune=f)
        res[f"onnxopt_O3_prune{f}"] = entry(p, info)
    # More calibration data: every real sentence that is not held out, each alone.
    pool = real_sentences()
    wide = _minilm_feeds(pool[:N_CALIB_SENTENCES] + pool[N_CALIB_SENTENCES + N_HELD_OUT_SENTENCES:])
    p, info = _onnxopt(path, wide, tmp / "m-wide.onnx", opt_level=3, prune=fractions[0])
    res[f"onnxopt_O3_prune{fractions[0]}_{len(wide)}sentences"] = entry(p, info)
    if peers:
        for s in (0.25, 0.5):
            p, info = _peer(_onnxsim, dense, calib[:64], tmp / f"m-sim-{s}.onnx", s)
            res[f"onnxsim_O3_sparsity{s}"] = entry(p, info) if p else info
        # onnxsim prunes FFN neurons only, so its sparsity removes fewer encoder MACs than onnxopt's
        # --prune of the same number: rerun it at the sparsity that removes the same MACs.
        for f in fractions:
            s = _matched_sparsity(res.get("onnxsim_O3_sparsity0.25", {}), 0.25, "encoder_macs_removed", f)
            if s is not None:
                p, info = _peer(_onnxsim, dense, calib[:64], tmp / f"m-sim-m{f}.onnx", s)
                res[f"onnxsim_O3_sparsity{s}_matching{f}"] = entry(p, info) if p else info
        for r in (0.25, 0.5):
            p, info = _peer(_torch_pruning_minilm, tmp / f"m-tp-{r}.onnx", r)
            if p:  # fused like onnxopt's output, so that MACs are counted the same way
                p = onnxopt.compile(str(p), opt_level=3, verify_outputs=False).save(tmp / f"m-tp-{r}-O3.onnx")
            res[f"torch_pruning_magnitude_ratio{r}"] = entry(p, info) if p else info
    _add_size_and_latency(res, dense, held[0])
    return res


def _noise_agreement(ref: np.ndarray, cosine: float, seed: int = 0) -> float:
    """Top-1 agreement of the dense logits with themselves plus i.i.d. Gaussian noise (per row, a
    fraction of the row's spread, found by bisection) whose mean cosine to them is `cosine`: how
    much agreement any change of that logit error leaves on these crops, whatever made it."""
    noise = np.random.default_rng(seed).standard_normal(ref.shape) * ref.std(1, keepdims=True)
    lo, hi = 0.0, 4.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(_cos_rows(ref, ref + mid * noise)) > cosine else (lo, mid)
    got = ref + (lo + hi) / 2 * noise
    return float((got.argmax(1) == ref.argmax(1)).mean())


def bench_efficientnet(tmp: Path, peers: bool, fractions=(0.1, 0.2, 0.3), n_calib: int = 64, n_eval: int = 200) -> dict:
    """Top-1 agreement with the dense model on random crops of scikit-image photos (other seeds than
    the calibration crops), the mean cosine of the logits, and for onnxopt's results the agreement
    that i.i.d. noise of the same logit cosine gives (a control: the crops are ambiguous, their median
    top-1/top-2 logit margin is about half the logits' standard deviation)."""
    import onnxopt
    from onnxopt.bench import zoo
    from onnxopt.bench.experiments.int8_bench import _photo_crops

    path = zoo.build("efficientnet_lite0")
    calib = [{"input": x} for x in _photo_crops(n_calib, seed=1)]
    x_eval = np.concatenate(_photo_crops(n_eval, seed=2))

    def logits(p):
        s = _session(p)
        return np.concatenate([s.run(None, {"input": x_eval[i : i + 25]})[0] for i in range(0, len(x_eval), 25)])

    ref = logits(path)
    dense = onnxopt.compile(str(path), opt_level=2, verify_outputs=False).save(tmp / "effnet-O2.onnx")
    probe = {"input": x_eval[:1]}
    base = model_macs(dense, probe)

    def entry(p, info):
        m = model_macs(p, probe)
        got = logits(p)
        return {"top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                "logit_cosine_mean": round(float(np.mean(_cos_rows(ref, got))), 5),
                "macs_removed": _reduction(base, m, base.keys()), "_path": str(p), **info}

    res = {"eval_crops": n_eval, "calibration_crops": n_calib, "dense_macs": base,
           "top1_margin_median": round(float(np.median(np.diff(np.sort(ref, 1)[:, -2:], axis=1) / ref.std(1, keepdims=True))), 3)}
    for f in fractions:
        p, info = _onnxopt(path, calib, tmp / f"e-{f}.onnx", opt_level=2, prune=f)
        res[f"onnxopt_O2_prune{f}"] = e = entry(p, info)
        # Control: the agreement that i.i.d. noise on the dense logits, at the same mean logit cosine, gives.
        e["noise_control_agreement"] = _noise_agreement(ref, e["logit_cosine_mean"])
    if peers:
        for s in (0.1, 0.2, 0.3):
            p, info = _peer(_onnxsim, dense, calib[:32], tmp / f"e-sim-{s}.onnx", s)
            res[f"onnxsim_O2_sparsity{s}"] = entry(p, info) if p else info
        for f in fractions:  # and at the sparsity that removes the same MACs as onnxopt's --prune f
            s = _matched_sparsity(res.get("onnxsim_O2_sparsity0.1", {}), 0.1, "macs_removed", f)
            if s is not None:
                p, info = _peer(_onnxsim, dense, calib[:32], tmp / f"e-sim-m{f}.onnx", s)
                res[f"onnxsim_O2_sparsity{s}_matching{f}"] = entry(p, info) if p else info
        for f in fractions:  # Torch-Pruning at the channel ratio that removes the same MACs (secant steps)
            ratio, got = f, None
            for _ in range(3):
                p, info = _peer(_torch_pruning_efficientnet, tmp / f"e-tp-{f}.onnx", ratio)
                if not p:
                    got = info
                    break
                # BN folded like onnxopt's output, so that MACs are counted the same way
                p = onnxopt.compile(str(p), opt_level=2, verify_outputs=False).save(tmp / f"e-tp-{f}-O2.onnx")
                removed = _reduction(base, model_macs(p, probe), base.keys())
                got = (p, info)
                if abs(removed - f) < 0.01 or not removed:
                    break
                ratio = min(0.9, ratio * f / removed)
            res[f"torch_pruning_magnitude_matching{f}"] = entry(*got) if isinstance(got, tuple) else got
    _add_size_and_latency(res, dense, probe)
    return res


def bench_memory(tmp: Path, peers: bool) -> dict:
    """Peak Python-heap growth (numpy included, via tracemalloc) of pruning the digits CNN with 128
    and with 1024 calibration samples, given as an .npz file (streamed by the pass)."""
    import tracemalloc

    import onnxopt
    from onnxopt.bench import zoo

    path = zoo.build("digits_cnn")
    x_tr = zoo.digits_data()[0]
    res = {}
    # One untraced compile first: lazy imports and onnxruntime's one-time setup would otherwise count
    # against whichever run comes first (72 MB for 128 samples against 9 MB for 1024, run alone).
    onnxopt.compile(str(path), opt_level=2, prune=0.3, calibration_data=[{"input": x_tr[i:i + 1]} for i in range(20)],
                    verify_outputs=False)
    for n in (128, 1024):
        npz = tmp / f"calib{n}.npz"
        np.savez(npz, input=np.concatenate([x_tr] * 2)[:n])
        tracemalloc.start()
        t = time.perf_counter()
        onnxopt.compile(str(path), opt_level=2, prune=0.3, calibration_data=str(npz), verify_outputs=False)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        res[f"samples_{n}"] = {"peak_mb": round(peak / 2**20, 2), "compile_s": round(time.perf_counter() - t, 1)}
    res["peak_ratio_1024_vs_128"] = round(res["samples_1024"]["peak_mb"] / res["samples_128"]["peak_mb"], 3)
    return res


def bench_bert(tmp: Path, peers: bool, fraction: float = 0.4, n_calib: int = 128, rounds: int = 10) -> dict:
    """BERT-base (zoo, random weights: speed only), batch 1, seq 128: --prune 0.4 at -O3 with 128
    calibration samples (zoo sample feeds of other seeds), its compile time, and latency beside
    unpruned -O3 (alternating rounds, an A/A copy of -O3 as control, 2 threads); then the pruned
    model quantized with --int8 (64 of the samples) beside fp32 -O3, and with peers onnxruntime's
    quantize_dynamic of the same pruned model."""
    import onnxopt
    from onnxopt.bench import timing, zoo

    path = zoo.build("bert", size="base")
    calib = [zoo.sample_feeds("bert", path, seq=128, seed=100 + i) for i in range(n_calib)]
    feed = zoo.sample_feeds("bert", path, seq=128, seed=0)
    dense = onnxopt.compile(str(path), opt_level=3, verify_outputs=False).save(tmp / "bert-O3.onnx")
    t = time.perf_counter()
    pruned = onnxopt.compile(str(path), opt_level=3, prune=fraction, calibration_data=calib, verify_outputs=False)
    compile_s = time.perf_counter() - t
    pruned.save(tmp / "bert-pruned.onnx")
    d = next(r for r in pruned.report["passes"] if r["name"] == "prune")["details"]
    # int8 of the pruned model (prune, then quantize; the same order as one compile with both).
    t = time.perf_counter()
    both = onnxopt.compile(str(tmp / "bert-pruned.onnx"), opt_level=3, int8=True, calibration_data=calib[:64],
                           verify_outputs=False)
    both_s = time.perf_counter() - t
    both.save(tmp / "bert-pruned-int8.onnx")
    variants = {"O3": dense, "O3_copy": dense, "pruned": tmp / "bert-pruned.onnx",
                "pruned_int8": tmp / "bert-pruned-int8.onnx"}
    peer_info = {}
    if peers:  # the onnxruntime quantizer on the same pruned model (dynamic: its recipe for BERT on CPU)
        from onnxopt.bench.experiments.int8_bench import ort_dynamic

        p, peer_info = _peer(ort_dynamic, tmp / "bert-pruned.onnx", tmp / "bert-pruned-ort-dynamic.onnx")
        if p is not None:
            variants["pruned_ort_dynamic_int8"] = p
    sessions = {k: timing.session(p, threads=2) for k, p in variants.items()}
    lat = timing.alternating(sessions, feed, rounds=rounds, per_round=10, warmup=3)
    ratios = {k: timing.round_ratios(lat[k], lat["O3"]) for k in variants if k != "O3"}
    return {"fraction": fraction, "prune_compile_s": round(compile_s, 1), "int8_of_pruned_compile_s": round(both_s, 1),
            "calibration_samples": n_calib,
            "macs_removed_fraction": round(d["macs_removed_fraction"], 4), "units": d["units"],
            "prune_time_s": d.get("time_s"), "latency_ms_p50": {k: round(v["p50"], 2) for k, v in lat.items()},
            "ratio_vs_O3": ratios, **({"ort_dynamic_error": peer_info["error"]} if "error" in peer_info else {})}


def _size_cols(val: dict) -> str:
    """The parameters, file size and latency columns of one result ('-' where not measured)."""
    n = val.get("params_in_file")
    params = "-" if n is None else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"
    size = f"{val['file_mb']} MB" if val.get("file_mb") is not None else "-"
    lat = f"{val['latency_vs_dense']}x" if "latency_vs_dense" in val else "-"
    return f"{params} | {size} | {lat}"


def markdown(results: dict) -> str:
    lines = ["| model | method | MACs removed | fidelity | params | file | latency vs dense | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for key, val in results.get("digits", {}).items():
        if isinstance(val, dict) and "accuracy" in val:
            lines.append(f"| digits CNN | {key} | conv {val['conv_macs_removed']:.1%} | accuracy {val['accuracy']:.2%} "
                         f"(fp32 {results['digits']['fp32_accuracy']:.2%}) | {_size_cols(val)} | {val.get('compile_s')} |")
    for key, val in results.get("minilm", {}).items():
        if isinstance(val, dict) and "min_cosine" in val:
            lines.append(f"| MiniLM-L6 | {key} | encoder {val['encoder_macs_removed']:.1%} | held-out cosine min "
                         f"{val['min_cosine']} / mean {val['mean_cosine']} | {_size_cols(val)} | {val.get('compile_s')} |")
    for key, val in results.get("efficientnet", {}).items():
        if isinstance(val, dict) and "top1_agreement" in val:
            extra = (f", logit cosine {val['logit_cosine_mean']}" if "logit_cosine_mean" in val else "") + (
                f", noise at that cosine {val['noise_control_agreement']:.1%}" if "noise_control_agreement" in val else "")
            lines.append(f"| EfficientNet-Lite0 | {key} | {val['macs_removed']:.1%} | top-1 agreement "
                         f"{val['top1_agreement']:.1%}{extra} | {_size_cols(val)} | {val.get('compile_s')} |")
    for model, name in (("digits", "digits CNN"), ("minilm", "MiniLM-L6"), ("efficientnet", "EfficientNet-Lite0")):
        r = results.get(model, {})
        if "dense_footprint" in r:
            lines.append(f"| {name} | dense (latency {r['dense_latency_ms_p50']} ms, A/A {r['latency_aa_control']}x) | 0 | - | "
                         f"{_size_cols({**r['dense_footprint'], 'latency_vs_dense': 1.0})} | - |")
    bert = results.get("bert")
    if bert:
        r = bert["ratio_vs_O3"]
        lines.append(f"| BERT-base (speed) | onnxopt_O3_prune{bert.get('fraction', 0.4)} | {bert['macs_removed_fraction']:.1%} | "
                     f"latency {r['pruned']['median']}x of -O3 (A/A {r['O3_copy']['median']}x); + int8 "
                     f"{r['pruned_int8']['median']}x" + (f" (onnxruntime quantize_dynamic: {r['pruned_ort_dynamic_int8']['median']}x)"
                                                          if "pruned_ort_dynamic_int8" in r else "") +
                     f" | - | - | - | {bert['prune_compile_s']} |")
    return "\n".join(lines) + "\n"


def _method(key: str) -> str | None:
    """The curve a result key belongs to: one per method at the default settings (onnxopt at the
    default round and calibration; onnxsim's probe sparsities and its MAC-matched reruns together)."""
    if key.startswith("onnxopt"):
        return None if "round4" in key or "sentences" in key else "onnxopt"
    if key.startswith("onnxsim"):
        return "onnxsim 0.8"
    if key.startswith("torch_pruning"):
        return "Torch-Pruning (magnitude)"
    return None


def curves(results: dict) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per model, per method: (MACs removed, fidelity) points sorted by MACs, from the results."""
    axes = {"digits": ("conv_macs_removed", "accuracy"), "minilm": ("encoder_macs_removed", "mean_cosine"),
            "efficientnet": ("macs_removed", "top1_agreement")}
    out: dict = {}
    for model, (x, y) in axes.items():
        for key, val in results.get(model, {}).items():
            method = _method(key)
            if method and isinstance(val, dict) and x in val and y in val:
                out.setdefault(model, {}).setdefault(method, []).append((val[x], val[y]))
    return {m: {k: sorted(v) for k, v in d.items()} for m, d in out.items()}


def curves_png(results: dict) -> bytes | None:
    """The curves of `results` as one figure (bench/plots.py), None when there are none."""
    from onnxopt.bench.plots import fidelity_curves_png

    data = curves(results)
    titles = {"digits": ("digits CNN", "test accuracy"), "minilm": ("MiniLM-L6", "held-out mean cosine"),
              "efficientnet": ("EfficientNet-Lite0", "top-1 agreement with dense")}
    return fidelity_curves_png({titles[m]: per for m, per in data.items()},
                               "structured pruning without fine-tuning: fidelity on held-out data vs MACs removed",
                               "MACs removed (%)", first="onnxopt") if data else None


BENCHES = {"digits": bench_digits, "minilm": bench_minilm, "efficientnet": bench_efficientnet,
           "memory": bench_memory, "bert": bench_bert}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onnxopt.bench.experiments.prune_bench")
    ap.add_argument("--models", default=",".join(BENCHES))
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("-o", "--output", help="JSON results; a markdown table is written beside it (.md)")
    args = ap.parse_args(argv)
    results = {"machine": machine(), "note": "2-core machine shared with other jobs: compile times under contention"}
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            started = time.perf_counter()
            results[name] = {**BENCHES[name](Path(d), not args.no_peers),
                             "bench_s": round(time.perf_counter() - started, 1)}
            print(json.dumps({name: results[name]}, indent=1, default=str), flush=True)
    if args.output:
        out = Path(args.output)
        out.write_text(json.dumps(results, indent=1, default=str))
        out.with_suffix(".md").write_text(markdown(results))
        png = curves_png(results)
        if png:
            out.with_suffix(".png").write_bytes(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
