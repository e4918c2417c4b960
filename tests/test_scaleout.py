"""Sharded calibration (`--workers N`, `--ray ADDRESS|auto`, onnxopt.scaleout): the same statistics and
the same output model bytes as one process, faults retried without losing or double-counting a
shard, one line for a shard that always fails and for a missing Ray, Ctrl-C leaving nothing behind,
and `onnxopt bench --ray auto --each-node` on a local one-node cluster."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import onnxopt
from onnxopt import cli, load, scaleout, verify
from onnxopt.bench import zoo
from onnxopt.kernels import calibration
from onnxopt.passes.int8 import calibration_data, statistics

SAMPLES = 512  # 8 shards of calibration_data.SHARD_SAMPLES


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The trained digits CNN and its calibration set as a folder of 64 .npz files of 8 samples."""
    x = zoo.digits_data()[0][:SAMPLES]
    folder = tmp_path_factory.mktemp("digits_calib")
    for k in range(0, SAMPLES, 8):
        np.savez(folder / f"part{k // 8:03d}.npz", input=x[k:k + 8])
    return zoo.build("digits_cnn"), folder


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """MiniLM-L6 (real weights) and 512 token sequences of 8 tokens in a folder of .npz files, and the
    calibration statistics of one process (the pass on its own: one session, no runner)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("minilm_calib")
    for k in range(0, SAMPLES, 32):
        ids = rng.integers(1000, 30000, size=(32, 8)).astype(np.int64)
        np.savez(folder / f"part{k // 32:02d}.npz", input_ids=ids, attention_mask=np.ones_like(ids),
                 token_type_ids=np.zeros_like(ids))
    path = zoo.build("minilm")
    return path, folder, _statistics(path, folder, None)


def _statistics(path, folder, runner) -> statistics.Statistics:
    """int8's calibration statistics of every MatMul input (channel sums of every other one) through `runner`."""
    model = load.load(path)
    acts = []
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None and node.inputs[0] not in acts:
            acts.append(node.inputs[0])
    source = calibration_data.open_source(str(folder), model)
    plan = calibration_data.split_plan(source.count)
    options = {"make_session": verify.session, "shard_runner": runner}
    return statistics.calibrate(options, model, acts, {v.name: -1 for v in acts[::2]}, source, plan, top1=False)


def _assert_same(a: statistics.Statistics, b: statistics.Statistics) -> None:
    assert (a.calibration, a.held) == (b.calibration, b.held) == (410, 102)
    assert a.hists.keys() == b.hists.keys() and a.sums.keys() == b.sums.keys()
    for name, h in a.hists.items():
        g = b.hists[name]
        np.testing.assert_array_equal(h.counts, g.counts)
        assert (h.edge, h.zeros, h.min, h.max, h.min_count, h.max_count) == (
            g.edge, g.zeros, g.min, g.max, g.min_count, g.max_count)
    for name in a.hists:  # and so the thresholds
        assert calibration.activation_range(a.hists[name], "entropy", unsigned=True) == \
            calibration.activation_range(b.hists[name], "entropy", unsigned=True)
    for name, s in a.sums.items():
        assert s.count == b.sums[name].count
        np.testing.assert_array_equal(s.sum, b.sums[name].sum)  # float sums: the same bits
    for (fa, ra), (fb, rb) in zip(a.fit + a.validation, b.fit + b.validation, strict=True):
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k])


def _int8(path, folder, **kw) -> bytes:
    result = onnxopt.compile(str(path), int8=True, calibration_data=str(folder), verify_outputs=False, **kw)
    return result.model.SerializeToString()


# ---- local worker processes ------------------------------------------------------------------------

def test_minilm_statistics_over_worker_processes_equal_one_process(minilm):
    path, folder, one = minilm
    _assert_same(one, _statistics(path, folder, scaleout.Processes(workers=2, threads=1)))


@pytest.fixture(scope="module")
def digits_clean(digits):
    """The int8 model of one process."""
    return _int8(*digits)


def test_workers_and_a_killed_worker_give_the_same_model(digits, digits_clean, monkeypatch):
    monkeypatch.setenv(scaleout.KILL_ENV, "3")  # shard 3's worker exits once: retried on a new worker
    assert _int8(*digits, workers=2, threads=1) == digits_clean


def test_pruning_statistics_over_workers_and_a_killed_worker_equal_one_process(digits, monkeypatch):
    """Pruning's dense Gram statistics go through the same shards: the pruned model (unit order,
    allocation and refits all follow from them) is the same bytes."""
    path, folder = digits

    def pruned(**kw) -> bytes:
        return onnxopt.compile(str(path), prune=0.3, prune_round=4, calibration_data=str(folder),
                               verify_outputs=False, **kw).model.SerializeToString()

    clean = pruned()
    monkeypatch.setenv(scaleout.KILL_ENV, "2")
    assert pruned(workers=2, threads=1) == clean
    monkeypatch.setenv(scaleout.KILL_ENV, "2:always")  # the statistics did run in the workers
    monkeypatch.setattr(scaleout, "RETRIES", 0)
    with pytest.raises(onnxopt.CompileError,
                       match=r"^calibration shard 2 \(samples 128-191: .*\) failed on every try \(1\)"):
        pruned(workers=2, threads=1)


