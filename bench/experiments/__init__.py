"""Experiments: the scripts that produce the figures in the README and bench/results
(`python -m onnxopt.bench.experiments.NAME`). They use the library in onnxopt.bench (runner,
timing, peers, zoo, ...); nothing imports them."""
