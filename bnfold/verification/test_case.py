"""ONNX test-case folders, verified against the outputs stored in them.

A test case is a folder holding `model.onnx` and `test_data_set_N/` folders of `input_K.pb` and
`output_K.pb` TensorProtos: the layout of the onnx package's backend tests (its
`pytorch-converted/`, `pytorch-operator/` and `simple/` data), of the old model zoo's archives,
and of what `bnfold verify --repro` writes. `bnfold verify CASE [CANDIDATE]` runs the candidate
(the case's own model unless one is given: its folded version, say) on every stored input set,
in ONNX Runtime with optimisation off or on `--engine`, and judges it against the stored
outputs. No reference model runs: the stored outputs are the reference.

They were computed elsewhere (PyTorch, Caffe2, another runtime), so bnfold's float32 tolerance,
calibrated on ONNX Runtime's own rounding, does not apply. The default is the tolerance the
onnx backend test runner uses for these files, rtol 1e-3 and atol 1e-7, applied scale-relative
as in every bnfold judgement (|a − b| ≤ atol + rtol·max|a|), or the engine's precision's when
looser; --rtol/--atol replace it. Integer and bool outputs must be equal.

Stored tensors map to the model's inputs and outputs by name when every name matches, else by
position, as onnx's runner and onnx_test_runner read them. A stored tensor is checked against
its file's size before it is decoded, and must carry its data inline.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.verification.comparison import PRECISION_TOLERANCES, coarser_precision

# (rtol, atol): what onnx's backend test runner (onnx.backend.test.runner) allows by default.
TEST_CASE_TOLERANCE = (1e-3, 1e-7)
_DATA_SET = re.compile(r"^test_data_set_(\d+)$")
_TENSOR_FILE = re.compile(r"^(input|output)_(\d+)\.pb$")


@dataclass
class TestCase:
    folder: str
    model_path: str
    model: onnx.ModelProto  # its graph, weights left in the file
    data_sets: list[str]  # folder names, in numeric order
    feeds: list[dict[str, np.ndarray]]
    expected: list[dict[str, np.ndarray]]

    def describe(self) -> dict:
        return {"folder": self.folder, "model": self.model_path, "data_sets": self.data_sets,
                "outputs": list(self.expected[0])}


CASE_OPTIONS_REFUSED = (
    "a test-case folder brings its inputs and its reference outputs: --inputs, --shape, --runs, "
    "--seed, --locate and --repro do not apply (to locate, verify CASE/model.onnx against the "
    "candidate)")


def is_test_case(source) -> bool:
    """Whether `source` names a folder (which must then be a test case)."""
    return isinstance(source, (str, os.PathLike)) and os.path.isdir(source)


def load_test_case(folder: str | os.PathLike) -> TestCase:
    """The case in `folder`: its model's path and every stored input and output set."""
    from bnfold.verification.inputs import graph_inputs
    from bnfold.verification.model_sources import load_source

    folder = os.fspath(folder)
    sets = sorted(((int(m.group(1)), name) for name in os.listdir(folder)
                   if (m := _DATA_SET.match(name))
                   and os.path.isdir(os.path.join(folder, name))))
    model_path = _model_in(folder) if sets else None
    if model_path is None:
        raise BnfoldError(
            f"{folder!r} is a folder but not an ONNX test case (model.onnx and "
            f"test_data_set_N/ folders of input_K.pb and output_K.pb){_pointer(folder)}: give "
            f"a model file, or a test-case folder")
    model = load_source(model_path)[0]
    inputs, outputs = graph_inputs(model), list(model.graph.output)
    feeds, expected = [], []
    for _, name in sets:
        stored = _read_set(os.path.join(folder, name))
        feeds.append(_bind(stored["input"], inputs, f"{name}: input", check_types=True))
        expected.append(_bind(stored["output"], outputs, f"{name}: output"))
        if not expected[-1]:
            raise BnfoldError(f"{os.path.join(folder, name)!r} holds no output_K.pb: a test "
                              f"case without outputs cannot be judged")
    if any(set(e) != set(expected[0]) for e in expected):
        raise BnfoldError(f"the data sets in {folder!r} store different outputs: give each the "
                          f"same output_K.pb files")
    return TestCase(folder, model_path, model, [name for _, name in sets], feeds, expected)


