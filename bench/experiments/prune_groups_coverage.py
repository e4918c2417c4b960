"""Which pruning groups the zoo's exports have, per export form and optimization level.

`python -m onnxopt.bench.experiments.prune_groups_coverage [--models bert,gpt2,vit,...] [--levels 0,1,2,3]`

For every tiny zoo variant (bert eager/SDPA x legacy 13/14/17 and dynamo 18, gpt2, vit, the CNNs;
`zoo.variants("tiny")`), the model is compiled at each level without pruning, probed once on the
zoo's sample input, and its dependency groups found (passes/prune/groups.py, as the prune pass
does): one line per form and level with the prunable groups (and units) per kind, then the
distinct decline reasons. A coverage table, not a benchmark: nothing is timed.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np


def groups_of(proto, feeds):
    """The dependency groups of `proto`, with shapes from one run on `feeds`."""
    import onnx_ir as ir

    from onnxopt import verify
    from onnxopt.passes._lib.graph import session_of
    from onnxopt.passes.prune import groups as G

    model = ir.serde.deserialize_model(proto)
    values = [v for n in model.graph for v in n.outputs if v.name]
    sess = session_of(model, verify.session, values)
    names = [v.name for v in values]
    shapes = {n: a.shape for n, a in zip(names, sess.run(names, feeds))}
    shapes.update({k: np.shape(a) for k, a in feeds.items()})
    return G.find_groups(model.graph, lambda v: shapes.get(v.name) if v is not None else None)


def main(argv=None) -> int:
    import onnx

    import onnxopt
    from onnxopt.bench import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated zoo names (default: all tiny variants)")
    ap.add_argument("--levels", default="1,2,3")
    args = ap.parse_args(argv)
    variants = zoo.variants("tiny")
    if args.models:
        variants = [v for v in variants if v["name"] in args.models.split(",")]
    for kw in variants:
        proto = onnx.load(zoo.build(**kw))
        feeds = zoo.sample_feeds(kw["name"], proto)
        for level in (int(x) for x in args.levels.split(",")):
            compiled = onnxopt.compile(proto, opt_level=level, verify_outputs=False).model
            groups = groups_of(compiled, feeds)
            ok, units = collections.Counter(), collections.Counter()
            reasons = collections.Counter()
            for g in groups:
                if g.reason:
                    reasons[g.reason.split("'")[0].strip()] += 1
                elif g.units >= 2:
                    ok[g.kind] += 1
                    units[g.kind] += g.units
            kinds = ", ".join(f"{k} {ok[k]} ({units[k]} units)" for k in sorted(ok)) or "nothing prunable"
            print(f"{kw['name']} {kw['exporter']} op{kw['opset']} {kw['attention']} -O{level}: {kinds}")
            for r, n in sorted(reasons.items()):
                print(f"    declined x{n}: {r} ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
