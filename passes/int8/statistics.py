"""int8 calibration statistics of one shard of samples, and their exact merge.

`calibrate_shard(session, shard, job)` is the work of one shard (it runs wherever the shard runner
puts it: this process, a worker process, a Ray task): the samples run through the float model,
their |x| histograms and per-channel sums, the kept (feed, float outputs) pairs and, for top1, the
top-2 margins. `Statistics.merge` combines two shards' statistics as if their samples had been
seen in one stream, `self` first: histograms (counts, ranges, saturation counts, min/max) merge
exactly whatever the order; channel sums are float, their order fixed by merging in shard index
order; kept samples are the first ones in sample order. Calibration over any number of workers
therefore gives the statistics of one process to the bit.
"""

from __future__ import annotations

import dataclasses
import time

import onnx_ir as ir

from onnxopt.kernels import calibration, fidelity
from onnxopt.passes._lib.graph import run_shards
from onnxopt.passes.int8 import calibration_data
from onnxopt.passes.int8.calibration_data import CalibrationError, InputSpec, Shard, Split
from onnxopt.passes.int8.layers import FIT_SAMPLES, VALIDATION_KEPT, _float_outputs


@dataclasses.dataclass(frozen=True)
class Job:
    """What every shard needs: the inputs to read, the outputs and activations to fetch, the
    activations whose channel means are wanted (name -> channel axis), the split, whether top1."""

    specs: tuple[InputSpec, ...]
    inputs: frozenset[str]
    out_names: tuple[str, ...]
    act_names: tuple[str, ...]  # fetched from the session (not graph inputs, not already outputs)
    acts: tuple[str, ...]  # every calibrated activation, in order
    mean_axes: dict
    plan: Split
    top1: bool


@dataclasses.dataclass
class Statistics:
    hists: dict[str, calibration.AbsHistogram]
    sums: dict[str, calibration.ChannelSums]
    fit: list  # (feed, float outputs) of the first FIT_SAMPLES calibration samples
    validation: list  # ... of the first VALIDATION_KEPT validation samples
    margins: list  # per sample (top1): float top-2 margins and near-tie flags
    ties: list
    calibration: int = 0
    held: int = 0
    inference_s: float = 0.0

    @classmethod
    def empty(cls, job: Job) -> Statistics:
        return cls({n: calibration.AbsHistogram() for n in job.acts},
                   {n: calibration.ChannelSums(axis) for n, axis in job.mean_axes.items()}, [], [], [], [])

    @property
    def samples(self) -> int:
        return self.calibration + self.held

    def merge(self, other: Statistics) -> Statistics:
        return Statistics({n: h.merge(other.hists[n]) for n, h in self.hists.items()},
                          {n: s.merge(other.sums[n]) for n, s in self.sums.items()},
                          (self.fit + other.fit)[:FIT_SAMPLES], (self.validation + other.validation)[:VALIDATION_KEPT],
                          self.margins + other.margins, self.ties + other.ties,
                          self.calibration + other.calibration, self.held + other.held,
                          self.inference_s + other.inference_s)


def calibrate_shard(session, shard: Shard, job: Job) -> Statistics:
    """The statistics of one shard: each sample run once, `job.plan` deciding by its index in the
    whole source whether it calibrates or is held out for validation."""
    st = Statistics.empty(job)
    out_names = list(job.out_names)
    for i, feed in enumerate(shard.samples(list(job.specs))):
        k = shard.start + i
        held = job.plan.is_validation(k)
        names = out_names if held else out_names + list(job.act_names)
        t = time.perf_counter()
        outs = dict(zip(names, session.run(names, feed)))
        st.inference_s += time.perf_counter() - t
        ref = _float_outputs({n: outs[n] for n in out_names})
        if job.top1 and ref:
            m, tie = fidelity.top2_margins(ref)
            st.margins.append(m)
            st.ties.append(tie)
        if held:
            st.held += 1
            if len(st.validation) < VALIDATION_KEPT:
                st.validation.append((feed, ref))
            continue
        st.calibration += 1
        for name in job.acts:
            data = feed[name] if name in job.inputs else outs[name]
            try:
                st.hists[name].update(data)
            except ValueError:
                raise CalibrationError(f"calibration sample {k} gives NaN or infinite values at {name!r}") from None
            if name in st.sums:
                st.sums[name].update(data)
        if len(st.fit) < FIT_SAMPLES:
            st.fit.append((feed, ref))
    return st


def calibrate(options: dict, model: ir.Model, acts: list[ir.Value], mean_axes: dict[str, int], source, plan: Split,
              top1: bool, progress=None) -> Statistics:
    """The merged statistics of every shard of `source` (histograms of `acts`, channel sums of those
    in `mean_axes`), computed where `options["shard_runner"]` says (passes._lib.graph.run_shards);
    `progress(samples done)` after each shard."""
    inputs = {v.name for v in model.graph.inputs}
    out_names = [v.name for v in model.graph.outputs]
    # Activations that are graph inputs come from the feed; those that are outputs already are fetched once.
    job = Job(specs=tuple(calibration_data.input_specs(model)), inputs=frozenset(inputs), out_names=tuple(out_names),
              act_names=tuple(v.name for v in acts if v.name not in inputs and v.name not in out_names),
              acts=tuple(v.name for v in acts), mean_axes=dict(mean_axes), plan=plan, top1=top1)
    merged = [Statistics.empty(job)]

    def take(index: int, st: Statistics) -> None:
        merged[0] = st if index == 0 else merged[0].merge(st)
        if progress is not None:
            progress(merged[0].samples)

    run_shards(options, model, [v for v in acts if v.name not in inputs and not v.is_graph_output()],
               calibrate_shard, source.shards(), job, take)
    return merged[0]