def _model_in(folder: str) -> str | None:
    """model.onnx, else the folder's one .onnx file (the model zoo's later archives name it
    after the model); None when there is neither."""
    named = os.path.join(folder, "model.onnx")
    if os.path.isfile(named):
        return named
    found = [name for name in os.listdir(folder) if name.endswith(".onnx")
             and os.path.isfile(os.path.join(folder, name))]
    if len(found) > 1:
        raise BnfoldError(f"{folder!r} holds {len(found)} .onnx files and no model.onnx: "
                          f"name the test case's model model.onnx")
    return os.path.join(folder, found[0]) if found else None


def _pointer(folder: str) -> str:
    """onnx's own `data/real/` folders hold only data.json, naming where the model is."""
    import json

    try:
        with open(os.path.join(folder, "data.json"), encoding="utf-8") as stream:
            url = json.load(stream).get("url")
    except (OSError, ValueError, AttributeError):
        return ""
    return f"; its data.json only points to {url!r}" if isinstance(url, str) else ""


def _read_set(path: str) -> dict[str, list[onnx.TensorProto]]:
    """input_K.pb and output_K.pb of one data set, each kind in numeric order of K."""
    found: dict[str, list[tuple[int, str]]] = {"input": [], "output": []}
    for name in os.listdir(path):
        match = _TENSOR_FILE.match(name)
        if match:
            found[match.group(1)].append((int(match.group(2)), name))
    tensors = {}
    for kind, files in found.items():
        numbers = sorted(number for number, _ in files)
        if numbers != list(range(len(numbers))):
            raise BnfoldError(f"{path!r}: {kind}_K.pb files are numbered {numbers}, not 0 to "
                              f"{len(numbers) - 1}: a file is missing")
        tensors[kind] = [_read_tensor(os.path.join(path, name)) for _, name in sorted(files)]
    return tensors


def _read_tensor(path: str) -> tuple[str, np.ndarray]:
    """The stored tensor's name and value, its declared size checked against the file's."""
    with open(path, "rb") as stream:
        data = stream.read()
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise BnfoldError(f"{path!r} is not a TensorProto ({exc}): only tensors are fed, not "
                          f"sequences, maps or optionals") from None
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise BnfoldError(f"{path!r} keeps its data in another file: store it inline")
    if any(d < 0 for d in tensor.dims):
        raise BnfoldError(f"{path!r} declares a negative dimension {list(tensor.dims)}")
    # Every encoding spends at least a quarter byte per value (2-bit types): a tensor declaring
    # more values than that is refused before numpy allocates it.
    declared = math.prod(tensor.dims)
    if declared > 4 * len(data) + 4:
        raise BnfoldError(f"{path!r} declares {declared:,} values in a {len(data):,}-byte file: "
                          f"it is damaged")
    try:
        value = numpy_helper.to_array(tensor)
    except Exception as exc:  # wrong data length, unknown type
        raise BnfoldError(f"{path!r} cannot be read as a tensor ({exc})") from None
    return tensor.name, value


def _bind(stored: list[tuple[str, np.ndarray]], slots: list[onnx.ValueInfoProto], what: str,
          check_types: bool = False) -> dict[str, np.ndarray]:
    """Stored tensors by the model's names: by their own names when all match, else by
    position; an input must be a tensor of the slot's element type."""
    names = [name for name, _ in stored]
    known = {vi.name: vi for vi in slots}
    if names and all(name in known for name in names) and len(set(names)) == len(names):
        chosen = [known[name] for name in names]
    elif len(stored) > len(slots) or (check_types and len(stored) != len(slots)):
        raise BnfoldError(f"{what}s: {len(stored)} stored, the model has {len(slots)} "
                          f"({', '.join(vi.name for vi in slots) or 'none'})")
    else:
        chosen = slots[:len(stored)]
    bound = {}
    for index, (slot, (_, value)) in enumerate(zip(chosen, stored)):
        kind = slot.type.WhichOneof("value")
        if kind not in (None, "tensor_type"):
            raise BnfoldError(f"{what} {slot.name!r} is a {kind.replace('_type', '')}: bnfold "
                              f"verifies tensor inputs and outputs only")
        elem = slot.type.tensor_type.elem_type
        if check_types and elem and value.dtype != onnx.helper.tensor_dtype_to_np_dtype(elem):
            raise BnfoldError(f"{what}_{index}.pb holds {value.dtype} but the model's input "
                              f"{slot.name!r} is {onnx.TensorProto.DataType.Name(elem)}")
        bound[slot.name] = value
    return bound


