"""`bnfold build`: turn an ONNX model into a TensorRT engine file, verified before it is kept.

The request (profiles, workspace, precision) is plain data in `bnfold.deploy.trt_options`; the
TensorRT calls live in `bnfold.deploy.engines.trt`.
"""

from __future__ import annotations

from bnfold.deploy.trt_options import (  # noqa: F401  (re-exported for callers of build)
    BuildOptions,
    BuildReport,
    ShapeProfile,
    parse_profiles,
    parse_size,
    profiles_for_model,
)
from bnfold.onnxio.staged_files import write_bytes_atomic


def build(model_path: str, output: str, options: BuildOptions, verify: bool = True,
          verify_options: dict | None = None) -> BuildReport:
    """Build `model_path` into a serialized TensorRT engine at `output` (written atomically).

    With `verify`, the engine is first written beside `output`, run by TensorRT against
    `model_path` run by ORT on the CPU (bnfold.verification.on_engine, at each profile's opt shape,
    tolerances of the precision the inspector reports), and only moved to `output` when
    equivalent; otherwise nothing is left at `output` and `report.verification` says why.
    """
    import os

    from bnfold.deploy.engines import trt as trt_engine
    from bnfold.onnxio.files import load_model

    trt_engine.require_tensorrt()
    model = load_model(model_path)
    options.profiles = profiles_for_model(model, options.profiles)
    plan, report = trt_engine.build_serialized(model, options)
    del model
    report.output = output
    if not verify:
        write_bytes_atomic(output, plan)
        return report
    unverified = output + ".unverified.engine"
    write_bytes_atomic(unverified, plan)
    try:
        report.verification = _verify_engine_file(model_path, unverified, options.profiles,
                                                   verify_options or {})
        if report.verification["ok"]:
            os.replace(unverified, output)
        else:
            report.output = ""
    finally:
        if os.path.exists(unverified):
            os.remove(unverified)
    return report


def _verify_engine_file(model_path: str, engine_path: str, profiles, verify_options) -> dict:
    from bnfold.verification.runs import verify

    shapes = dict(verify_options.pop("shapes", None) or {})
    for profile in profiles:
        shapes.setdefault(profile.name, profile.opt)
    return verify(model_path, engine_path, engine="trt", shapes=shapes, **verify_options).to_dict()
