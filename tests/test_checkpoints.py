"""Checkpoints as people have them: what load_state_dict(strict=True) accepts, wrappers' key
prefixes, training-script containers, and a real reason for each file that cannot be loaded."""

from __future__ import annotations

import argparse
import collections

import click
import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

import user_models  # noqa: E402

from bnfold.pytorch import zoo  # noqa: E402
from bnfold.cli.common import BnfoldGroup  # noqa: E402
from bnfold.cli.torch_commands import export_command  # noqa: E402
from bnfold.errors import BnfoldError  # noqa: E402

SPEC = "user_models:two_inputs"


def source_model():
    return zoo.randomize_batchnorm(user_models.two_inputs(), seed=7)


def outputs(model):
    generator = torch.Generator().manual_seed(0)
    image, side = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 5, generator=generator)
    with torch.no_grad():
        return model(image, side)


def without_num_batches_tracked(state, version=None):
    kept = collections.OrderedDict((k, v) for k, v in state.items()
                                   if not k.endswith("num_batches_tracked"))
    if version is not None:  # what an old torch wrote: BN at metadata version 1
        kept._metadata = collections.OrderedDict(
            (k, {"version": version}) for k in state._metadata)
    return kept


def prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


# name -> (what to save given the source state_dict, notes expected)
LOADABLE = {
    "plain": (lambda s: s, []),
    "no-num_batches_tracked": (lambda s: dict(without_num_batches_tracked(s)), []),
    "no-num_batches_tracked-v1": (lambda s: without_num_batches_tracked(s, version=1), []),
    "dataparallel": (lambda s: prefixed(s, "module."), [
        "stripped the key prefix 'module.' from the checkpoint (saved from a wrapper such as "
        "DataParallel or Lightning)"]),
    "lightning": (lambda s: {"epoch": 3, "global_step": 10, "state_dict": prefixed(s, "model."),
                             "hyper_parameters": {"lr": 0.1}}, [
        "loaded the state_dict under the checkpoint's 'state_dict' key",
        "stripped the key prefix 'model.' from the checkpoint (saved from a wrapper such as "
        "DataParallel or Lightning)"]),
    "model_state_dict": (lambda s: {"epoch": 1, "model_state_dict": s, "loss": 0.5},
                         ["loaded the state_dict under the checkpoint's 'model_state_dict' key"]),
    "model": (lambda s: {"model": prefixed(prefixed(s, "module."), "model."), "step": 4}, [
        "loaded the state_dict under the checkpoint's 'model' key",
        "stripped the key prefix 'model.module.' from the checkpoint (saved from a wrapper such "
        "as DataParallel or Lightning)"]),
}


