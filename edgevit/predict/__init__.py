"""Device prediction: ONNX → kernels → roofline latency and memory → deployability verdict."""
