"""What `bnfold export` feeds the model: one `InputSpec` per forward argument.

A spec is parsed from `[NAME:]DIMS[:DTYPE]` (numpy only; the CLI parses without torch):

    1x3x224x224                      one float input (dtype: the model's own float dtype)
    ids:2x16:int64                   token ids for an Embedding, named after forward(ids, ...)
    batch=1x3xheight=64xwidth=64     symbolic dims (kept dynamic in the ONNX) with example sizes
    x:1,3,max_len=32                 commas instead of x, for dim names that contain an x

or taken from example arrays (a .npz with one array per forward argument, by name or in order
as arr_0, arr_1, ...), which fix shapes and dtypes. Inputs without a name take the forward
signature's names in order. `resolve_inputs` (torch) matches specs to the signature.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np

from bnfold.errors import BnfoldError

DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float64": "float64", "double": "float64", "fp64": "float64",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}
_DIM_RE = re.compile(r"^(?:([A-Za-z_][\w.]*)=)?(\d+)$")
_DYNAMIC_RE = re.compile(r"^(?:([^:=]+):)?(\d+)(?:=([A-Za-z_][\w.]*))?$")
EXAMPLE = "1x3x224x224, ids:2x16:int64 or batch=1x3xheight=64xwidth=64"


@dataclass
class InputSpec:
    """One forward argument: example sizes, the dims kept symbolic, dtype, optional example."""

    dims: tuple[int, ...]
    name: str | None = None  # None: the forward signature's name at this position
    dtype: str | None = None  # numpy dtype name; None: the model's floating dtype
    symbols: dict[int, str] = field(default_factory=dict)  # axis -> symbolic dim name
    example: np.ndarray | None = None

    def describe(self) -> str:
        dims = "x".join(f"{self.symbols[i]}={d}" if i in self.symbols else str(d)
                        for i, d in enumerate(self.dims))
        return f"{self.name}:{dims}:{self.dtype}"


def parse_input_spec(text: str) -> InputSpec:
    """'ids:batch=2x16:int64' -> InputSpec((2, 16), 'ids', 'int64', {0: 'batch'})."""
    parts = text.strip().split(":")
    name = dtype = None
    if len(parts) == 3:
        name, dims_text, dtype = parts
    elif len(parts) == 2 and parts[1].strip().lower() in DTYPES:
        dims_text, dtype = parts
    elif len(parts) == 2:
        name, dims_text = parts
    elif len(parts) == 1:
        dims_text = parts[0]
    else:
        raise BnfoldError(f"cannot read input {text!r}: write [NAME:]DIMS[:DTYPE], e.g. {EXAMPLE}")
    if dtype is not None:
        dtype = _dtype(dtype, text)
    if name is not None and not name.strip():
        raise BnfoldError(f"input {text!r} has an empty name: write NAME:DIMS, e.g. ids:2x16:int64")
    separator = "," if "," in dims_text else "x"
    dims, symbols = [], {}
    for axis, token in enumerate(dims_text.strip().split(separator)):
        match = _DIM_RE.match(token.strip())
        if not match:
            hint = (f"give the symbolic dim an example size, e.g. {token.strip()}=64"
                    if re.match(r"^[A-Za-z_]\w*$", token.strip()) else f"e.g. {EXAMPLE}")
            raise BnfoldError(f"cannot read dim {token!r} of input {text!r}: {hint}")
        size = int(match.group(2))
        if size < 1:
            raise BnfoldError(f"input {text!r} has a zero dim: every dim must be at least 1")
        dims.append(size)
        if match.group(1):
            symbols[axis] = match.group(1)
    return InputSpec(tuple(dims), name.strip() if name else None, dtype, symbols)


def parse_dynamic(text: str) -> tuple[str | None, int, str | None]:
    """'[NAME:]AXIS[=SYMBOL]' -> (input name or None for the first input, axis, symbol)."""
    match = _DYNAMIC_RE.match(text.strip())
    if not match:
        raise BnfoldError(
            f"cannot read dynamic dim {text!r}: write [INPUT:]AXIS[=NAME], e.g. 2=height or "
            "ids:1=length"
        )
    return match.group(1), int(match.group(2)), match.group(3)


def _dtype(text: str, context: str) -> str:
    key = text.strip().lower()
    if key not in DTYPES:
        raise BnfoldError(
            f"unknown dtype {text!r} in {context!r}: use one of {', '.join(sorted(set(DTYPES.values())))}"
        )
    return DTYPES[key]


def specs_from_arrays(arrays: dict[str, np.ndarray]) -> list[InputSpec]:
    """One spec per example array; arr_0, arr_1, … (np.savez positional) stay unnamed."""
    specs = []
    positional = all(re.fullmatch(r"arr_\d+", k) for k in arrays)
    keys = sorted(arrays, key=lambda k: int(k[4:])) if positional else list(arrays)
    for key in keys:
        array = np.asarray(arrays[key])
        if array.dtype.name not in DTYPES.values():
            raise BnfoldError(
                f"example input {key!r} has dtype {array.dtype}: use float32/64/16, an integer "
                "type or bool"
            )
        if array.ndim == 0:
            array = array.reshape(())
        specs.append(InputSpec(tuple(int(d) for d in array.shape), None if positional else key,
                               array.dtype.name, {}, array))
    return specs


def load_example_npz(path: str | os.PathLike) -> list[InputSpec]:
    """The example inputs saved in a .npz (np.savez(path, ids=..., mask=...) or positional)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BnfoldError(f"inputs file {path!r} does not exist: check the path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BnfoldError(
            f"cannot read {path!r} as .npz ({str(exc).strip()[:120]}): write it with "
            "np.savez(path, name=array, ...) (no object arrays)"
        ) from None
    if not arrays:
        raise BnfoldError(f"{path!r} holds no arrays: save one per forward argument")
    return specs_from_arrays(arrays)
