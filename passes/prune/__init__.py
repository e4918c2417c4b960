"""Structured pruning after export (the `prune` pass, `--prune F`):

- `groups.py`: dependency groups on the ONNX graph (every tensor axis that shrinks with a unit:
  Conv channels, FFN neurons, attention heads) and the slicing that removes units;
- `structured.py`: the pass (statistics, allocation across groups, reconstruction, fidelity);
- the math (Gram matrices, OBS order, ridge refits, MAC counts) is in onnxopt.kernels.pruning.

Importing the package registers the pass.
"""

from onnxopt.passes.prune import structured  # noqa: F401
