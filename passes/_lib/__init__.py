"""Libraries the passes share; not passes (the auto-import in onnxopt.passes skips this package).

- `graph`: one of each graph primitive (op tests, constant readers, walkers, new_initializer, ...);
- `symbolic_shapes`: the symbolic shape engine (shapes proved by equal symbolic dimensions);
- `mask_analysis`: what an attention mask expression computes;
- `folding`: the graph side of folding a per-channel affine map into a Conv/Gemm/MatMul.
"""