def test_a_shard_failing_every_try_is_one_line_naming_its_files(digits, tmp_path, monkeypatch, capsys):
    path, folder = digits
    out = tmp_path / "o.onnx"
    monkeypatch.setenv(scaleout.KILL_ENV, "3:always")
    code = cli.main([str(path), "--int8", "--calibration-data", str(folder), "--workers", "2", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    files = ", ".join(str(folder / f"part{k:03d}.npz") for k in range(24, 32))
    assert code == 1 and err == (f"onnxopt: error: calibration shard 3 (samples 192-255: {files}) failed on every "
                                 f"try (3): worker process exited with code 17")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_scaleout_options_are_one_line(digits, tmp_path, capsys, monkeypatch):
    path, folder = digits
    base = [str(path), "--int8", "--calibration-data", str(folder), "-o", str(tmp_path / "o.onnx")]
    assert cli.main(base + ["--workers", "0"]) == 1
    assert capsys.readouterr().err.strip() == "onnxopt: error: --workers must be a whole number >= 1 (got 0)"
    assert cli.main(base + ["--threads", "-2"]) == 1
    assert capsys.readouterr().err.strip() == "onnxopt: error: --threads must be a whole number >= 1 (got -2)"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert cli.main(base + ["--ray", "auto"]) == 1
    assert capsys.readouterr().err.strip() == ('onnxopt: error: --ray needs Ray, which is not installed: '
                                               'pip install "onnxopt[ray]"')
    assert cli.main(["bench", str(path), "--ray", "auto", "--each-node"]) == 1
    assert capsys.readouterr().err.strip() == ('onnxopt bench: error: --ray needs Ray, which is not installed: '
                                               'pip install "onnxopt[ray]"')
    assert list(tmp_path.iterdir()) == []


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_interrupt_stops_the_workers_and_writes_nothing(minilm, tmp_path):
    """Ctrl-C mid-calibration (SIGTERM takes the same path: cli.Terminated is a KeyboardInterrupt)."""
    import psutil

    path, folder, _ = minilm
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnxopt", str(path), "--int8", "--calibration-data", str(folder),
                             "--workers", "2", "--threads", "1", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_descendants(proc.pid)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        workers = _descendants(proc.pid)
        assert len(workers) >= 2, "the calibration workers never started"
        time.sleep(1.0)  # mid-calibration
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("onnxopt: error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    time.sleep(0.5)
    assert [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []


# ---- Ray ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def test_minilm_statistics_over_two_ray_workers_equal_one_process(ray_cluster, minilm):
    path, folder, one = minilm
    runner = scaleout.RayTasks("auto", None, threads=1)
    assert runner.workers == 2 and not runner.started  # the cluster of the fixture, 2 CPUs
    _assert_same(one, _statistics(path, folder, runner))


def test_ray_gives_the_same_model_and_survives_a_killed_worker(ray_cluster, digits, digits_clean, monkeypatch):
    monkeypatch.setenv(scaleout.KILL_ENV, "3")  # Ray retries the task of the worker that died
    assert _int8(*digits, ray="auto") == digits_clean
    monkeypatch.setenv(scaleout.KILL_ENV, "5:always")
    with pytest.raises(onnxopt.CompileError, match=r"^calibration shard 5 \(samples 320-383: .*part040.npz, .*"
                                                    r"part047.npz\) failed on every try \(3\): "):
        _int8(*digits, ray="auto")


def test_bench_each_node_writes_one_report_per_node_and_compare_reads_them(ray_cluster, digits, tmp_path, capsys):
    path, _ = digits
    out = tmp_path / "fleet.json"
    assert cli.main(["bench", str(path), "--ray", "auto", "--each-node", "--warmup", "1", "--iterations", "6",
                     "--rounds", "2", "-o", str(out), "-q"]) == 0
    reports = sorted(tmp_path.glob("fleet.node*.json"))
    from onnxopt.bench import fingerprint, schema

    assert len(reports) == len([n for n in ray_cluster.nodes() if n["Alive"]]) == 1
    rep = schema.load(reports[0])
    dev = fingerprint.device()
    assert reports[0].name == f"fleet.node0-{dev['id']}.json" and rep["label"] == dev["name"]
    assert [r["status"] for r in rep["results"]] == ["ok"]
    assert cli.main(["compare", *map(str, reports)]) == 0
    text = capsys.readouterr().out
    assert f"| {dev['name']} |" in text and "| digits_cnn" in text
    assert cli.main(["bench", str(path), "--each-node"]) == 1
    assert capsys.readouterr().err.strip() == "onnxopt bench: error: --each-node needs --ray ADDRESS|auto"
