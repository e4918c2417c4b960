"""onnxopt.bench: model zoo, benchmark runner and peers."""
