"""OpenVINO engine (`--engine openvino`): the CPU plugin, ONNX read directly.

Each session reads the ONNX model, fixes its inputs at the feed's shapes (a static model
compiles to faster kernels, and the bench and verify feeds have one shape), and compiles it
once with PERFORMANCE_HINT=LATENCY: one stream, the latency a single request sees, which is
what the other engines time too.

Precision: OpenVINO's CPU plugin runs in bf16 by default on CPUs with native bf16 (AMX,
AVX512-BF16). bnfold asks for f32 unless `inference_precision` says otherwise, and reads back
what the compiled model chose (`INFERENCE_PRECISION_HINT`, and each runtime layer's
`runtimePrecision`): an f16 request on a CPU without f16 kernels compiles to bf16, and the
verification judges what ran, not what was asked.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from bnfold.deploy.engines import (
    INSTALL_HINTS, EngineOptions, Precision, first_line, lowest_precision, run_timeout_error,
)
from bnfold.errors import BnfoldError

HINTS = ("f32", "bf16", "f16")
_PRECISION_NAMES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def require_openvino():
    try:
        import openvino
    except ImportError:
        raise BnfoldError(f"OpenVINO is not installed: {INSTALL_HINTS['openvino']}") from None
    return openvino


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OpenVinoSession:
    def __init__(self, label: str, compiled, feed: dict, precision: Precision,
                 graph_names: frozenset = frozenset(), timeout: float | None = None,
                 graph_inputs: tuple = ()):
        self.label = label
        self._timeout = timeout
        self.precision = precision
        self._compiled = compiled
        self._graph_names = graph_names
        self._request = compiled.create_infer_request()
        self._feed = feed
        self._names = [_name(port, graph_names) for port in compiled.outputs]
        self._input_names = input_names(compiled.inputs, graph_inputs)
        self._set_inputs(feed)

    def _set_inputs(self, feed: dict) -> None:
        import openvino as ov

        for port, name in zip(self._compiled.inputs, self._input_names):
            if name not in feed:
                raise BnfoldError(f"{self.label} takes input {name!r}, which the inputs lack")
            # A Tensor over the caller's array: no copy per run, as with ORT's feed.
            value = np.asarray(feed[name], order="C")
            try:
                self._request.set_tensor(port, ov.Tensor(value))
            except Exception as exc:  # OpenVINO's ParameterMismatch and friends
                raise BnfoldError(
                    f"{self.label}: input {name!r} was given as {value.dtype} {list(value.shape)}, "
                    f"but OpenVINO expects {port.get_element_type().get_type_name()} "
                    f"({first_line(exc)[:120]}): give it in the model's dtype"
                ) from None

    def run(self) -> None:
        self._request.infer()

    def outputs(self, feed: dict | None = None) -> dict:
        if feed is not None:
            self._set_inputs(feed)
        try:
            self._infer()
        except BnfoldError:
            raise
        except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line C++ trace
            raise BnfoldError(f"OpenVINO cannot run {self.label}: {first_line(exc)}") from None
        finally:
            if feed is not None:
                self._set_inputs(self._feed)
        # Copies: the request reuses its output buffers on the next run.
        return {name: np.array(self._request.get_tensor(port).data, copy=True)
                for name, port in zip(self._names, self._compiled.outputs)}

    def _infer(self) -> None:
        """One run, cancelled after the timeout (the CPU plugin stops between layers)."""
        if not self._timeout:
            self._request.infer()
            return
        self._request.start_async()
        if self._request.wait_for(max(1, int(self._timeout * 1000))):
            self._request.wait()  # raises what the run raised
            return
        self._request.cancel()
        try:
            self._request.wait()
        except Exception:  # "Infer Request was canceled": the end we asked for
            pass
        raise run_timeout_error(self.label, self._timeout)

    def close(self) -> None:
        self._request = None
        self._compiled = None


class OpenVinoEngine:
    name = "openvino"

    def __init__(self, options: EngineOptions):
        ov = require_openvino()
        hint = options.inference_precision or "f32"
        if hint not in HINTS:
            raise BnfoldError(f"--inference-precision {hint!r}: choose one of {', '.join(HINTS)}")
        if options.threads is not None and options.threads < 1:
            raise BnfoldError("--threads must be at least 1")
        self.options = options
        self._hint = hint
        self._core = ov.Core()
        self._compiled_properties: dict = {}
        self.notes = [f"OpenVINO CPU plugin, PERFORMANCE_HINT=LATENCY, inference precision "
                      f"requested {hint} (what each model compiled to is in the environment)"]
        if options.cuda_graphs or options.include_transfers:
            self.notes.append("--cuda-graphs/--include-transfers do nothing on openvino")

    def _config(self) -> dict:
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self._hint}
        if self.options.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        return config

    def open(self, label: str, model, feed: dict) -> OpenVinoSession:
        import openvino as ov

        try:
            if isinstance(model, (str, os.PathLike)):
                read = self._core.read_model(os.fspath(model))  # external data beside it
            else:
                payload = model if isinstance(model, bytes) else model.SerializeToString()
                read = self._core.read_model(payload, ov.Tensor(np.empty(0, np.uint8)))
            graph_names, graph_inputs = _graph_io_names(model)
            shapes = {}
            for index, name in enumerate(input_names(read.inputs, graph_inputs)):
                if name in feed:  # by position: a port may lack the graph's name for it
                    shapes[index] = list(np.shape(feed[name]))
            if shapes:
                read.reshape(shapes)
            compiled = self._core.compile_model(read, "CPU", self._config())
        except BnfoldError:
            raise
        except Exception as exc:  # OpenVINO's frontend and plugin errors share no base class
            raise BnfoldError(
                f"OpenVINO cannot load {label}: {openvino_message(exc)}; check the model with "
                f"onnx.checker, give it other input sizes with --shape NAME=DxD..., or use "
                f"--engine ort-cpu"
            ) from None
        precision = _with_graph_precision(compiled_precision(compiled), model)
        self._compiled_properties[label] = {
            "inference_precision": _hint_of(compiled),
            "inference_num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "num_streams": int(compiled.get_property("NUM_STREAMS")),
            "layer_precisions": precision.layers,
        }
        session = OpenVinoSession(label, compiled, feed, precision, graph_names,
                                  self.options.run_timeout, graph_inputs)
        session.outputs()  # a bad shape or dtype fails here, in one line, before any timing
        return session

    def environment(self) -> dict:
        import openvino as ov

        return {
            "openvino": ov.__version__,
            "device": f"CPU ({self._core.get_property('CPU', 'FULL_DEVICE_NAME')})",
            "inference_precision_requested": self._hint,
            "intra_op_num_threads": self.options.threads if self.options.threads is not None
            else f"default (OpenVINO picks; {os.cpu_count()} logical CPUs)",
            "compiled": dict(self._compiled_properties),
        }


def compiled_precision(compiled) -> Precision:
    """The compiled model's inference precision, and its runtime layers counted by precision."""
    hint = _hint_of(compiled)
    layers: Counter = Counter()
    try:
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "runtimePrecision" in info and info["layerType"].astype(str) not in ("Const", "Input",
                                                                                  "Output"):
                layers[info["runtimePrecision"].astype(str)] += 1
    except Exception:  # the runtime model is introspection only: its absence costs the counts
        layers = Counter()
    found = {_PRECISION_NAMES[k] for k in layers if k in _PRECISION_NAMES}
    found.add(_PRECISION_NAMES.get(hint, "float32"))
    return Precision(lowest_precision(found),
                     f"OpenVINO compiled model: INFERENCE_PRECISION_HINT={hint}", dict(layers))


