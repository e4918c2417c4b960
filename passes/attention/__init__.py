"""Attention fusion in two stages, as two passes (onnxruntime targets, -O3):

1. `attention` (core.py): the attention core found from each Softmax (scores, scale, mask, context,
   the head split and merge proved through symbolic shapes) becomes com.microsoft.MultiHeadAttention
   over the projected query, key and value;
2. `attention_qkv` (packed.py): a MultiHeadAttention whose query, key and value are projections of
   one input becomes com.microsoft.Attention with the packed [Wq|Wk|Wv] projection
   (projections.py). It does not run with --int8, which then quantizes the projection MatMuls.
3. `unpack_attention` (unpack.py, with --int8 only): the inverse of 2, for a model that already
   holds com.microsoft.Attention (compiled with -O3 before, or pruned first), so that its
   projection is quantized too.

layout.py holds the layout algebra both use. Importing the package registers the three passes.
"""

from onnxopt.passes.attention import core, packed, unpack  # noqa: F401
