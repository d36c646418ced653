"""TensorRT: build engines from ONNX, and run them for `bnfold bench --engine trt`.

Written against the documented TensorRT 10.x and 11.x Python API; differences are
feature-detected (hasattr), not guessed from the version string:
- 11.x networks are always strongly typed and BuilderFlag.FP16 is gone: for --fp16 the ONNX
  model is converted to fp16 first (I/O kept fp32, bnfold.deploy.fp16); on 10.x the builder flag is
  used. Either way the engine inspector reports what precision the layers actually got.
- NetworkDefinitionCreationFlag.EXPLICIT_BATCH is deprecated (10.x) and ignored; we pass 0.
- The inspector's JSON changed in 11.x ("Format/Datatype" split into "Format" and "DataType",
  "Bindings" replaced by "I/O Tensors"); `layer_precisions` reads both.
Device buffers, the stream, CUDA events and CUDA graphs come from torch with CUDA.
Unverified on hardware: no machine here has TensorRT.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

from bnfold.deploy.engines import INSTALL_HINTS, EngineOptions, Precision, Timing, first_line
from bnfold.errors import BnfoldError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def unavailable_reason() -> str | None:
    """Why the trt engine cannot run here, or None when tensorrt imports and a GPU exists."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed"
    from bnfold.deploy.engines._cuda import torch_cuda

    if torch_cuda() is None:
        return "no CUDA GPU visible to torch"
    return None


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BnfoldError(
            f"TensorRT is not installed: {INSTALL_HINTS['tensorrt']} (needs an NVIDIA GPU)"
        ) from None
    return trt


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def has_fp16_builder_flag(trt) -> bool:
    """TensorRT 10.x has BuilderFlag.FP16 (weak typing); 11.x removed it."""
    return hasattr(trt.BuilderFlag, "FP16")