@pytest.mark.parametrize("name", list(LOADABLE))
def test_loadable_checkpoints(name, tmp_path):
    source = source_model()
    make, expected_notes = LOADABLE[name]
    path = tmp_path / "c.pt"
    torch.save(make(source.state_dict()), path)
    notes = []
    loaded = zoo.create(SPEC, str(path), notes=notes)
    assert notes == expected_notes
    a, b = outputs(source), outputs(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_num_batches_tracked_follows_torch_strict_loading(tmp_path):
    # Saved by current torch (BN metadata version 2) and then edited: torch's strict load
    # refuses it, and so does bnfold; without metadata (version 1 / none) both accept.
    state = without_num_batches_tracked(source_model().state_dict())
    state._metadata = source_model().state_dict()._metadata
    with pytest.raises(RuntimeError, match="Missing key"):
        user_models.two_inputs().load_state_dict(state, strict=True)
    path = tmp_path / "v2.pt"
    torch.save(state, path)
    with pytest.raises(BnfoldError, match=r"does not fit the model \(missing bn.num_batches_tracked, "
                                          r"fc_bn.num_batches_tracked\)"):
        zoo.create(SPEC, str(path))


REFUSED_BY_WEIGHTS_ONLY = ("which weights_only=True loading refuses (bnfold loads no other way: "
                           "it never runs a file's code): save only tensors, e.g. "
                           "torch.save(model.state_dict(), path), or re-save the checkpoint with "
                           "plain types (dict, list, str, int, float, tensors) in place of that "
                           "object")
NUMPY_SCALAR = np.float64(0.9).__reduce__()[0]  # numpy.core or numpy._core, by numpy version


@pytest.mark.parametrize("name, write, message", [
    ("pickled-module", lambda p: torch.save(user_models.two_inputs(), p),
     "is a pickled Python object (it needs class user_models.TwoInputs), not a state_dict: "
     "bnfold loads weights only (weights_only=True) and never runs a file's code; where the "
     "model is built, save it with torch.save(model.state_dict(), path)"),
    ("garbage", lambda p: p.write_bytes(b"not a checkpoint at all"),
     "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; it starts "
     "with b'not '): save it with torch.save(model.state_dict(), path)"),
    ("truncated", lambda p: (torch.save(source_model().state_dict(), p),
                             p.write_bytes(p.read_bytes()[:300])),
     "is a damaged or truncated torch.save archive (PytorchStreamReader failed reading zip "
     "archive: failed finding central directory): copy it again or re-save it"),
    ("no-state_dict", lambda p: torch.save({"epoch": 2, "weights": source_model().state_dict(),
                                            "optimizer": {"lr": 0.1}}, p),
     "holds no state_dict of tensors (top-level keys: epoch, weights, optimizer; none of "
     "state_dict, model_state_dict, model holds one): save it with "
     "torch.save(model.state_dict(), path)"),
    ("list", lambda p: torch.save([torch.zeros(1)], p),
     "holds a list, not a state_dict of tensors: save it with torch.save(model.state_dict(), "
     "path)"),
    # A training script's extras beside the state_dict: its argparse args, a numpy metric.
    ("args-beside-state_dict",
     lambda p: torch.save({"state_dict": source_model().state_dict(),
                           "args": argparse.Namespace(lr=0.1)}, p),
     f"holds an object of type argparse.Namespace inside its top-level dict, "
     f"{REFUSED_BY_WEIGHTS_ONLY}"),
    ("numpy-metric", lambda p: torch.save({"model": source_model().state_dict(),
                                           "best_acc": np.float64(0.9)}, p),
     f"holds a numpy value ({NUMPY_SCALAR.__module__}.{NUMPY_SCALAR.__name__}) inside its "
     f"top-level dict, {REFUSED_BY_WEIGHTS_ONLY}"),
    # torch's weights-only unpickler stops at protocol 4's first FRAME opcode (149)
    ("protocol-4", lambda p: torch.save(source_model().state_dict(), p, pickle_protocol=4),
     "was saved with pickle protocol 4, which weights_only=True loading cannot read "
     "(unsupported opcode 149): re-save it with torch.save's default protocol (no "
     "pickle_protocol argument)"),
    ("legacy-format-list", lambda p: torch.save([source_model().state_dict(),
                                                 argparse.Namespace(lr=0.1)], p,
                                                _use_new_zipfile_serialization=False),
     f"holds an object of type argparse.Namespace inside its top-level list, "
     f"{REFUSED_BY_WEIGHTS_ONLY}"),
])
def test_unloadable_checkpoints_say_why(name, write, message, tmp_path, recwarn):
    path = tmp_path / "c.pt"
    write(path)
    recwarn.clear()
    with pytest.raises(BnfoldError) as info:
        zoo.create(SPEC, str(path))
    assert str(info.value) == f"checkpoint {str(path)!r} {message}"
    assert "\x1b" not in str(info.value)
    assert [str(w.message) for w in recwarn] == []  # torch.load's warnings are in the message


def test_cli_prints_the_notes_and_exports(tmp_path):
    @click.group(cls=BnfoldGroup)
    def group():
        pass

    group.add_command(export_command)
    path = tmp_path / "c.pt"
    torch.save(prefixed(source_model().state_dict(), "module."), path)
    result = CliRunner().invoke(group, [
        "export", "--model", SPEC, "--checkpoint", str(path), "--input-shape", "2x3x8x8",
        "--input-shape", "2x5", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps at the terminal width
    assert "note: stripped the key prefix 'module.' from the checkpoint" in output
    assert "BatchNorm: 3 calls in the eval forward (2 modules) → 2 ONNX BatchNormalization " \
           "nodes" in output
