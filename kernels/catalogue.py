"""Which fused kernels each target has, with their contracts and numpy references.

Targets: "cpu" and "cuda" are onnxruntime execution providers and have the com.microsoft contrib
kernels below; "tensorrt" and "generic" take standard ONNX ops only, so -O3 for them adds no
contrib op. Each entry names a numpy reference implementation ("module:function" inside
onnxopt.kernels), used as the test oracle for what onnxopt emits and checked against onnxruntime's
own kernel in the tests.

This module is data; it imports nothing but the standard library and, lazily, the references.
"""

from __future__ import annotations

import dataclasses
import importlib

# Every compile target, in the order the CLI lists them.
TARGETS = ("cpu", "cuda", "tensorrt", "generic")
ORT_TARGETS = frozenset({"cpu", "cuda"})
STANDARD_ONLY_TARGETS = frozenset({"tensorrt", "generic"})
MS = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class Kernel:
    op: str
    domain: str
    # target -> element types the kernel runs in (numpy dtype names)
    dtypes: dict
    contract: str
    reference: str  # "module:function" in onnxopt.kernels
    # target -> why onnxopt does not emit the kernel there although the target has it: measured
    # slower than what the target runs for the unfused form (bench/experiments/norm_kernels.py re-measures).
    avoid: dict = dataclasses.field(default_factory=dict)

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(self.dtypes)

    @property
    def emit_targets(self) -> frozenset[str]:
        """The targets onnxopt emits this kernel for: those that have it and run it faster."""
        return self.targets - frozenset(self.avoid)


_F32 = ("float32",)
_F32_F16 = ("float32", "float16")


def _ort(cpu=_F32, cuda=_F32_F16) -> dict:
    return {"cpu": cpu, "cuda": cuda}


# onnxruntime's CPU SkipLayerNormalization is a scalar per-row loop (a division per element);
# its LayerNormalization kernel is vectorized. Measured with onnxruntime 1.32 on a 2-core AMD EPYC
# (Zen 4, AVX-512), kernel times from the profiler, float32 [1, 128, 768]: 508 us vs 83 us for Add +
# LayerNormalization at 1 thread, 262 vs 120 at 2; ViT-base end to end 0.97x of the original with
# it and 0.88x without. onnxruntime builds LayerNormalization itself from the decomposed form at
# session creation, so on the CPU target the norm is best left to it.
_SLOW_CPU_NORM = {"cpu": "onnxruntime's CPU kernel is 2-6x slower than Add + LayerNormalization "
                         "(python -m onnxopt.bench.experiments.norm_kernels)"}


CATALOGUE: dict[tuple[str, str], Kernel] = {
    (k.domain, k.op): k
    for k in [
        Kernel("SkipLayerNormalization", MS, _ort(),
               "(input, skip, gamma, beta?, bias?) -> (output, mean?, inv_std_var?, input_skip_bias_sum?); "
               "attr epsilon; normalizes input + skip + bias over the last axis",
               "norms:skip_layer_normalization", avoid=_SLOW_CPU_NORM),
        Kernel("SkipSimplifiedLayerNormalization", MS, _ort(),
               "(input, skip, gamma, bias?) -> (output, mean?, inv_std_var?, input_skip_bias_sum?); "
               "attr epsilon; RMSNorm of input + skip + bias over the last axis",
               "norms:skip_simplified_layer_normalization", avoid=_SLOW_CPU_NORM),
        Kernel("SimplifiedLayerNormalization", "", _ort(),
               "(X, scale) -> (Y, inv_std_var?); attrs axis=-1, epsilon; RMSNorm (onnxruntime registers it "
               "in the ai.onnx domain as a contrib op)",
               "norms:simplified_layer_normalization"),
        Kernel("Gelu", MS, _ort(), "(X) -> Y; exact erf GELU", "activations:gelu"),
        Kernel("BiasGelu", MS, _ort(), "(A, B) -> C; C = Gelu(A + B), B 1-D over the last axis",
               "activations:bias_gelu"),
        Kernel("FastGelu", MS, _ort(), "(X, bias?) -> Y; tanh-approximated GELU of X + bias",
               "activations:fast_gelu"),
        Kernel("QuickGelu", MS, _ort(), "(X) -> Y; attr alpha (default 1.702); Y = X * sigmoid(alpha * X)",
               "activations:quick_gelu"),
        Kernel("FusedMatMul", MS, _ort(),
               "(A, B) -> Y; attrs alpha, transA, transB, transBatchA, transBatchB; Y = alpha * A' @ B'",
               "attention:fused_matmul"),
        Kernel("Attention", MS, _ort(),
               "(input, weights, bias?, mask_index?, past?, attention_bias?) -> (output, present?); "
               "attrs num_heads, scale, unidirectional, qkv_hidden_sizes, mask_filter_value; packed QKV "
               "projection + scaled dot-product attention",
               "attention:attention"),
        Kernel("MultiHeadAttention", MS, _ort(),
               "(query, key?, value?, bias?, key_padding_mask?, attention_bias?, past_key?, past_value?) -> "
               "(output, present_key?, present_value?); attrs num_heads, scale, unidirectional, "
               "mask_filter_value; projected Q/K/V in, attention out",
               "attention:multi_head_attention"),
        # Integer kernels: the dtypes are those of the quantized activation (input A / input).
        # Listed for the CPU EP only, the one onnxopt lowers QDQ to them for (and measures them on);
        # for the GPU targets the QDQ form stays, for their own fusions.
        Kernel("MatMulIntegerToFloat", MS, {"cpu": ("uint8", "int8")},
               "(A, B, a_scale, b_scale, a_zero_point?, b_zero_point?, bias?) -> Y float32; "
               "Y = (A - a_zp) @ (B - b_zp) * a_scale * b_scale + bias, the products summed in int32, "
               "b_scale / b_zero_point scalar or per column [N]; (A, B) u8 x s8, u8 x u8 or s8 x s8",
               "quantize:matmul_integer_to_float"),
        Kernel("QAttention", MS, {"cpu": ("uint8",)},
               "(input u8, weight, bias, input_scale, weight_scale, mask_index?, input_zero_point?, "
               "weight_zero_point?, past?) -> (output, present?); attrs num_heads, scale, unidirectional, "
               "mask_filter_value; Attention whose packed projection is MatMulIntegerToFloat's",
               "attention:qattention"),
    ]
}


def kernel(op: str, domain: str = MS) -> Kernel | None:
    return CATALOGUE.get((domain, op))


def has_kernel(target: str, op: str, domain: str = MS, dtype: str = "float32") -> bool:
    """Whether `target` runs the fused kernel `domain.op` in `dtype`."""
    k = kernel(op, domain)
    return k is not None and dtype in k.dtypes.get(target, ())


def reference(op: str, domain: str = MS):
    """The numpy reference implementation of a catalogued kernel."""
    k = kernel(op, domain)
    if k is None:
        raise KeyError(f"{domain}.{op} is not in the kernel catalogue")
    module, _, function = k.reference.partition(":")
    return getattr(importlib.import_module(f"onnxopt.kernels.{module}"), function)
