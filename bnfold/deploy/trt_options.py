"""What a TensorRT build is asked for, as plain data testable anywhere: optimisation profiles
from `--shapes name:min/opt/max`, the workspace size, the checks that every dynamic input is
covered, and the report of a build.

Both `bnfold.deploy.build` (the orchestration) and `bnfold.deploy.engines.trt` (the TensorRT
calls) import this module, and it imports neither: no import cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx

from bnfold.errors import BnfoldError

_DIMS = r"\d+(?:x\d+)*"
_PROFILE_RE = re.compile(rf"^([^:]+):({_DIMS})(?:/({_DIMS})/({_DIMS}))?$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max shapes of one input, as TensorRT's IOptimizationProfile.set_shape takes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max)
        )


@dataclass
class BuildOptions:
    profiles: list[ShapeProfile] = field(default_factory=list)
    workspace_bytes: int | None = None
    opt_level: int | None = None  # builder_optimization_level, 0..5 (TensorRT's default: 3)
    timing_cache: str | None = None
    fp16: bool = False


@dataclass
class BuildReport:
    output: str
    tensorrt_version: str
    profiles: list[ShapeProfile]
    fp16_requested: bool
    fp16_method: str | None  # "builder flag" (TRT 10) or "ONNX converted to fp16" (TRT 11)
    layer_precisions: dict[str, int]  # from the engine inspector, e.g. {"Half": 40, "Float": 2}
    timing_cache_saved: bool
    notes: list[str] = field(default_factory=list)
    # The built engine against the ONNX it came from (VerifyResult.to_dict()); None: not run.
    verification: dict | None = None


def parse_dims(text: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in text.split("x"))
    if any(d <= 0 for d in dims):
        raise BnfoldError(f"shape {text!r} has a zero dim: every dim must be at least 1")
    return dims


def parse_profile(text: str) -> ShapeProfile:
    """'input:1x3x224x224/8x3x224x224/32x3x224x224' (or one shape for min=opt=max)."""
    match = _PROFILE_RE.match(text.strip())
    if not match:
        raise BnfoldError(
            f"cannot read --shapes {text!r}: write NAME:MIN/OPT/MAX, e.g. "
            f"input:1x3x224x224/8x3x224x224/32x3x224x224"
        )
    name = match.group(1).strip()
    low = parse_dims(match.group(2))
    opt = parse_dims(match.group(3)) if match.group(3) else low
    high = parse_dims(match.group(4)) if match.group(4) else low
    if not len(low) == len(opt) == len(high):
        raise BnfoldError(f"--shapes {text!r}: min, opt and max must have the same rank")
    if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
        raise BnfoldError(f"--shapes {text!r}: every dim must satisfy min <= opt <= max")
    return ShapeProfile(name, low, opt, high)


def parse_profiles(values: tuple[str, ...] | list[str]) -> list[ShapeProfile]:
    profiles = [parse_profile(v) for v in values]
    names = [p.name for p in profiles]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise BnfoldError(f"--shapes gives {', '.join(duplicated)} more than once: give each once")
    return profiles


def parse_size(text: str) -> int:
    """'1G' -> 1073741824; accepts K/M/G/T (binary), optional 'B'/'iB', or plain bytes."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise BnfoldError(f"cannot read size {text!r}: write e.g. 512M or 2G")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if value < 1:
        raise BnfoldError(f"size {text!r} is zero: give at least 1 byte")
    return int(value)


def profiles_for_model(model: onnx.ModelProto, given: list[ShapeProfile]) -> list[ShapeProfile]:
    """Profiles for every input with a dynamic dim; checks `given` against the model.

    Static inputs need no profile; a profile given for one must match its dims exactly.
    """
    from bnfold.verification.inputs import graph_inputs

    inputs = {vi.name: vi for vi in graph_inputs(model)}
    by_name = {p.name: p for p in given}
    unknown = sorted(set(by_name) - set(inputs))
    if unknown:
        raise BnfoldError(
            f"--shapes names {', '.join(unknown)}, which the model does not take; its inputs "
            f"are: {', '.join(sorted(inputs)) or '(none)'}"
        )
    profiles = []
    for name, value in inputs.items():
        dims = _declared_dims(value)
        profile = by_name.get(name)
        if profile is None:
            if dims is None or any(d is None for d in dims):
                raise BnfoldError(
                    f"input {name!r} has dynamic dims {_show(dims)}: give a profile with "
                    f"--shapes {name}:MIN/OPT/MAX, e.g. {name}:{_example(dims)}"
                )
            continue
        if dims is not None:
            if len(dims) != len(profile.min):
                raise BnfoldError(
                    f"--shapes {name} has rank {len(profile.min)} but the input has rank "
                    f"{len(dims)} {_show(dims)}: give {len(dims)} dims"
                )
            for axis, d in enumerate(dims):
                if d is not None and not profile.min[axis] == profile.max[axis] == d:
                    raise BnfoldError(
                        f"--shapes {name}: dim {axis} is fixed at {d} in the model; use {d} "
                        f"for min, opt and max there"
                    )
        profiles.append(profile)
    return profiles


def check_in_profile(profile: ShapeProfile, shape: tuple[int, ...]) -> None:
    """Refuse a run shape the engine was not built for."""
    if not profile.contains(tuple(shape)):
        raise BnfoldError(
            f"input {profile.name!r} shape {_fmt(shape)} is outside the engine's profile "
            f"(min {_fmt(profile.min)}, max {_fmt(profile.max)}): pick a shape inside it with "
            f"--shape, or rebuild with bnfold build --shapes {profile.name}:MIN/OPT/MAX"
        )


def _declared_dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tensor_type.shape.dim]


def _show(dims) -> str:
    if dims is None:
        return "(unknown rank)"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _example(dims) -> str:
    if dims is None:
        return "1x3x224x224/8x3x224x224/32x3x224x224"
    low = "x".join("1" if d is None else str(d) for d in dims)
    opt = "x".join("8" if d is None else str(d) for d in dims)
    high = "x".join("32" if d is None else str(d) for d in dims)
    return f"{low}/{opt}/{high}"


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)
