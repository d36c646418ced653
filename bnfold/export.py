"""Export a PyTorch model to ONNX with every BatchNorm kept as a BatchNormalization node.

torch.onnx's default (dynamo) export runs an optimiser that folds BatchNorm into the
preceding Conv/Gemm, and the TorchScript exporter does the same in its EVAL mode constant
folding; either way there is nothing left for bnfold to fold or verify. We use the TorchScript
exporter (`dynamo=False`) with `training=TrainingMode.PRESERVE` on an eval-mode copy: PRESERVE
skips the eval-only BN fusion, the eval-mode model makes every BN an inference node
(training_mode=0, one output), and constant folding still turns `Transpose(W)` of a Linear
into a plain MatMul weight. (dynamo with optimize=False keeps BN too, but feeds bias-less Convs
a zero bias computed at run time, which blocks folding; it is also ~100× slower to export.)

The result is checked, not trusted: #BatchNormalization nodes must equal #BN modules, each in
inference mode, and ONNX Runtime (graph optimisation off, so ORT does not fold BN itself) must
match torch on seeded random inputs.

    >>> result = export_onnx(model, (1, 3, 32, 32), "model.onnx")
    >>> result.bn_modules == result.bn_nodes, result.max_abs_error
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError

# Scale-relative parity bound torch vs ORT: float32 kernels differ in summation order only.
PARITY_RTOL = 1e-4


@dataclass
class ExportResult:
    path: str
    bn_modules: int
    bn_nodes: int
    max_abs_error: float  # torch vs ONNX Runtime, worst over the checked inputs and outputs
    max_rel_error: float  # max_abs_error / max|torch output|
    opset: int
    input_name: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    output_names: list[str]


def count_bn_modules(model) -> int:
    from torch.nn.modules.batchnorm import _BatchNorm

    return sum(1 for m in model.modules() if isinstance(m, _BatchNorm))


def export_onnx(
    model,
    input_shape: tuple[int, ...],
    path: str | os.PathLike,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    input_name: str = "input",
    seed: int = 0,
) -> ExportResult:
    """Export `model` (not modified: an eval-mode copy is exported) to `path`, written atomically."""
    from bnfold.zoo import require_torch

    torch = require_torch()
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d < 1 for d in input_shape):
        raise BnfoldError(f"input shape {input_shape} is empty or has a zero dim: e.g. 1x3x224x224")
    if opset < 9:
        raise BnfoldError(f"opset {opset} is too old: use --opset 9 or newer (17 is the default)")
    model = copy.deepcopy(model).eval()
    _check_running_stats(model)
    bn_modules = count_bn_modules(model)
    example = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
    proto = _torchscript_export(torch, model, example, opset, dynamic_batch, input_name)
    _materialise_identity_constants(proto)
    bn_nodes = _check_bn_nodes(proto, bn_modules)
    max_abs, max_rel = _parity(torch, model, proto, input_shape, dynamic_batch, input_name, seed)

    from bnfold.io import save_model

    save_model(proto, path)
    return ExportResult(
        path=os.fspath(path),
        bn_modules=bn_modules,
        bn_nodes=bn_nodes,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        opset=opset,
        input_name=input_name,
        input_shape=input_shape,
        dynamic_batch=dynamic_batch,
        output_names=[o.name for o in proto.graph.output],
    )


def _check_running_stats(model) -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (
            module.running_mean is None or module.running_var is None
        ):
            raise BnfoldError(
                f"BatchNorm {name!r} has no running statistics (track_running_stats=False), so it "
                "normalises with batch statistics even in eval mode: it cannot be exported as an "
                "inference BatchNormalization; retrain it with track_running_stats=True"
            )


def _torchscript_export(torch, model, example, opset, dynamic_batch, input_name) -> onnx.ModelProto:
    buffer = io.BytesIO()
    dynamic_axes = {input_name: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated in favour of dynamo, which folds BN away.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=True,
                opset_version=opset,
                input_names=[input_name],
                dynamic_axes=dynamic_axes,
            )
    except RuntimeError as exc:
        first_line = (str(exc).strip().splitlines() or ["RuntimeError"])[0]
        raise BnfoldError(
            f"torch could not run or export the model with input shape {tuple(example.shape)} "
            f"({first_line[:200]}): check --input-shape and --opset"
        ) from None
    proto = onnx.load_model_from_string(buffer.getvalue())
    if dynamic_batch:
        # dynamic_axes names the input's batch dim; name the outputs' too, so runtimes agree.
        for output in proto.graph.output:
            dims = output.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                dims[0].dim_param = "batch"
    return proto


def _materialise_identity_constants(model: onnx.ModelProto) -> None:
    """Turn `Identity(initializer)` back into an initializer of its own.

    The TorchScript exporter deduplicates equal initializers and re-creates the duplicates
    with Identity nodes: an untrained BN's running_mean (zeros) equals its bias, so its
    statistics would become run-time values that no fold rule may treat as constants.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in initializers:
            array = numpy_helper.to_array(initializers[node.input[0]])
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


def _check_bn_nodes(model: onnx.ModelProto, bn_modules: int) -> int:
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if len(bn) != bn_modules:
        raise BnfoldError(
            f"the export kept {len(bn)} BatchNormalization nodes for {bn_modules} BatchNorm modules "
            "(torch fused some away): export with a torch version whose TorchScript exporter "
            "is available (torch 2.3–2.13 tested)"
        )
    for node in bn:
        training = [a.i for a in node.attribute if a.name == "training_mode"]
        if (training and training[0] != 0) or len(node.output) != 1:
            raise BnfoldError(
                f"BatchNormalization {node.name!r} was exported in training mode: call "
                "model.eval() before exporting (bnfold exports an eval copy; this is a bug if seen)"
            )
    return len(bn)


def _parity(torch, model, proto, input_shape, dynamic_batch, input_name, seed):
    """Worst torch-vs-ORT error over two seeded inputs (and a second batch size if dynamic)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    shapes = [input_shape, input_shape]
    if dynamic_batch:
        shapes.append((input_shape[0] + 2,) + input_shape[1:])
    max_abs, scale = 0.0, 0.0
    for i, shape in enumerate(shapes):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1 + i))
        with torch.no_grad():
            expected = model(x)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(None, {input_name: x.numpy()})
        for e, g in zip(expected, got):
            e = e.detach().double().numpy()
            if e.shape != g.shape:
                raise BnfoldError(
                    f"ONNX output shape {g.shape} differs from torch {e.shape} at input {shape}: "
                    "export without --dynamic-batch, the model is not batch-independent"
                )
            max_abs = max(max_abs, float(np.max(np.abs(e - g.astype(np.float64)), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(e), initial=0.0)))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    if not np.isfinite(max_rel) or max_rel > PARITY_RTOL:
        raise BnfoldError(
            f"the exported ONNX model differs from torch (max abs error {max_abs:.3g}, "
            f"{max_rel:.3g} of the output scale): the model may be input-dependent in Python "
            "(tracing records one path); export a traceable model"
        )
    return max_abs, max_rel
