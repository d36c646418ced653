"""Export a PyTorch model to ONNX with every BatchNorm kept as a BatchNormalization node.

torch.onnx's default (dynamo) export runs an optimiser that folds BatchNorm into the
preceding Conv/Gemm, and the TorchScript exporter does the same in its EVAL mode constant
folding; either way there is nothing left for bnfold to fold or verify. We use the TorchScript
exporter (`dynamo=False`) with `training=TrainingMode.PRESERVE` on an eval-mode copy: PRESERVE
skips the eval-only BN fusion, the eval-mode model makes every BN an inference node
(training_mode=0, one output), and constant folding still turns `Transpose(W)` of a Linear
into a plain MatMul weight. (dynamo with optimize=False keeps BN too, but feeds bias-less Convs
a zero bias computed at run time, which blocks folding; it is also ~100× slower to export.)

The copy is a plain module: DataParallel unwrapped, parametrizations made permanent
(bnfold.pytorch.zoo.prepare). Inputs are one `InputSpec` per forward argument (bnfold.pytorch.export_inputs):
several, integer, float64/float16, named after the forward signature, with symbolic dims.
Outputs (tensors, tuples, dicts, nested) get stable names: str dict keys, else output_0, …
(int keys count as indices), and are exported as one flat tuple in that order.

The result is checked, not trusted: the eval forward's batch_norm calls (counted as they
happen, so a BN called twice counts twice and an unused auxiliary head's not at all) must
equal the ONNX BatchNormalization nodes, each in inference mode, and ONNX Runtime (graph
optimisation off) must match torch on the example inputs, fresh random ones, and — when dims
are dynamic — inputs with every symbolic dim doubled. Whatever torch or ORT print meanwhile is
swallowed, so nothing reaches stdout.

    >>> result = export_onnx(model, (1, 3, 32, 32), "model.onnx")
    >>> result = export_onnx(model, [InputSpec((2, 16), "ids", "int64", {1: "length"})], "m.onnx")
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.pytorch.export_inputs import InputSpec, load_example_npz, specs_from_arrays
from bnfold.pytorch.export_run import (
    BnUsage, check_bn_usage, example_inputs, parity, resolve_inputs, run_counting,
)

# Scale-relative parity bound torch vs ORT: float32 kernels differ in summation order only.
PARITY_RTOL = 1e-4


@dataclass
class ExportResult:
    path: str
    bn_modules: int  # BatchNorm modules the eval forward calls
    bn_nodes: int
    max_abs_error: float  # torch vs ONNX Runtime, worst over the checked inputs and outputs
    max_rel_error: float  # max_abs_error / max|torch output|
    opset: int
    input_name: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    output_names: list[str]
    bn_calls: int = 0  # batch_norm calls in the eval forward (a module called twice counts 2)
    inputs: list[InputSpec] = field(default_factory=list)
    checked_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def count_bn_modules(model) -> int:
    from torch.nn.modules.batchnorm import _BatchNorm

    return sum(1 for m in model.modules() if isinstance(m, _BatchNorm))


def export_onnx(
    model,
    inputs,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    dynamic: tuple[tuple[str | None, int, str | None], ...] = (),
    output_names: list[str] | None = None,
    seed: int = 0,
) -> ExportResult:
    """Export `model` (not modified: a prepared eval-mode copy is exported) to `path`, atomically.

    `inputs`: a shape tuple (one input), a list of shapes / InputSpecs (one per forward
    argument), a dict of example arrays by name, or a .npz path. `dynamic`: extra dynamic
    dims as (input name or None for the first input, axis, symbol or None).
    """
    from bnfold.pytorch.zoo import require_torch
    from bnfold.pytorch.zoo.prepare import eval_copy, flatten_outputs

    torch = require_torch()
    if opset < 9:
        raise BnfoldError(f"opset {opset} is too old: use --opset 9 or newer (17 is the default)")
    newest = _newest_export_opset(torch)
    if newest is not None and opset > newest:
        raise BnfoldError(f"torch {torch.__version__}'s TorchScript exporter writes opsets up to "
                          f"{newest}, not {opset}: use --opset {newest} or lower")
    specs = _as_specs(inputs)
    with _quiet(torch):
        model, notes = eval_copy(model)
        specs, call = resolve_inputs(torch, model, specs, dynamic, dynamic_batch)
        examples = example_inputs(torch, model, specs, seed)
        reference, usage = run_counting(torch, model, call, examples, specs)
        notes += check_bn_usage(model, usage)
        flat = flatten_outputs(reference)
        names = _output_names(flat, output_names, [s.name for s in specs])
        proto = _torchscript_export(torch, _flat_output_call(call), examples, specs, names,
                                    opset)
        _materialise_identity_constants(proto)
        bn_nodes = _check_bn_nodes(proto, usage, notes)
        max_abs, max_rel, checked = parity(torch, call, proto, specs, examples, names, seed,
                                           _tolerance(flat), notes)

    from bnfold.onnxio.files import save_model

    save_model(proto, path)
    return ExportResult(
        path=os.fspath(path),
        bn_modules=len(usage.modules),
        bn_nodes=bn_nodes,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        opset=opset,
        input_name=specs[0].name,
        input_shape=specs[0].dims,
        dynamic_batch=dynamic_batch,
        output_names=[o.name for o in proto.graph.output],
        bn_calls=usage.calls,
        inputs=specs,
        checked_shapes=checked,
        notes=notes,
    )


def _as_specs(inputs) -> list[InputSpec]:
    if isinstance(inputs, (str, os.PathLike)):
        return load_example_npz(inputs)
    if isinstance(inputs, dict):
        return specs_from_arrays(inputs)
    if isinstance(inputs, InputSpec):
        return [inputs]
    items = list(inputs)
    if items and all(isinstance(d, (int, np.integer)) for d in items):
        items = [tuple(items)]
    specs = []
    for item in items:
        if isinstance(item, InputSpec):
            specs.append(InputSpec(item.dims, item.name, item.dtype, dict(item.symbols),
                                   item.example))
        else:
            dims = tuple(int(d) for d in item)
            specs.append(InputSpec(dims))
    if not specs:
        raise BnfoldError("no input given: pass the input shape, e.g. 1x3x224x224")
    for spec in specs:
        if not spec.dims and spec.example is None or any(d < 1 for d in spec.dims):
            raise BnfoldError(f"input shape {spec.dims} is empty or has a zero dim: "
                              "e.g. 1x3x224x224")
    return specs


@contextlib.contextmanager
def _quiet(torch):
    """Swallow what torch and ORT print (Python and C++, stdout and stderr) and their warnings.

    On failure the exporter dumps TorchScript IR to stdout; nothing of it may reach the user's
    output, which bnfold's own messages (and, on error, one stderr line) own.
    """
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                _flush_c_stdio()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library handle (Windows): nothing buffered
        pass


def _output_names(flat, given, input_names) -> list[str]:
    names = [name for name, _ in flat] if given is None else list(given)
    if not flat:
        raise BnfoldError("the model returns no tensor: return the outputs from forward")
    if len(names) != len(flat):
        raise BnfoldError(
            f"{len(names)} output names given for {len(flat)} outputs "
            f"({', '.join(n for n, _ in flat)}): give one --output-name per output"
        )
    clashes = sorted({n for n in names if names.count(n) > 1 or n in input_names})
    if clashes:
        raise BnfoldError(f"output name {clashes[0]!r} is used twice (or is an input's name): "
                          "give distinct --output-name values")
    return names


def _tolerance(flat) -> float:
    import torch

    dtypes = {t.dtype for _, t in flat}
    return 1e-2 if dtypes & {torch.float16, torch.bfloat16} else PARITY_RTOL


def _newest_export_opset(torch) -> int | None:
    """The newest opset torch.onnx's TorchScript exporter writes, where torch says."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except ImportError:  # a torch that moved it: let the exporter judge
        return None
    return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def _flat_output_call(call):
    """`call` returning its tensors as one flat tuple, in `flatten_outputs`' order.

    The tracer keeps a dict's str keys as structure but turns int keys into traced values
    ("output 1 (0) of traced region did not have observable data dependence"), so a forward
    returning `{0: logits, 1: aux}` cannot be exported as it is; flat, the exporter's outputs
    are the ones `output_names` names, in that order, whatever the nesting. A shallow copy with
    its own forward keeps the parameter names (a wrapper module would prefix them `model.`).
    """
    from bnfold.pytorch.zoo.prepare import flatten_outputs

    forward = call.forward
    flat = copy.copy(call)
    flat.forward = lambda *inputs: tuple(t for _, t in flatten_outputs(forward(*inputs)))
    return flat


