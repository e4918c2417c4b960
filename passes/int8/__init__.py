"""int8 post-training quantization (the `quantize_int8` pass, `--int8`), as separate steps:

- `calibration_data.py`: the calibration source (.npz, folders, feed dicts), validated and streamed, and
  its deterministic calibration / validation split;
- `layers.py`: the layers and activations int8 works on, and the initializers the pass owns;
- `quantize.py`: the pass: candidates, calibration (streamed histograms), the Q/DQ insertion and the
  description for the report;
- `lower.py`: the `lower_int8` pass (cpu target): the QDQ MatMuls lowered to onnxruntime's integer
  kernels with their bias (MatMulIntegerToFloat), and a quantized packed projection with its
  MultiHeadAttention to QAttention;
- `qdq.py`: the one helper that writes a QuantizeLinear / DequantizeLinear pair or a constant's
  DequantizeLinear;
- `control.py`: the fidelity control (range choice and layers back to float, decided on the validation
  part, with the margin rules of onnxopt.kernels.fidelity).

Importing the package registers the pass.
"""

from onnxopt.passes.int8 import lower, quantize  # noqa: F401
