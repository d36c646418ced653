"""Backends that run a model for benchmarking, behind one small protocol.

An engine opens one `Session` per model; the harness in `bnfold.deploy.bench` calls `session.run()`
and times it on the host. GPU sessions also return a `Timing` with the device time measured by
CUDA events and the time the host spent enqueueing the work. `session.outputs(feed)` runs the
same session once more and returns its outputs on the host, so what is verified
(`bnfold verify --engine`, bench's output check, `bnfold build`) is what is timed, and
`session.precision` says in which precision the engine really computes, read from the engine
(TensorRT's inspector, OpenVINO's compiled model, the ONNX graph's own types for ORT).

Adding a backend = one module with a class that has `name`, `open(label, model, feed)` and
`environment()`, plus one line in `ENGINES`. Modules are imported only when chosen, and each
imports its library inside its own functions, so `import bnfold` never loads torch, tensorrt
or openvino.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from bnfold.errors import BnfoldError


@dataclass(frozen=True)
class Timing:
    """What a GPU session measured for one run, in milliseconds (None: not measured)."""

    gpu_ms: float | None = None
    enqueue_ms: float | None = None


@dataclass(frozen=True)
class EngineOptions:
    threads: int | None = None  # CPU intra-op threads; None = the library's default
    include_transfers: bool = False  # GPU: copy inputs in and outputs out on every run
    cuda_graphs: bool = False
    torch_compile: bool = False
    # Requested compute precision ("f32", "f16", "bf16"): OpenVINO's inference precision hint,
    # TensorRT's fp16 build. What the engine really chose is read back into Session.precision.
    inference_precision: str | None = None
    # Seconds one checked run (open's first run, `outputs()`) may take, where the engine can
    # interrupt a run: ORT (RunOptions.terminate) and OpenVINO (InferRequest.cancel, between
    # layers). TensorRT and torch cannot; timed runs are never bounded. Set by verify --engine.
    run_timeout: float | None = None


# Compute precisions bnfold knows tolerances for (bnfold.verification.comparison.PRECISION_TOLERANCES).
PRECISIONS = ("float32", "tf32", "float16", "bfloat16")


@dataclass(frozen=True)
class Precision:
    """The precision an engine computes in, as read from the engine (never from the request).

    `compute` is the lowest floating-point precision any layer runs in ("float32", "tf32",
    "float16", "bfloat16"); `layers` counts layers per precision where the engine says so;
    `source` names where it was read, for the report.
    """

    compute: str
    source: str
    layers: dict[str, int] = field(default_factory=dict)


class Session(Protocol):
    label: str
    precision: Precision

    def run(self) -> Timing | None:
        """Run the model once on the feed given to `open`; block until it has finished."""

    def outputs(self, feed: dict | None = None) -> dict[str, Any]:
        """Run once on `feed` (default: the feed given to `open`; same shapes) and return every
        output as a host numpy array, by the model's output name (bounded by
        EngineOptions.run_timeout where the engine can interrupt a run)."""

    def close(self) -> None: ...


class Engine(Protocol):
    name: str
    # Shown with the results, e.g. "ONNX Runtime graph optimisation: ORT_ENABLE_ALL".
    notes: list[str]

    def open(self, label: str, model: Any, feed: dict) -> Session: ...

    def environment(self) -> dict[str, Any]: ...


# name -> (module, class, one-line description). Explicit: no registration by import.
ENGINES: dict[str, tuple[str, str, str]] = {
    "ort-cpu": ("bnfold.deploy.engines.ort", "OrtCpuEngine", "ONNX Runtime, CPU execution provider"),
    "ort-cuda": ("bnfold.deploy.engines.ort", "OrtCudaEngine", "ONNX Runtime, CUDA execution provider"),
    "trt": ("bnfold.deploy.engines.trt", "TrtEngine", "TensorRT engines built from the ONNX models"),
    "torch": ("bnfold.deploy.engines.torch_engine", "TorchEngine", "PyTorch eager (or torch.compile)"),
    "openvino": ("bnfold.deploy.engines.openvino", "OpenVinoEngine", "OpenVINO, CPU plugin"),
}

INSTALL_HINTS = {
    "tensorrt": "pip install bnfold[trt]",
    "onnxruntime-gpu": "pip uninstall onnxruntime && pip install bnfold[gpu] "
    "(onnxruntime-gpu replaces onnxruntime; both provide the same module)",
    "torch": "pip install bnfold[torch]",
    "openvino": "pip install 'bnfold[openvino]' (the openvino package, CPU plugin)",
}


def get_engine(name: str, options: EngineOptions | None = None) -> Engine:
    """The engine called `name`, ready to open sessions (raises BnfoldError if unusable)."""
    if name not in ENGINES:
        raise BnfoldError(
            f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}"
        )
    module_name, class_name, _ = ENGINES[name]
    engine_class = getattr(importlib.import_module(module_name), class_name)
    return engine_class(options or EngineOptions())


def best_available() -> tuple[str, str]:
    """(engine name, why it was chosen): trt, else ort-cuda, else ort-cpu."""
    from bnfold.deploy.engines import ort as ort_engine
    from bnfold.deploy.engines import trt as trt_engine

    trt_reason = trt_engine.unavailable_reason()
    if trt_reason is None:
        return "trt", "TensorRT imports and a CUDA GPU is present"
    if ort_engine.cuda_provider_available():
        return "ort-cuda", f"CUDAExecutionProvider is available ({trt_reason})"
    return "ort-cpu", f"no GPU engine available ({trt_reason}; no CUDAExecutionProvider)"


def lowest_precision(found) -> str:
    """The lowest of the floating-point precisions in `found` (float32 when none is lower)."""
    for name in ("bfloat16", "float16", "tf32"):
        if name in found:
            return name
    return "float32"


def run_timeout_error(label: str, seconds: float) -> BnfoldError:
    return BnfoldError(f"{label} ran longer than {seconds:g} s on one input set: raise "
                       "--verify-timeout or give smaller --shape dims")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message, for one-line BnfoldErrors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