def _torchscript_export(torch, call, examples, specs, output_names, opset) -> onnx.ModelProto:
    buffer = io.BytesIO()
    dynamic_axes = {s.name: dict(s.symbols) for s in specs if s.symbols} or None
    try:
        with torch.no_grad():
            torch.onnx.export(
                call,
                tuple(examples),
                buffer,
                dynamo=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=True,
                opset_version=opset,
                input_names=[s.name for s in specs],
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
    except Exception as exc:  # the exporter raises RuntimeError, OnnxExporterError, TypeError, …
        raise BnfoldError(_export_failure(exc, opset)) from None
    return onnx.load_model_from_string(buffer.getvalue())


def _export_failure(exc: BaseException, opset: int) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = (text.splitlines() or [type(exc).__name__])[0][:200]
    operator = re.search(r"operator '?([\w:.]+)'?", text)
    if operator or "UnsupportedOperator" in type(exc).__name__:
        op = operator.group(1) if operator else "?"
        added = re.search(r"added in (?:opset )?version (\d+)", text)
        if added and int(added.group(1)) > opset:
            return (f"torch's ONNX exporter supports {op} only from opset {added.group(1)} "
                    f"(asked: {opset}): use --opset {added.group(1)}")
        return (f"torch's ONNX exporter (TorchScript, opset {opset}) has no ONNX form for {op}: "
                "replace it in the model with supported operations, or register one with "
                "torch.onnx.register_custom_op_symbolic")
    return (f"torch's ONNX exporter (TorchScript, opset {opset}) failed although the model runs "
            f"in eval mode ({type(exc).__name__}: {first}): change the part of the model it "
            "names; tracing records tensor operations only")


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


def _check_bn_nodes(model: onnx.ModelProto, usage: BnUsage, notes: list[str]) -> int:
    """Every batch_norm the eval forward calls has an inference BatchNormalization node with
    its running statistics (identical calls on identical inputs may share one: the exporter
    merges common subexpressions).

    Statistics that reach the node as initializers or Constant nodes are compared with the
    forward's exactly. Statistics F.batch_norm got from tensors computed in forward (`v.exp()`)
    stay computations in the graph: their values are covered by the parity run, so a forward
    call whose statistics match no node is accepted while such nodes remain to account for it.
    """
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for node in bn:
        training = [a.i for a in node.attribute if a.name == "training_mode"]
        if (training and training[0] != 0) or len(node.output) != 1:
            raise BnfoldError(
                f"BatchNormalization {node.name!r} was exported in training mode although the "
                "eval forward uses running statistics: please report the model (bnfold exports "
                "an eval copy)"
            )
    constants = _constant_values(model.graph)
    exported, computed = [], []
    for node in bn:
        statistics = [constants.get(n) for n in node.input[3:5]]
        if len(statistics) == 2 and all(v is not None for v in statistics):
            exported.append(tuple(v.astype(np.float64) for v in statistics))
        else:
            computed.append(node)
    missing = [who for who, mean, var in usage.statistics.values()
               if not any(m.shape == mean.shape and np.array_equal(m, mean)
                          and np.array_equal(v, var) for m, v in exported)]
    unexplained = missing[len(computed):]
    if unexplained or len(bn) > usage.calls or (usage.calls and not bn):
        raise BnfoldError(
            f"the eval forward calls batch_norm {usage.calls} time(s) ({usage.describe()}) but "
            f"the ONNX export has {len(bn)} BatchNormalization node(s)"
            + (f", none with the statistics of {', '.join(unexplained[:3])}" if unexplained
               else "")
            + ": torch's exporter fused or changed them; please report the model with your "
            "torch version"
        )
    from_inputs = [n.name or n.output[0] for n in computed
                   if set(n.input[3:5]) & _input_dependent(model.graph)]
    if from_inputs:
        notes.append(
            f"{len(from_inputs)} BatchNormalization node(s) ({', '.join(from_inputs[:3])}) get "
            "statistics computed from the inputs (F.batch_norm on tensors derived from them): "
            "exported as torch runs them, but they cannot be folded; pass constant statistics "
            "(buffers) to fold them"
        )
    return len(bn)


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors by name (torch.tensor(...) built in forward is
    exported as a Constant node)."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _input_dependent(graph: onnx.GraphProto) -> set[str]:
    """Names whose value depends on a graph input (nodes are in topological order)."""
    initializers = {t.name for t in graph.initializer}
    dependent = {i.name for i in graph.input if i.name not in initializers}
    for node in graph.node:
        if dependent.intersection(node.input):
            dependent.update(node.output)
    return dependent