def _name(port, graph_names: frozenset = frozenset()) -> str:
    """The ONNX graph's own name for a port. OpenVINO merges tensor names through Identity
    nodes (an output `out = Identity(mid)` holds {'mid', 'out'}), so any name may be the
    inner one."""
    names = port.get_names()
    for name in sorted(names):
        if name in graph_names:
            return name
    return port.get_any_name()


def input_names(ports, graph_inputs: tuple) -> list[str]:
    """The ONNX graph's name for each input port: one of the port's own names, else the graph
    input at its position. OpenVINO may give an input only a later tensor's name (an input that
    SequenceAt passes through to the output `out` is named 'out'); its parameters keep the
    graph's input order."""
    wanted = set(graph_inputs)
    by_position = len(ports) == len(graph_inputs)
    names = []
    for index, port in enumerate(ports):
        own = sorted(set(port.get_names()) & wanted)
        names.append(own[0] if own else graph_inputs[index] if by_position
                     else port.get_any_name())
    return names


def _graph_io_names(model) -> tuple[frozenset, tuple]:
    """Input and output names of the ONNX graph, and its real inputs (not initializers) in
    order, read without its weights."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        from bnfold.onnxio.files import load_model_deferred

        model, deferred, _ = load_model_deferred(model)
        deferred.close()
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    weights = {t.name for t in model.graph.initializer}
    return (frozenset(v.name for v in (*model.graph.input, *model.graph.output)),
            tuple(v.name for v in model.graph.input if v.name not in weights))


def _with_graph_precision(compiled: Precision, model) -> Precision:
    """OpenVINO decompresses float16 weights and runs float32 kernels, yet the values were
    rounded to float16: judge by the lower of the compiled and the graph's own precision."""
    from bnfold.deploy.engines.ort import graph_precision

    declared = graph_precision(model)
    lowest = lowest_precision({compiled.compute, declared.compute})
    if lowest == compiled.compute:
        return compiled
    return Precision(lowest, f"{compiled.source}; the graph's own types ({declared.source})",
                     compiled.layers)


# Lines of an OpenVINO error that say where in its sources it was raised, not what went wrong.
_WHERE_RAISED = ("Exception from ", "Check '", "FrontEnd API failed", "While validating",
                 "-- ", "Model wasn't fully converted", "Summary:")


def openvino_message(exc: BaseException, limit: int = 300) -> str:
    """What an OpenVINO error says went wrong, on one line. Its first line only names the C++
    file that raised it ("Exception from src/inference/src/cpp/core.cpp:84:"); the cause is a
    few lines further, and a failed conversion ends with a summary of the operations."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_WHERE_RAISED)]
    summary = (lines[lines.index("Summary:") + 1:] if "Summary:" in lines else [])
    parts = [line.lstrip("- ") for line in summary][:2]
    if reasons:
        parts.append(f"({reasons[0]})" if parts else reasons[0])
    return " ".join(parts)[:limit] if parts else first_line(exc, limit)


def _hint_of(compiled) -> str:
    """The compiled model's INFERENCE_PRECISION_HINT as OpenVINO spells it: f32, bf16, f16."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)
