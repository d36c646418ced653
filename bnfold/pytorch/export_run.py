"""Running the model for `bnfold export`: inputs matched to forward, BN calls counted, parity.

- `resolve_inputs` names each InputSpec after the forward signature, fills dtypes (the model's
  own float dtype unless given), applies dynamic dims, and refuses a missing argument by name.
- `run_counting` runs the eval forward once and counts batch_norm as it is called (module
  hooks plus a TorchFunctionMode for `F.batch_norm` without a module), which is what the ONNX
  graph must contain: a BN module called twice is two nodes, an unused one none.
- `parity` runs torch and ONNX Runtime (optimisation off) on the examples, fresh random
  inputs, and inputs with every symbolic dim doubled, and marks output dims that moved with
  them as symbolic in the ONNX.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.pytorch.export_inputs import InputSpec

INTEGER_BOUND_WITHOUT_EMBEDDING = 2  # random ids/masks in {0, 1} unless an Embedding says more


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: " + (text.splitlines()[0][:limit] if text else "no message")


EXPORT_HINT = ("--input-shape {name}:DIMS[:DTYPE], or an array named {name} in --inputs",
               "--input-shape [NAME:]DIMS[:DTYPE] (one per argument) or --inputs file.npz")
BENCH_HINT = ("--shape {name}=DxD..., or an array named {name} in --inputs",
              "--shape NAME=DxD... (one per forward argument, float) or --inputs file.npz "
              "(any dtype, e.g. int64 token ids)")


def resolve_inputs(torch, model, specs, dynamic, dynamic_batch, hint=EXPORT_HINT):
    """(named, typed specs in forward order, the callable to export taking them positionally).

    `hint`: how the user gives (one named input, all inputs) in the command at hand."""
    from bnfold.pytorch.zoo.prepare import forward_parameters

    params = forward_parameters(model)
    if params is None:  # forward(*inputs): positional only, names are ours
        for i, spec in enumerate(specs):
            spec.name = spec.name or ("input" if len(specs) == 1 else f"input_{i}")
        call = model
    else:
        specs = _match_signature(specs, params, hint)
        positional = [p.name for p in params if p.kind != p.KEYWORD_ONLY]
        names = [s.name for s in specs]
        # torch's exporter appends forward's default values as extra inputs (and cannot pass
        # keyword-only ones): a forward with arguments beyond those given is called by keyword
        # from a positional-only wrapper, so the exporter sees exactly the given inputs.
        extra = [p.name for p in params if p.name not in names]
        plain = names == positional[:len(names)] and not extra
        call = model if plain else _keyword_call(torch, model, names)
    float_dtype = _model_float_dtype(torch, model)
    for spec in specs:
        spec.dtype = spec.dtype or float_dtype
    _apply_dynamic(specs, dynamic, dynamic_batch)
    return specs, call


def _match_signature(specs: list[InputSpec], params, hint) -> list[InputSpec]:
    by_name = {p.name: p for p in params}
    taken = {s.name for s in specs if s.name is not None}
    for name in taken:
        if name not in by_name:
            raise BnfoldError(
                f"forward() has no argument {name!r} (it takes {', '.join(by_name) or 'none'}): "
                "name the inputs after forward's arguments"
            )
    free = [p.name for p in params if p.kind != p.KEYWORD_ONLY and p.name not in taken]
    unnamed = [s for s in specs if s.name is None]
    if len(unnamed) > len(free):
        raise BnfoldError(
            f"{len(specs)} inputs given but forward() takes {len(params)} "
            f"({', '.join(by_name) or 'none'}): give one input per forward argument"
        )
    for spec, name in zip(unnamed, free):
        spec.name = name
    given = {s.name for s in specs}
    for p in params:
        if p.name not in given and p.default is p.empty:
            raise BnfoldError(
                f"forward() needs argument {p.name!r}, which was not given: add an input for it "
                f"({hint[0].format(name=p.name)})"
            )
    order = {p.name: i for i, p in enumerate(params)}
    return sorted(specs, key=lambda s: order[s.name])


def _keyword_call(torch, model, names):
    """A module whose positional forward calls `model` by keyword (inputs out of signature order)."""

    class KeywordForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs)))

    return KeywordForward().eval()


def _model_float_dtype(torch, model) -> str:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return str(tensor.dtype).replace("torch.", "")
    return "float32"


def _apply_dynamic(specs, dynamic, dynamic_batch) -> None:
    by_name = {s.name: s for s in specs}
    if dynamic_batch:
        for spec in specs:
            if spec.dims and 0 not in spec.symbols:
                spec.symbols[0] = "batch"
    for name, axis, symbol in dynamic:
        spec = specs[0] if name is None else by_name.get(name)
        if spec is None:
            raise BnfoldError(f"--dynamic names input {name!r}, which is not one of "
                              f"{', '.join(by_name)}: use an input name")
        if axis >= len(spec.dims):
            raise BnfoldError(f"--dynamic {spec.name}:{axis}: input {spec.name!r} has "
                              f"{len(spec.dims)} dims (axes 0..{len(spec.dims) - 1})")
        spec.symbols[axis] = symbol or ("batch" if axis == 0 else f"{spec.name}_dim{axis}")
    sizes = {}
    for spec in specs:
        for axis, symbol in spec.symbols.items():
            size = sizes.setdefault(symbol, spec.dims[axis])
            if size != spec.dims[axis]:
                raise BnfoldError(f"dynamic dim {symbol!r} has example size {size} in one input "
                                  f"and {spec.dims[axis]} in {spec.name!r}: make them equal")


def _integer_bound(torch, model) -> int:
    sizes = [m.num_embeddings for m in model.modules()
             if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    return min(sizes) if sizes else INTEGER_BOUND_WITHOUT_EMBEDDING


def _random(torch, spec: InputSpec, dims, generator, bound) -> object:
    dtype = getattr(torch, spec.dtype)
    if spec.dtype == "bool":
        return torch.randint(0, 2, dims, generator=generator).bool()
    if not dtype.is_floating_point:
        low, high = bound
        if spec.example is not None and spec.example.size:
            low, high = int(spec.example.min()), int(spec.example.max()) + 1
        return torch.randint(low, high, dims, generator=generator, dtype=dtype)
    return torch.randn(dims, generator=generator, dtype=torch.float32).to(dtype)


def example_inputs(torch, model, specs, seed: int, doubled: bool = False, offset: int = 0):
    """Tensors for the specs: the given examples, else seeded random ones (ids below the
    smallest Embedding size); with `doubled`, every symbolic dim twice its example size."""
    generator = torch.Generator().manual_seed(seed + offset)
    bound = (0, _integer_bound(torch, model))
    tensors = []
    for spec in specs:
        if spec.example is not None and not doubled and offset == 0:
            tensors.append(torch.from_numpy(np.array(spec.example, copy=True)))
            continue
        dims = tuple(2 * d if doubled and axis in spec.symbols else d
                     for axis, d in enumerate(spec.dims))
        tensors.append(_random(torch, spec, dims, generator, bound))
    return tensors


def describe_inputs(tensors, specs) -> str:
    return ", ".join(f"{s.name} {'x'.join(map(str, t.shape)) or 'scalar'} {s.dtype}"
                     for s, t in zip(specs, tensors))


@dataclass
class BnUsage:
    calls: int = 0
    modules: dict[str, int] = field(default_factory=dict)  # BN module name -> calls
    # id(running_mean) -> (who: module name or "F.batch_norm #k", running_mean, running_var)
    statistics: dict[int, tuple[str, np.ndarray, np.ndarray]] = field(default_factory=dict)
    batch_statistics: list[str] = field(default_factory=list)  # calls normalising by the batch

    @property
    def functional(self) -> int:
        return self.calls - sum(self.modules.values())

    def describe(self) -> str:
        parts = [f"{name} ×{n}" if n > 1 else name for name, n in self.modules.items()]
        if self.functional:
            parts.append(f"{self.functional} F.batch_norm without a module")
        return ", ".join(parts) or "none"


def _aten_bn(input, weight, bias, running_mean, running_var, training, momentum, eps,
             cudnn_enabled):
    """torch.batch_norm's argument order, for binding its arguments by name."""


