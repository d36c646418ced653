"""ONNX Runtime engines: `ort-cpu` and `ort-cuda`.

Benchmark sessions use full graph optimisation (ORT_ENABLE_ALL), because that is what users
deploy. ORT then folds BatchNormalization into Conv on its own, which is exactly why we compare:
the numbers show what folding in the file still buys once the runtime has done its part.
(`bnfold verify` does the opposite and turns optimisation off, to test the fold itself.)

On CUDA the inputs stay on the device (IO binding with OrtValues on cuda) unless
`include_transfers` is set, and runs go on our own stream so CUDA events can time them.
Unverified on hardware so far: the CUDA path is written against the ORT Python API docs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np

from bnfold.deploy.engines import (
    INSTALL_HINTS, EngineOptions, Precision, Timing, first_line, run_timeout_error,
)
from bnfold.errors import BnfoldError

OPTIMISATION_NOTE = (
    "ONNX Runtime sessions use full graph optimisation (ORT_ENABLE_ALL), as deployed; ORT also "
    "folds BatchNormalization on its own, which is what this comparison measures against"
)


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def session_options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # bnfold reports failures itself, in one line
    if threads is not None:
        if threads < 1:
            raise BnfoldError("--threads must be at least 1")
        options.intra_op_num_threads = threads
    return options


def _payload(model):
    """What InferenceSession takes: a path as is (ORT reads external data), else bytes."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return model if isinstance(model, bytes) else model.SerializeToString()


