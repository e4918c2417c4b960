"""Mergeable calibration statistics (int8 histograms and channel sums, pruning's Gram) and the shards
of a calibration source: the contract sharded calibration rests on."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt.kernels import calibration
from onnxopt.kernels import pruning as K
from onnxopt.passes.int8 import calibration_data


def _chunks(seed: int, n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        x = (rng.standard_normal((3, 5, 7)) * 10.0 ** rng.integers(-2, 3)).astype(np.float32)
        x[x < 0.2] = 0.0 if k % 2 else x[x < 0.2]
        x.flat[0] = 6.0 if k % 3 == 0 else x.flat[0]  # a repeated bound (saturation spike)
        out.append(x)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_merge_is_exact_and_associative(seed):
    chunks = _chunks(seed)
    one = calibration.AbsHistogram()
    for c in chunks:
        one.update(c)
    parts = []
    for group in (chunks[:1], chunks[1:4], chunks[4:]):
        h = calibration.AbsHistogram()
        for c in group:
            h.update(c)
        parts.append(h)
    left = parts[0].merge(parts[1]).merge(parts[2])
    right = parts[0].merge(parts[1].merge(parts[2]))
    swapped = parts[2].merge(parts[0]).merge(parts[1])
    for h in (left, right, swapped):
        np.testing.assert_array_equal(h.counts, one.counts)
        assert (h.edge, h.zeros, h.min, h.max, h.min_count, h.max_count) == (
            one.edge, one.zeros, one.min, one.max, one.min_count, one.max_count)
        assert h.saturated() == one.saturated()
        for method in calibration.METHODS:
            assert calibration.activation_range(h, method, unsigned=True) == \
                calibration.activation_range(one, method, unsigned=True)


def test_channel_sums_and_gram_merge_in_shard_order():
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal((2, 4, 6)).astype(np.float32) for _ in range(5)]
    sums = [calibration.ChannelSums(1).update(r) for r in rows]
    merged = sums[0].merge(sums[1]).merge(sums[2]).merge(sums[3]).merge(sums[4])
    # Exactly the float sums in shard order; the same as one pass up to rounding.
    np.testing.assert_array_equal(merged.sum, (((sums[0].sum + sums[1].sum) + sums[2].sum) + sums[3].sum) + sums[4].sum)
    one = calibration.ChannelSums(1)
    for r in rows:
        one.update(r)
    assert merged.count == one.count == 5 * 2 * 6
    np.testing.assert_allclose(merged.mean(), np.moveaxis(np.stack(rows).astype(np.float64), 2, -1).reshape(-1, 4).mean(0), rtol=1e-12)

    a = [rng.standard_normal((7, 4)) for _ in range(3)]
    z = [rng.standard_normal((7, 2)) for _ in range(3)]
    grams = []
    for x, y in zip(a, z):
        g = K.Gram(4, 2, bias=True)
        g.update(x, y)
        grams.append(g)
    m = grams[0].merge(grams[1]).merge(grams[2])
    np.testing.assert_array_equal(m.aa, (grams[0].aa + grams[1].aa) + grams[2].aa)
    np.testing.assert_array_equal(m.az, (grams[0].az + grams[1].az) + grams[2].az)
    one = K.Gram(4, 2, bias=True)
    one.update(np.concatenate(a), np.concatenate(z))
    assert m.rows == one.rows == 21 and m.bias
    # Gram's products are float32 (summed in float64): one pass and the merge agree to float32 rounding.
    np.testing.assert_allclose(m.aa, one.aa, rtol=1e-5)
    np.testing.assert_allclose(m.mean(), one.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="different features"):
        m.merge(K.Gram(3))


def _model() -> ir.Model:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x) => (float[N, 3] y) { y = Relu(x) }"""
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def test_shards_of_a_folder_cover_every_sample_once_in_order(tmp_path):
    sizes = [5, 70, 1, 130, 9]  # files across, inside and at shard boundaries
    start = 0
    for k, n in enumerate(sizes):
        np.savez(tmp_path / f"part{k:02d}.npz", x=np.arange(start, start + n, dtype=np.float32)[:, None].repeat(3, 1))
        start += n
    model = _model()
    specs = calibration_data.input_specs(model)
    for limit in (None, 150, 64):
        source = calibration_data.open_source(str(tmp_path), model, limit)
        shards = list(calibration_data.open_source(str(tmp_path), model, limit).shards())
        total = limit or sum(sizes)
        assert [s.index for s in shards] == list(range(len(shards)))
        assert all(s.count == calibration_data.SHARD_SAMPLES for s in shards[:-1])
        assert sum(s.count for s in shards) == total and shards[0].start == 0
        assert all(b.start == a.start + a.count for a, b in zip(shards, shards[1:]))
        values = [float(f["x"][0, 0]) for s in shards for f in s.samples(specs)]
        assert values == list(range(total))
        assert [float(f["x"][0, 0]) for f in source] == values  # the single stream reads the same
    assert shards[0].describe() == f"shard 0 (samples 0-63: {tmp_path / 'part00.npz'}, {tmp_path / 'part01.npz'})"


def test_shards_of_an_iterable_are_its_feeds_in_order():
    model = _model()
    feeds = [{"x": np.full((1, 3), k, np.float32)} for k in range(130)]
    shards = list(calibration_data.open_source(iter(feeds), model).shards())
    assert [(s.start, s.count, s.kind) for s in shards] == [(0, 64, "feeds"), (64, 64, "feeds"), (128, 2, "feeds")]
    assert [float(f["x"][0, 0]) for s in shards for f in s.samples([])] == list(range(130))
    assert shards[2].describe() == "shard 2 (samples 128-129, feed dicts)"


def test_a_shard_reader_checks_the_values_it_reads(tmp_path):
    model = _model()
    np.savez(tmp_path / "a.npz", x=np.ones((4, 3), np.float32))
    shard = next(calibration_data.open_source(str(tmp_path), model).shards())
    bad = np.ones((4, 3), np.float32)
    bad[2, 1] = np.nan
    np.savez(tmp_path / "a.npz", x=bad)  # changed after the check: the worker's reader still refuses it
    with pytest.raises(calibration_data.CalibrationError, match="a.npz: input 'x' has NaN or infinite values"):
        list(shard.samples(calibration_data.input_specs(model)))
