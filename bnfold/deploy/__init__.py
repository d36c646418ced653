"""Stage 3, deployment: engines behind one protocol (ONNX Runtime CPU/CUDA, TensorRT,
OpenVINO, PyTorch), latency statistics and the side-by-side bench, TensorRT engine builds, and
float16 conversion. Each engine imports its library only when chosen.
"""