def _create_session(model, options, providers, label: str):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(_payload(model), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types per failure kind
        raise BnfoldError(
            f"ONNX Runtime cannot load {label}: {first_line(exc)}; check the model with "
            f"onnx.checker or re-export it"
        ) from None


@contextlib.contextmanager
def _bounded(timeout: float | None):
    """RunOptions that ORT terminates after `timeout` seconds (None: never), as plain verify
    bounds its runs (bnfold.verification.runs); the run then fails with terminate set."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    timer = None
    if timeout:
        timer = threading.Timer(timeout, setattr, (options, "terminate", True))
        timer.daemon = True
        timer.start()
    try:
        yield options
    finally:
        if timer is not None:
            timer.cancel()


def _checked_run(session, feed: dict, label: str, timeout: float | None = None
                 ) -> list[np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    with _bounded(timeout) as options:
        try:
            return session.run(names, feed, options)
        except Exception as exc:  # bad shape or dtype: ORT's errors share no base class
            if options.terminate:
                raise run_timeout_error(label, timeout) from None
            raise BnfoldError(
                f"ONNX Runtime cannot run {label}: {first_line(exc)}; check the input shapes "
                f"(--shape name=DxD...) or pass real inputs with --inputs"
            ) from None


def graph_precision(model) -> Precision:
    """ORT computes in the types the graph declares: float16/bfloat16 weights or casts mean
    that precision (e.g. a model made by bnfold.deploy.fp16, fp32 I/O around an fp16 body)."""
    import onnx

    from bnfold.deploy.engines import lowest_precision

    if isinstance(model, (str, os.PathLike)):
        from bnfold.onnxio.files import load_model_deferred

        model, deferred, _ = load_model_deferred(model)  # types only: no weights are read
        deferred.close()
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    names = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
    counts: dict[str, int] = {}

    def visit(graph):
        for tensor in graph.initializer:
            if tensor.data_type in names:
                counts[names[tensor.data_type]] = counts.get(names[tensor.data_type], 0) + 1
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i in names:
                    counts[names[attr.i]] = counts.get(names[attr.i], 0) + 1
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return Precision(lowest_precision(counts), "the ONNX graph's own types (ORT runs them as "
                     "declared)", counts)


def _host_outputs(session, feed: dict, label: str, timeout: float | None = None) -> dict:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, _checked_run(session, feed, label, timeout)))


def _environment(threads_requested: int | None) -> dict:
    import onnxruntime as ort

    return {
        "onnxruntime": ort.__version__,
        "providers_available": ort.get_available_providers(),
        "graph_optimization": "ORT_ENABLE_ALL",
        "intra_op_num_threads": threads_requested
        if threads_requested is not None
        else f"default (ORT picks; {os.cpu_count()} logical CPUs)",
    }


class OrtCpuSession:
    def __init__(self, label: str, session, feed: dict, timeout: float | None = None):
        self.label = label
        self._session = session
        self._feed = feed
        self._timeout = timeout
        self._outputs = [o.name for o in session.get_outputs()]
        self.precision = Precision("float32", "")

    def run(self) -> None:
        self._session.run(self._outputs, self._feed)

    def outputs(self, feed: dict | None = None) -> dict:
        return _host_outputs(self._session, self._feed if feed is None else feed, self.label,
                             self._timeout)

    def close(self) -> None:
        self._session = None


class OrtCpuEngine:
    name = "ort-cpu"

    def __init__(self, options: EngineOptions):
        self.options = options
        self.notes = [OPTIMISATION_NOTE]
        if options.cuda_graphs or options.include_transfers:
            self.notes.append("--cuda-graphs/--include-transfers do nothing on ort-cpu")
        _refuse_precision_request(options)

    def open(self, label: str, model, feed: dict) -> OrtCpuSession:
        options = session_options(self.options.threads)
        session = _create_session(model, options, ["CPUExecutionProvider"], label)
        _checked_run(session, feed, label, self.options.run_timeout)
        opened = OrtCpuSession(label, session, feed, self.options.run_timeout)
        opened.precision = graph_precision(model)
        return opened

    def environment(self) -> dict:
        return _environment(self.options.threads)


def _refuse_precision_request(options: EngineOptions) -> None:
    if options.inference_precision not in (None, "f32"):
        raise BnfoldError(
            "ONNX Runtime computes in the model's own types: drop --inference-precision, or "
            "give it a float16 model (e.g. the one `bnfold build --fp16` converts)"
        )


class OrtCudaSession:
    """One model on the CUDA EP; inputs resident on the device unless include_transfers."""

    def __init__(self, label, session, feed, timer, include_transfers, output_shapes,
                 timeout: float | None = None):
        import onnxruntime as ort

        self.label = label
        self._timeout = timeout
        self._session = session
        self._feed = feed
        self._timer = timer
        self._include_transfers = include_transfers
        self._outputs = [o.name for o in session.get_outputs()]
        self._run_options = ort.RunOptions()
        self.precision = Precision("float32", "")
        self._inputs = {}  # name -> the device OrtValue bound to it
        self._binding = None
        self._keep = []  # OrtValues must outlive the binding
        if include_transfers:
            return
        self._binding = session.io_binding()
        for name, array in feed.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.asarray(array, order="C"), "cuda", 0)
            self._binding.bind_ortvalue_input(name, value)
            self._keep.append(value)
            self._inputs[name] = value
        for name in self._outputs:
            if output_shapes is not None:
                # CUDA graphs replay fixed addresses: outputs must be allocated up front.
                shape, dtype = output_shapes[name]
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0)
                self._binding.bind_ortvalue_output(name, value)
                self._keep.append(value)
            else:
                self._binding.bind_output(name, "cuda", 0)
        if timer is not None:
            # Return from Run after enqueueing, so enqueue and device time can be told apart;
            # the timer's end event is what we wait on.
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def run(self) -> Timing:
        timer = self._timer
        if timer is not None:
            timer.start()
        start = time.perf_counter()
        if self._binding is None:
            self._session.run(self._outputs, self._feed, self._run_options)
        else:
            self._session.run_with_iobinding(self._binding, self._run_options)
        enqueue_ms = (time.perf_counter() - start) * 1e3
        if timer is None:
            if self._binding is not None:
                self._binding.synchronize_outputs()
            return Timing(None, enqueue_ms)
        return Timing(timer.stop(), enqueue_ms)

    def outputs(self, feed: dict | None = None) -> dict:
        """The same session (and, with CUDA graphs, the same captured graph) on `feed`: the
        inputs are copied into the bound device buffers, the outputs back to the host."""
        feed = self._feed if feed is None else feed
        if self._binding is None:
            return _host_outputs(self._session, feed, self.label, self._timeout)
        for name, value in self._inputs.items():
            array = np.asarray(feed[name], order="C")
            if tuple(value.shape()) != array.shape:
                raise BnfoldError(
                    f"{self.label}: input {name!r} is bound as {value.shape()}, the feed has "
                    f"{list(array.shape)}: outputs are checked at the shape the session opened with"
                )
            value.update_inplace(array)
        with _bounded(self._timeout) as options:
            try:
                self._session.run_with_iobinding(self._binding, options)
            except Exception:
                if options.terminate:
                    raise run_timeout_error(self.label, self._timeout) from None
                raise
        self._binding.synchronize_outputs()
        values = self._binding.copy_outputs_to_cpu()
        return dict(zip(self._outputs, values))

    def close(self) -> None:
        self._binding = None
        self._keep = []
        self._session = None


class OrtCudaEngine:
    name = "ort-cuda"

    def __init__(self, options: EngineOptions):
        from bnfold.deploy.engines._cuda import cuda_timer

        if not cuda_provider_available():
            raise BnfoldError(
                "ONNX Runtime has no CUDAExecutionProvider here: "
                + INSTALL_HINTS["onnxruntime-gpu"]
            )
        _refuse_precision_request(options)
        if options.cuda_graphs and options.include_transfers:
            raise BnfoldError(
                "--cuda-graphs needs inputs resident on the device: drop --include-transfers"
            )
        self.options = options
        self._timer = cuda_timer()
        self.notes = [OPTIMISATION_NOTE]
        self.notes.append(
            "inputs copied host→device and outputs back on every run (--include-transfers)"
            if options.include_transfers
            else "inputs and outputs resident on the GPU (IO binding); no transfers timed"
        )
        if self._timer is None:
            self.notes.append(
                "GPU time not measured: CUDA events come from torch with CUDA "
                "(pip install torch with CUDA); host time only"
            )

    def open(self, label: str, model, feed: dict) -> OrtCudaSession:
        provider_options = {"device_id": "0"}
        if self.options.cuda_graphs:
            provider_options["enable_cuda_graph"] = "1"
        if self._timer is not None:
            provider_options["user_compute_stream"] = str(self._timer.stream_handle)
        options = session_options(self.options.threads)
        session = _create_session(
            model, options, [("CUDAExecutionProvider", provider_options), "CPUExecutionProvider"],
            label,
        )
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise BnfoldError(
                f"ONNX Runtime fell back to CPU for {label} (CUDA or cuDNN libraries did not "
                f"load): install the CUDA/cuDNN versions your onnxruntime-gpu needs"
            )
        output_shapes = None
        if self.options.cuda_graphs:
            output_shapes = self._output_shapes(label, model, feed)
        else:
            _checked_run(session, feed, label, self.options.run_timeout)
        opened = OrtCudaSession(
            label, session, feed, self._timer, self.options.include_transfers, output_shapes,
            self.options.run_timeout,
        )
        opened.precision = _cuda_precision(session, model)
        return opened

    def _output_shapes(self, label, model, feed) -> dict:
        """Output shapes and dtypes from one CPU run (a graph-capturing session needs
        device-resident inputs even for its first run)."""
        cpu = _create_session(model, session_options(None), ["CPUExecutionProvider"], label)
        values = _checked_run(cpu, feed, label, self.options.run_timeout)
        names = [o.name for o in cpu.get_outputs()]
        return {name: (v.shape, v.dtype) for name, v in zip(names, values)}

    def environment(self) -> dict:
        from bnfold.deploy.engines._cuda import device_name

        env = _environment(self.options.threads)
        env["device"] = device_name() or "CUDA device 0 (name needs torch with CUDA)"
        env["cuda_graphs"] = self.options.cuda_graphs
        return env


def _cuda_precision(session, model) -> Precision:
    """The graph's own types, and TF32: the CUDA EP lets cuBLAS/cuDNN use TF32 tensor cores
    for float32 MatMul/Conv on Ampere and later unless `use_tf32` is 0, as the session reports."""
    precision = graph_precision(model)
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    from bnfold.deploy.engines._cuda import compute_capability

    capability = compute_capability()
    tf32 = str(options.get("use_tf32", "1")) != "0" and (capability is None or capability >= (8, 0))
    if precision.compute == "float32" and tf32:
        return Precision("tf32", f"CUDAExecutionProvider use_tf32={options.get('use_tf32', '1')} "
                         f"on compute capability {capability or 'unknown'}", precision.layers)
    return precision
