"""onnxopt.kernels: numpy reference math and the catalogue of fused kernels per target."""
