"""A second opinion for `bnfold export`'s parity check, from the model run in float64.

torch and ONNX Runtime are both float32 and differ in summation order only, so parity is
normally within 1e-4 of the output scale. A network that amplifies rounding (deep, with large
activations, or untrained statistics) can make two float32 runs differ by far more: torch
itself can be 2% away from the float64 result. Then a gap between torch and the export does
not mean the trace went wrong. Both are measured against the model run in float64. The export
is accepted when it is as close to float64 as torch's own float32 run is (within
AMPLIFICATION times, plus the usual bound). A trace that took another branch is far from float64
while torch is near it. When even torch is more than UNCHECKABLE of the scale away, nothing
can be told apart on these inputs, and the export is refused with that reason.
"""

from __future__ import annotations

import copy

import numpy as np

AMPLIFICATION = 8.0
UNCHECKABLE = 0.1


def float64_verdict(torch, call, runs, rtol: float) -> tuple[bool, str] | None:
    """(accepted, what float64 says) for `runs`, a list of (input tensors, torch float32
    outputs, ONNX Runtime outputs) as numpy-able lists; None when the model does not run in
    float64 (a forward that builds float32 tensors of its own, a module that cannot be
    copied), so there is no second opinion."""
    try:
        double = copy.deepcopy(call).double()
    except Exception:  # a user's module may refuse to be copied or converted
        return None
    from bnfold.pytorch.zoo.prepare import flatten_outputs

    torch_error = export_error = scale = 0.0
    for tensors, expected, got in runs:
        inputs = [t.double() if t.is_floating_point() else t for t in tensors]
        try:
            with torch.no_grad():
                reference = [t for _, t in flatten_outputs(double(*inputs))]
        except Exception:  # the forward may mix in float32 tensors of its own
            return None
        for ref, e, g in zip(reference, expected, got):
            ref = ref.detach().numpy()
            e = e.detach().double().numpy()
            g = np.asarray(g, dtype=np.float64)
            if ref.shape != e.shape or ref.shape != g.shape:
                return None
            both = np.isfinite(ref) & np.isfinite(e) & np.isfinite(g)
            if not np.array_equal(both, np.isfinite(ref)):
                return None
            torch_error = max(torch_error, _max_gap(e, ref, both))
            export_error = max(export_error, _max_gap(g, ref, both))
            scale = max(scale, float(np.max(np.abs(ref[both]), initial=0.0)))
    if scale == 0.0:
        return None
    torch_rel, export_rel = torch_error / scale, export_error / scale
    said = (f"against the model in float64, torch's float32 output is {torch_rel:.3g} of the "
            f"output scale away and the export {export_rel:.3g}")
    if torch_rel > UNCHECKABLE:
        return False, (f"{said}: the network amplifies float32 rounding so much on these "
                       "inputs that no export can be checked; give real inputs with --inputs "
                       "file.npz (or load trained weights)")
    if export_error <= AMPLIFICATION * torch_error + rtol * scale:
        return True, (f"{said}: the network amplifies float32 rounding, and the export is as "
                      "close to float64 as torch is (parity judged against float64)")
    return False, said


def _max_gap(values: np.ndarray, reference: np.ndarray, where: np.ndarray) -> float:
    return float(np.max(np.abs(values[where] - reference[where]), initial=0.0))
