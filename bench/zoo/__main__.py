"""`python -m onnxopt.bench.zoo NAME [--size tiny] [-o out.onnx]`."""

import pathlib

from onnxopt.bench.zoo import MODELS, build


def main(argv: list[str] | None = None) -> int:
    """`python -m onnxopt.bench.zoo NAME [--size tiny] [-o out.onnx]`: build (or reuse) a zoo model."""
    import argparse
    import shutil

    p = argparse.ArgumentParser(prog="python -m onnxopt.bench.zoo", description="Build a model-zoo export.")
    p.add_argument("name", choices=MODELS)
    p.add_argument("--size", default="tiny", choices=["tiny", "base"])
    p.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"])
    p.add_argument("--opset", type=int, default=14)
    p.add_argument("--attention", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--strip-value-info", action="store_true", help="clear graph.value_info (intermediate shapes)")
    p.add_argument("-o", "--output", help="copy the model here (default: print the cached path)")
    args = p.parse_args(argv)
    path = build(args.name, size=args.size, exporter=args.exporter, opset=args.opset, attention=args.attention,
                 strip_value_info=args.strip_value_info)
    if args.output:
        shutil.copyfile(path, args.output)
        path = pathlib.Path(args.output)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