def run_counting(torch, model, call, tensors, specs, hint=EXPORT_HINT):
    """(the eval forward's output, BnUsage) for one run of `call` (which runs `model`)."""
    import torch.nn.functional as F
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.overrides import TorchFunctionMode

    usage = BnUsage()

    class CountBatchNorm(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.batch_norm or func is torch.batch_norm:
                usage.calls += 1
                signature = inspect.signature(F.batch_norm if func is F.batch_norm else _aten_bn)
                bound = signature.bind(*args, **kwargs).arguments
                mean, var = bound.get("running_mean"), bound.get("running_var")
                if bound.get("training", False) or mean is None or var is None:
                    usage.batch_statistics.append("F.batch_norm(training=True)")
                elif id(mean) not in usage.statistics:
                    who = owners.get(id(mean), f"F.batch_norm #{usage.functional}")
                    usage.statistics[id(mean)] = (who, mean.detach().double().numpy().copy(),
                                                  var.detach().double().numpy().copy())
            return func(*args, **kwargs)

    def count(name):
        def hook(module, inputs):
            usage.modules[name] = usage.modules.get(name, 0) + 1
        return hook

    handles = [m.register_forward_pre_hook(count(name))
               for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    owners = {id(m.running_mean): name for name, m in model.named_modules()
              if isinstance(m, _BatchNorm) and m.running_mean is not None}
    try:
        with torch.no_grad(), CountBatchNorm():
            output = call(*tensors)
    except BnfoldError:
        raise
    except Exception as exc:  # the user's forward can raise anything
        raise BnfoldError(
            f"the model fails on the example inputs ({describe_inputs(tensors, specs)}) "
            f"({_first_line(exc)}): give inputs that fit forward() with {hint[1]}"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return output, usage


def check_bn_usage(model, usage: BnUsage) -> list[str]:
    """Refuse BNs that normalise with batch statistics in eval; notes for unused BN modules."""
    from torch.nn.modules.batchnorm import _BatchNorm

    notes = []
    unused = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        if name not in usage.modules:
            unused.append(name)
        elif module.running_mean is None or module.running_var is None:
            raise BnfoldError(
                f"BatchNorm {name!r} has no running statistics (track_running_stats=False), so it "
                "normalises with batch statistics even in eval mode: it cannot be exported as an "
                "inference BatchNormalization; retrain it with track_running_stats=True"
            )
    if usage.batch_statistics:
        raise BnfoldError(
            f"the eval forward calls F.batch_norm with training=True or without running statistics "
            f"{len(usage.batch_statistics)} time(s): that normalises with batch statistics, not an "
            "inference BatchNorm; pass running_mean/running_var and training=self.training"
        )
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        notes.append(f"{len(unused)} BatchNorm module(s) not called by the eval forward ({shown}): "
                     "not in the export")
    return notes


def _runner(proto, notes: list[str]):
    """run(names, feed) on ONNX Runtime (optimisation off); onnx's reference evaluator where
    ORT's CPU provider has no kernel for the graph's dtype (float64 Conv, for one)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(proto.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run
    except Exception as exc:  # ORT's exception types share no useful base
        if "NOT_IMPLEMENTED" not in str(exc):
            raise BnfoldError(
                f"ONNX Runtime cannot load the exported model ({_first_line(exc)}): please "
                "report the model with your torch and onnxruntime versions"
            ) from None
        detail = re.search(r"implementation for (\w+\(\d+\))", str(exc))
        notes.append(f"ONNX Runtime's CPU provider has no kernel for "
                     f"{detail.group(1) if detail else 'an operator'} in this dtype: parity was "
                     "checked with onnx's reference evaluator instead")
    from bnfold.verification.float64 import evaluate_float64

    def run(names, feed):
        values = evaluate_float64(proto, feed)
        return [values[n] for n in names]

    return run


def _size_change(specs) -> str:
    seen = {}
    for spec in specs:
        for axis, symbol in spec.symbols.items():
            seen.setdefault(symbol, spec.dims[axis])
    return ", ".join(f"{s}={2 * d} instead of {d}" for s, d in seen.items())


def _baked(specs, what: str, detail: str = "") -> BnfoldError:
    return BnfoldError(
        f"{what} with {_size_change(specs)}{f' ({detail})' if detail else ''}: the model fixes that size (e.g. reshape(1, -1), "
        "view(8, -1) or int(x.shape[2])); make it size-generic (x.flatten(1), x.shape[0] without "
        "int()) or do not mark that dim dynamic"
    )


def parity(torch, call, proto, specs, examples, names, seed, rtol, notes):
    """(max abs error, scale-relative error, input shapes checked); marks moving output dims."""
    from bnfold.pytorch.zoo.prepare import flatten_outputs

    run = _runner(proto, notes)
    dynamic = any(s.symbols for s in specs)
    runs = [(examples, False), (example_inputs(torch, call, specs, seed, offset=1), False)]
    if dynamic:
        runs.append((example_inputs(torch, call, specs, seed, doubled=True, offset=2), True))
    max_abs, scale, checked, shapes, compared = 0.0, 0.0, [], [], []
    for number, (tensors, doubled) in enumerate(runs):
        try:
            with torch.no_grad():
                expected = [t for _, t in flatten_outputs(call(*tensors))]
        except Exception as exc:  # the user's forward can raise anything
            if doubled:
                raise _baked(specs, "the model does not run", _first_line(exc)) from None
            raise BnfoldError(f"the model fails on random inputs ({describe_inputs(tensors, specs)}"
                              f"; {_first_line(exc)}): pass real ones with --inputs file.npz") \
                from None
        feed = {s.name: t.numpy() for s, t in zip(specs, tensors)}
        try:
            got = run(names, feed)
        except Exception as exc:  # ORT's exception types share no useful base
            if doubled:
                raise _baked(specs, "the exported graph does not run", _first_line(exc)) from None
            if number:  # it ran the inputs it was traced with
                raise BnfoldError(
                    f"ONNX Runtime runs the export on the inputs it was traced with but not on "
                    f"fresh random ones ({_first_line(exc)}): sizes in the forward depend on "
                    "the input's values (a data-dependent count, as in keypoint selection), "
                    "which tracing fixes; export the part before them") from None
            raise BnfoldError(f"ONNX Runtime cannot run the export ({_first_line(exc)}): please "
                              "report the model to PyTorch (torch.onnx) with your torch and "
                              "onnxruntime versions, or try another --opset") from None
        for name, e, g in zip(names, expected, got):
            e = e.detach().double().numpy()
            if e.shape != g.shape:
                if doubled:
                    raise _baked(specs, f"output {name!r} has shape {g.shape} in ONNX but "
                                        f"{e.shape} in torch")
                raise BnfoldError(f"output {name!r} has shape {g.shape} in ONNX but {e.shape} "
                                  "in torch: please report the model")
            g64 = g.astype(np.float64)
            if not np.array_equal(np.isfinite(e), np.isfinite(g64)):
                raise BnfoldError(
                    f"output {name!r} is inf/NaN at other positions in ONNX Runtime than in "
                    f"torch: the export changed the numerics; please report the model")
            both = np.isfinite(e)
            max_abs = max(max_abs, float(np.max(np.abs(e[both] - g64[both]), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(e[both]), initial=0.0)))
        shapes.append([tuple(t.shape) for t in expected])
        checked.append({s.name: tuple(t.shape) for s, t in zip(specs, tensors)})
        compared.append((tensors, expected, got))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    if not np.isfinite(max_rel) or max_rel > rtol:
        from bnfold.pytorch.export_float64 import float64_verdict

        verdict = float64_verdict(torch, call, compared, rtol) if np.isfinite(max_rel) else None
        if verdict is not None and verdict[0]:
            notes.append(f"torch and the export differ by {max_rel:.3g} of the output scale; "
                         f"{verdict[1]}")
        else:
            raise BnfoldError(
                f"the exported ONNX model differs from torch (max abs error {max_abs:.3g}, "
                f"{max_rel:.3g} of the output scale"
                f"{'; ' + verdict[1] if verdict else ''}): the forward may take Python "
                "branches on the input's values (tracing records one path); make it traceable"
            )
    if dynamic:
        _mark_output_dims(proto, specs, names, shapes[0], shapes[-1])
    return max_abs, max_rel, checked


def _mark_output_dims(proto: onnx.ModelProto, specs, names, first, doubled) -> None:
    """Output dims that changed with the symbolic input dims become symbolic in the ONNX."""
    symbols = {}
    for spec in specs:
        for axis, symbol in spec.symbols.items():
            symbols[(spec.dims[axis], 2 * spec.dims[axis])] = symbol
    outputs = {o.name: o for o in proto.graph.output}
    for name, before, after in zip(names, first, doubled):
        dims = outputs[name].type.tensor_type.shape.dim
        for axis, (a, b) in enumerate(zip(before, after)):
            if a != b and axis < len(dims):
                # Ours, not the exporter's names (BatchNormalizationoutput_0_dim_2).
                dims[axis].dim_param = symbols.get((a, b), f"{name}_dim{axis}")
