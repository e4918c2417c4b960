"""Which ops each target runs in float16, and which ops stay float32 for precision (data).

`runs_fp16(target, op, domain)` answers whether a node may be given float16 tensors on `target`
without the runtime quietly computing it in float32 anyway.

cpu (onnxruntime CPU execution provider, onnxruntime 1.32, x86-64)
    Derived empirically by `python -m onnxopt.bench.experiments.fp16_bench --probe`: for every ai.onnx op at
    opset 17 whose type constraint admits float16 (plus the com.microsoft fused kernels), a
    one-node model was built with float16 tensors, an onnxruntime CPU session created with graph
    optimizations disabled, and the session's graph written out. onnxruntime never refuses a
    float16 node: when the CPU EP has no float16 kernel its InsertCastTransformer wraps the node in
    Cast(float16->float32) ... Cast(float32->float16) and runs it in float32. So an op counts as
    having a float16 kernel only when the written graph holds no Cast it did not have. On x86 the
    arithmetic kernels (MatMul, Gemm, Conv, Add, Mul, Relu, Softmax, Gelu, Attention, ...) all get
    Casts; what runs natively is data movement, comparisons of the exact kind, and the
    normalizations below.
cuda (onnxruntime CUDA execution provider)
    Not probed (no GPU here): the standard ops below are the ones onnxruntime's CUDA EP registers
    for MLFloat16, and the fused kernels come from `catalogue.CATALOGUE` (dtypes["cuda"]).
tensorrt, generic
    TensorRT builds float16 engines for the same standard set; for "generic" (any runtime) the
    ONNX type constraints of these ops admit float16. No com.microsoft ops either way.

Precision islands (`PRECISION_ISLANDS`) stay float32 on every target: exponentials, powers, logs,
softmax and sum/mean reductions lose range or accumulate error in float16 (a sum of 384 values of
~200 already exceeds 65504). LayerNormalization is not an island when its stash_type is 1 (the
default): the spec computes its mean and variance in float32 whatever the input type.
"""

from __future__ import annotations

import numpy as np

from onnxopt.kernels import catalogue

MS = "com.microsoft"

# Empirical (see module docstring): ops whose onnxruntime 1.32 CPU kernel takes float16 as is.
CPU_FP16_OPS: frozenset[tuple[str, str]] = frozenset(
    [("", op) for op in (
        "Cast", "Clip", "Compress", "Concat", "Expand", "Flatten", "Gather", "GatherElements",
        "GatherND", "Identity", "IsNaN", "LayerNormalization", "Max", "Min", "Mod", "Reshape",
        "ReverseSequence", "Round", "ScatterElements", "ScatterND", "Shape", "Shrink", "Sign",
        "SimplifiedLayerNormalization", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze",
    )]
    + [(MS, op) for op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding")]
)

# Empirical, the other way round: these got Casts from onnxruntime's CPU EP (listed so that a test
# can check the two sets against a fresh probe; not used for decisions).
CPU_FP32_ONLY_OPS: frozenset[tuple[str, str]] = frozenset(
    [("", op) for op in (
        "Abs", "Add", "AveragePool", "BatchNormalization", "Ceil", "Conv", "ConvTranspose", "Cos",
        "CumSum", "DepthToSpace", "Div", "Einsum", "Elu", "Equal", "Erf", "Exp", "Floor", "Gemm",
        "GlobalAveragePool", "GlobalMaxPool", "Greater", "HardSigmoid", "HardSwish", "InstanceNormalization",
        "LeakyRelu", "Less", "Log", "LogSoftmax", "MatMul", "MaxPool", "Mean", "Mul", "Neg", "PRelu", "Pad",
        "Pow", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu",
        "Selu", "Sigmoid", "Sin", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Sqrt", "Sub", "Sum",
        "Tanh", "Tile", "TopK", "Trilu", "Where",
    )]
    + [(MS, op) for op in ("Attention", "BiasGelu", "FastGelu", "FusedMatMul", "Gelu", "MultiHeadAttention",
                           "QuickGelu")]
)

# Standard ops with float16 kernels in onnxruntime's CUDA EP (and TensorRT / the ONNX spec).
_GPU_STANDARD_FP16 = frozenset(
    [("", op) for op in (
        "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil",
        "Clip", "Concat", "Conv", "ConvTranspose", "Cos", "CumSum", "DepthToSpace", "Div", "Dropout",
        "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements",
        "GatherND", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
        "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "IsInf", "IsNaN",
        "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max",
        "MaxPool", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "PRelu", "Pad", "Pow", "Reciprocal",
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "Round", "ScatterElements",
        "ScatterND", "Selu", "Shape", "Sigmoid", "Sign", "SimplifiedLayerNormalization", "Sin", "Size",
        "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum",
        "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where",
    )]
)

_CUDA_CONTRIB_FP16 = frozenset(
    (k.domain, k.op) for k in catalogue.CATALOGUE.values() if "float16" in k.dtypes.get("cuda", ())
)

FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def to_fp16_array(arr: np.ndarray) -> np.ndarray:
    """float32 -> float16 with finite values clamped to +-65504 (inf and NaN are kept)."""
    arr = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    clamped = np.where(finite, np.clip(arr, -FP16_MAX, FP16_MAX), arr)
    return clamped.astype(np.float16)


FP16_OPS: dict[str, frozenset[tuple[str, str]]] = {
    "cpu": CPU_FP16_OPS,
    "cuda": _GPU_STANDARD_FP16 | _CUDA_CONTRIB_FP16,
    "tensorrt": _GPU_STANDARD_FP16,
    "generic": _GPU_STANDARD_FP16,
}

# float32 on every target, whatever kernels exist (see the module docstring).
PRECISION_ISLANDS: frozenset[str] = frozenset({
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "CumSum",
    "InstanceNormalization", "MeanVarianceNormalization", "LpNormalization", "GroupNormalization",
    "Range", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
})

# Inputs that keep their own float type whatever the node runs in (index sets by op).
FIXED_TYPE_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),  # roi, scales: onnxruntime kernels take them as float32
    "Upsample": frozenset({1}),  # scales
    "Dropout": frozenset({1}),  # ratio
}


def runs_fp16(target: str, op: str, domain: str = "") -> bool:
    """Whether `target` has a float16 kernel for `domain.op` (domain "" is ai.onnx)."""
    domain = "" if domain == "ai.onnx" else domain
    return (domain, op) in FP16_OPS.get(target, frozenset())


def is_precision_island(op: str, domain: str = "") -> bool:
    domain = "" if domain == "ai.onnx" else domain
    return domain == "" and op in PRECISION_ISLANDS
