"""Stage 0, ONNX files: safe load, deferred tensors, external data, the streaming writer.

Model files are untrusted: external data must stay inside the model's folder, sizes declared
in a file are checked before anything is allocated, and writes are staged then renamed, so a
failure leaves nothing half-written. Weights are not parsed unless a fold reads them
(`deferred`); untouched tensors go from input to output file to file (`stream`).
Imports numpy and onnx only.
"""