def build_serialized(model, options):
    """(serialized engine bytes, BuildReport) for an onnx.ModelProto and BuildOptions."""
    from bnfold.deploy.trt_options import BuildReport

    trt = require_tensorrt()
    logger = _logger(trt)
    notes: list[str] = []
    fp16_method = None
    use_flag = options.fp16 and has_fp16_builder_flag(trt)
    if options.fp16 and not use_flag:
        from bnfold.deploy.fp16 import convert_to_fp16

        model = convert_to_fp16(model)
        fp16_method = "ONNX converted to fp16 (I/O kept fp32), strongly typed network"
    elif use_flag:
        fp16_method = "BuilderFlag.FP16 (weakly typed network)"

    builder = trt.Builder(logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if not use_flag and hasattr(creation, "STRONGLY_TYPED"):
        # Required on 10.x to keep the model's own types; accepted and ignored on 11.x.
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # load_model has already read external weights into the proto, so no path is needed.
    if not parser.parse(model.SerializeToString()):
        raise BnfoldError(_parser_errors(parser))

    config = builder.create_builder_config()
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.opt_level is not None:
        if not hasattr(config, "builder_optimization_level"):
            raise BnfoldError("this TensorRT has no builder_optimization_level: drop --opt-level")
        config.builder_optimization_level = options.opt_level
    if use_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    # DETAILED verbosity so the inspector can say which precision each layer really runs in.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.profiles:
        profile = builder.create_optimization_profile()
        for p in options.profiles:
            profile.set_shape(p.name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    cache = _load_timing_cache(trt, config, options.timing_cache)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BnfoldError(
            "TensorRT could not build the engine (see the TensorRT messages above): try a "
            "larger --workspace, or check the profile shapes"
        )
    plan_bytes = bytes(plan)
    saved = False
    if cache is not None and options.timing_cache:
        from bnfold.onnxio.staged_files import write_bytes_atomic

        write_bytes_atomic(options.timing_cache, bytes(cache.serialize()))
        saved = True
    engine = deserialize(trt, plan_bytes, "the engine just built")
    precisions = layer_precisions(inspect_engine(trt, engine))
    if options.fp16 and not any(k in precisions for k in ("Half", "FP16")):
        notes.append(
            "fp16 was requested but the engine inspector shows no fp16 layers: TensorRT chose "
            "fp32 kernels (or the GPU lacks fast fp16)"
        )
    report = BuildReport("", trt.__version__, list(options.profiles), options.fp16, fp16_method,
                         dict(precisions), saved, notes)
    return plan_bytes, report


def _parser_errors(parser) -> str:
    """Every ONNX parser error, node by node, in one line."""
    parts = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = []
        node_name = error.node_name() if hasattr(error, "node_name") else ""
        operator = error.node_operator() if hasattr(error, "node_operator") else ""
        if node_name or operator:
            where.append(f"{operator or '?'} node {node_name or error.node()!r}")
        elif error.node() >= 0:
            where.append(f"node #{error.node()}")
        parts.append(f"{' '.join(where) or 'model'}: {error.desc()}")
    detail = "; ".join(parts) or "no detail given"
    return (
        f"TensorRT's ONNX parser refused the model ({detail}): fold/simplify the model or "
        f"replace the unsupported ops"
    )


def _load_timing_cache(trt, config, path: str | None):
    if not hasattr(config, "create_timing_cache"):
        if path:
            raise BnfoldError("this TensorRT has no timing cache API: drop --timing-cache")
        return None
    blob = b""
    if path and os.path.exists(path):
        with open(path, "rb") as handle:
            blob = handle.read()
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BnfoldError(
            f"timing cache {path!r} was made by another TensorRT or GPU: delete it, it will be "
            f"rebuilt"
        )
    return cache


def deserialize(trt, plan: bytes, what: str):
    runtime = trt.Runtime(_logger(trt))
    try:
        engine = runtime.deserialize_cuda_engine(plan)
    except Exception as exc:  # pybind raises on some versions, returns None on others
        engine, reason = None, first_line(exc)
    else:
        reason = "deserialisation returned nothing"
    if engine is None:
        raise BnfoldError(
            f"cannot load {what} ({reason}): engines only run on the TensorRT version and GPU "
            f"that built them (this is TensorRT {trt.__version__}); rebuild it with "
            f"`bnfold build`"
        )
    return engine


def load_engine_file(path: str):
    trt = require_tensorrt()
    try:
        with open(path, "rb") as handle:
            plan = handle.read()
    except OSError as exc:
        raise BnfoldError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    return deserialize(trt, plan, repr(path))


def inspect_engine(trt, engine) -> dict:
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        return json.loads(text)
    except ValueError:
        return {}


def layer_precisions(info: dict) -> Counter:
    """Output data types of the engine's layers, counted: Counter({'Half': 40, 'Float': 2}).

    TensorRT 10.x writes "Format/Datatype": "Row major linear FP16 format (kLINEAR)"; 11.x
    splits it into "Format" and "DataType". Layers are dicts only at DETAILED verbosity.
    """
    counts: Counter = Counter()
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        outputs = layer.get("Outputs") or []
        if not outputs:
            continue
        first = outputs[0]
        if "DataType" in first:
            counts[str(first["DataType"])] += 1
        else:
            counts[_dtype_from_format(str(first.get("Format/Datatype", "")))] += 1
    return counts


_INSPECTOR_PRECISIONS = {"Half": "float16", "FP16": "float16", "BFloat16": "bfloat16",
                         "BF16": "bfloat16"}


def engine_precision(trt, engine) -> Precision:
    """What the engine computes in, from its inspector: the lowest floating-point layer output
    type; float32 layers count as TF32 on Ampere and later, where the builder enables TF32 by
    default and the inspector cannot tell the two apart (kernels from either may be chosen)."""
    from bnfold.deploy.engines import lowest_precision
    from bnfold.deploy.engines._cuda import compute_capability

    counts = layer_precisions(inspect_engine(trt, engine))
    found = {_INSPECTOR_PRECISIONS[k] for k in counts if k in _INSPECTOR_PRECISIONS}
    source = "TensorRT engine inspector (layer output types)"
    if not counts:
        source += "; no layer detail (engine built without DETAILED profiling verbosity)"
    low = [k for k in counts if k in ("Int8", "FP8", "FP4", "INT4", "Int4")]
    if low:
        raise BnfoldError(
            f"the engine has {', '.join(low)} layers: bnfold has no tolerance for quantised "
            f"engines; give --rtol/--atol that your accuracy budget allows"
        )
    capability = compute_capability()
    if capability is not None and capability >= (8, 0):
        found.add("tf32")
        source += f"; Float layers may use TF32 on compute capability {capability[0]}.{capability[1]}"
    return Precision(lowest_precision(found), source, dict(counts))


def _dtype_from_format(text: str) -> str:
    for token, name in (("FP16", "Half"), ("FP32", "Float"), ("Int8", "Int8"), ("BF16", "BFloat16"),
                        ("FP8", "FP8"), ("Int32", "Int32"), ("Int64", "Int64"), ("Bool", "Bool")):
        if token.lower() in text.lower():
            return name
    return text or "unknown"


class TrtSession:
    """One engine with device-resident I/O (torch CUDA tensors), timed by CUDA events."""

    def __init__(self, label, trt, engine, feed, options: EngineOptions):
        from bnfold.deploy.trt_options import ShapeProfile, check_in_profile
        from bnfold.deploy.engines._cuda import CudaTimer, torch_cuda

        torch = torch_cuda()
        self.label = label
        self._torch = torch
        self._engine = engine
        self._context = engine.create_execution_context()
        self._timer = CudaTimer(torch)
        self._include_transfers = options.include_transfers
        self._host_inputs = {}
        self._device = {}
        self._outputs = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                continue
            if name not in feed:
                raise BnfoldError(f"the engine takes input {name!r}, which the inputs lack")
            array = feed[name]
            low, opt, high = engine.get_tensor_profile_shape(name, 0)
            check_in_profile(ShapeProfile(name, tuple(low), tuple(opt), tuple(high)),
                             tuple(array.shape))
            self._context.set_input_shape(name, tuple(array.shape))
            dtype = _torch_dtype(torch, trt, engine.get_tensor_dtype(name))
            host = torch.from_numpy(array).to(dtype)
            self._host_inputs[name] = host.pin_memory() if options.include_transfers else host
            self._device[name] = host.to("cuda")
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                continue
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = _torch_dtype(torch, trt, engine.get_tensor_dtype(name))
            self._device[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self._outputs.append(name)
        for name, tensor in self._device.items():
            self._context.set_tensor_address(name, tensor.data_ptr())
        self.precision = Precision("float32", "")
        self._trt = trt
        self._feed = feed
        self._graph = None
        stream = self._timer.stream
        # One plain run first: it applies the shapes and flushes deferred updates, which the
        # TensorRT docs require before a CUDA graph capture.
        if not self._context.execute_async_v3(self._timer.stream_handle):
            raise BnfoldError(f"TensorRT failed to run {label}: check the input shapes")
        stream.synchronize()
        if options.cuda_graphs:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=stream):
                self._context.execute_async_v3(self._timer.stream_handle)

    def run(self) -> Timing:
        timer = self._timer
        timer.start()
        start = time.perf_counter()
        with self._torch.cuda.stream(timer.stream):
            if self._include_transfers:
                for name, host in self._host_inputs.items():
                    self._device[name].copy_(host, non_blocking=True)
            if self._graph is not None:
                self._graph.replay()
            else:
                self._context.execute_async_v3(timer.stream_handle)
            if self._include_transfers:
                for name in self._outputs:
                    self._device[name].cpu()
        enqueue_ms = (time.perf_counter() - start) * 1e3
        return Timing(timer.stop(), enqueue_ms)

    def outputs(self, feed: dict | None = None) -> dict:
        """The same context (and CUDA graph) on `feed`, copied into the bound device inputs."""
        import numpy as np

        torch = self._torch
        feed = self._feed if feed is None else feed
        with torch.cuda.stream(self._timer.stream):
            for name in self._host_inputs:
                device = self._device[name]
                source = torch.from_numpy(np.asarray(feed[name], order="C")).to(device.dtype)
                if tuple(source.shape) != tuple(device.shape):
                    raise BnfoldError(
                        f"{self.label}: input {name!r} is bound as {list(device.shape)}, the "
                        f"feed has {list(source.shape)}: outputs are checked at the shape the "
                        f"session opened with"
                    )
                device.copy_(source)
            if self._graph is not None:
                self._graph.replay()
            elif not self._context.execute_async_v3(self._timer.stream_handle):
                raise BnfoldError(f"TensorRT failed to run {self.label}")
        self._timer.stream.synchronize()
        found = {}
        for name in self._outputs:
            tensor = self._device[name].cpu()
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
                tensor = tensor.float()
            found[name] = tensor.numpy().copy()
        if feed is not self._feed:  # restore the benched feed
            self.outputs(self._feed)
        return found

    def close(self) -> None:
        self._graph = None
        self._context = None
        self._device = {}


def _torch_dtype(torch, trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise BnfoldError(f"bnfold cannot bench an engine with {dtype} I/O: use ort-cuda")
    return table[dtype]


class TrtEngine:
    """`bench --engine trt`: ONNX models are built in memory (shapes from the feed); files
    ending in .engine/.plan are loaded as they are."""

    name = "trt"

    def __init__(self, options: EngineOptions):
        self._trt = require_tensorrt()
        from bnfold.deploy.engines._cuda import torch_cuda

        if torch_cuda() is None:
            raise BnfoldError(
                "the trt engine needs torch with CUDA for device buffers and CUDA events: "
                "install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if options.inference_precision not in (None, "f32", "f16"):
            raise BnfoldError("--engine trt builds f32 or f16 engines: use --inference-precision "
                              "f16 or f32")
        self.options = options
        self.notes = [
            "inputs copied host→device and outputs back on every run (--include-transfers)"
            if options.include_transfers
            else "inputs and outputs resident on the GPU; no transfers timed",
            "ONNX models are built into engines with profiles fixed at the bench input shapes",
        ]

    def open(self, label: str, model, feed: dict) -> TrtSession:
        trt = self._trt
        if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(ENGINE_SUFFIXES):
            engine = load_engine_file(os.fspath(model))
        else:
            from bnfold.deploy.trt_options import BuildOptions, ShapeProfile
            from bnfold.onnxio.files import load_model

            proto = load_model(model) if isinstance(model, (str, os.PathLike)) else model
            if isinstance(proto, bytes):  # a payload verify made (outputs marked, say)
                import onnx

                proto = onnx.load_from_string(proto)
            profiles = [ShapeProfile(k, tuple(v.shape), tuple(v.shape), tuple(v.shape))
                        for k, v in feed.items()]
            fp16 = self.options.inference_precision == "f16"
            plan, _ = build_serialized(proto, BuildOptions(profiles=profiles, fp16=fp16))
            engine = deserialize(trt, plan, label)
        session = TrtSession(label, trt, engine, feed, self.options)
        session.precision = engine_precision(trt, engine)
        return session

    def environment(self) -> dict:
        from bnfold.deploy.engines._cuda import device_name

        return {"tensorrt": self._trt.__version__, "device": device_name(),
                "cuda_graphs": self.options.cuda_graphs}