def verify_test_case(folder, candidate=None, *, atol=None, rtol=None, ground_truth=None,
                     timeout=None, engine: str | None = None, engine_options=None,
                     tolerance_precision: str | None = None,
                     torch_checkpoint: str | None = None):
    """`bnfold verify CASE [CANDIDATE] [--engine E]`: the candidate (the case's model unless
    given) run on every stored input set, judged against the stored outputs."""
    from bnfold.verification.ground_truth import record_ground_truth
    from bnfold.verification.model_sources import load_source
    from bnfold.verification.on_engine import (
        _engine_record,
        _vetted_candidate,
        drift_note,
        run_candidate,
        run_to_run,
    )
    from bnfold.verification.ort_runner import OrtRunner
    from bnfold.verification.runs import VerifyResult, judge_outputs, weight_precision

    case = load_test_case(folder)
    own = candidate is None
    candidate = case.model_path if own else candidate
    runner = OrtRunner(timeout)
    notes: list[str] = []
    run = None
    if engine is None:
        cand_model, payload = (case.model, candidate) if own else load_source(candidate)
        session = runner.session(payload, "candidate", advice="run it on another engine "
                                 "with --engine, or check the model with onnx.checker")
        outputs = [runner.run(session, feed, "candidate", advice=f"the inputs stored in "
                              f"{name} of {case.folder!r} do not fit it")
                   for feed, name in zip(case.feeds, case.data_sets)]
        del session
    else:
        cand_model = None
        run = run_candidate(_vetted_candidate(candidate, engine), engine, engine_options,
                            case.feeds, timeout, torch_checkpoint, notes, list(case.expected[0]))
        outputs = run.outputs
    for name in case.expected[0]:
        if name not in outputs[0]:
            raise BnfoldError(f"the candidate has no output {name!r}, which {case.folder!r} "
                              f"stores: give a model with the test case's outputs")
    judged_as = tolerance_precision or coarser_precision(
        run.precision.compute if run else None, weight_precision(cand_model or case.model))
    default_rtol, default_atol = _default_tolerance(judged_as)
    used_rtol = default_rtol if rtol is None else rtol
    used_atol = default_atol if atol is None else atol
    # Explicit tolerances: the stored outputs are the reference; ORT's noise says nothing of them.
    metrics = judge_outputs(runner, None, case.feeds, case.expected,
                            [{n: out[n] for n in case.expected[0]} for out in outputs],
                            used_atol, used_rtol, judged_as, noise_floor=False)
    unjudged = sorted(set(outputs[0]) - set(case.expected[0]))
    if unjudged:
        notes.append(f"the test case stores no value for output(s) {', '.join(unjudged)}: "
                     f"not judged")
    result = VerifyResult(all(m.ok for m in metrics), metrics, len(case.feeds), 0, notes=notes,
                          shapes={k: list(v.shape) for k, v in case.feeds[0].items()})
    result.test_case = case.describe() | {
        "candidate": (os.fspath(candidate) if isinstance(candidate, (str, os.PathLike))
                      else "(in memory)"),
        "rtol": used_rtol, "atol": used_atol,
        "tolerance_from": ("--rtol/--atol" if rtol is not None or atol is not None else
                           f"{judged_as} precision" if judged_as and default_rtol >
                           TEST_CASE_TOLERANCE[0] else "onnx's backend test runner"),
    }
    if run is not None:
        result.engine = _engine_record(run.backend, run.precision, judged_as, tolerance_precision,
                                       used_atol, used_rtol, case.expected[0]) | {
            "tolerance_from": result.test_case["tolerance_from"],
            "explicit_tolerance": rtol is not None or atol is not None,
            "run_to_run": run_to_run(outputs[0], run.again)}
        if result.engine["run_to_run"]:
            notes.append(drift_note(engine, result.engine["run_to_run"]))
    if set(case.expected[0]) == {o.name for o in case.model.graph.output}:
        record_ground_truth(result, case.model_path, case.model, ground_truth, case.feeds[0],
                            case.expected[0], outputs[0])
    else:
        result.ground_truth_skipped = "the test case stores only some of the model's outputs"
    return result


def _default_tolerance(precision: str | None) -> tuple[float, float]:
    """TEST_CASE_TOLERANCE, or the compute precision's when looser."""
    rtol, atol = TEST_CASE_TOLERANCE
    if precision is not None:
        p_rtol, p_atol = PRECISION_TOLERANCES[precision]
        rtol, atol = max(rtol, p_rtol), max(atol, p_atol)
    return rtol, atol
