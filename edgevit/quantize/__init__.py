"""Post-training quantization of exported ONNX models: INT8 (QDQ, calibrated) and FP16."""
