"""Datasets as numpy arrays: sklearn's 8×8 digits by default, or a user .npz file.

A .npz holds x_train, y_train, x_test, y_test (first axis = samples). Classification labels are
integers; a float y the same shape as the model output is treated as a regression target.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from bnfold.errors import BnfoldError

DIGITS = "digits"
# The digits split is fixed (not tied to --seed) so every run is scored on the same test set.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25
KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # float32
    y_train: np.ndarray  # int64 labels, or float32 targets
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def is_classification(self) -> bool:
        return self.y_train.dtype == np.int64

    def describe(self) -> str:
        return (f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test samples of "
                f"shape {tuple(self.x_train.shape[1:])}")


def load_dataset(spec: str = DIGITS) -> Dataset:
    """`digits` (sklearn, pixels scaled to [0, 1], fixed stratified split) or a .npz path."""
    if spec == DIGITS:
        return load_digits()
    return load_npz(spec)


def load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise BnfoldError(
            "the digits data set needs scikit-learn: pip install 'bnfold[torch]', or pass --data file.npz"
        ) from None
    digits = sk_load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return Dataset("digits 8x8", x_train, y_train, x_test, y_test)


def load_npz(path: str | os.PathLike) -> Dataset:
    arrays = _read_npz(path, KEYS)
    name = os.path.basename(os.fspath(path))
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim < 2 or len(x) == 0:
            raise BnfoldError(
                f"{name}: x_{part} has shape {x.shape}: it needs one row per sample "
                "(at least 2-D and not empty)"
            )
        if len(x) != len(y):
            raise BnfoldError(
                f"{name}: x_{part} has {len(x)} samples but y_{part} has {len(y)}: make them equal"
            )
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise BnfoldError(
            f"{name}: x_train samples are {arrays['x_train'].shape[1:]} but x_test samples are "
            f"{arrays['x_test'].shape[1:]}: make them the same shape"
        )
    x_train, x_test = (_float_array(name, k, arrays[k]) for k in ("x_train", "x_test"))
    y_train, y_test = _targets(name, arrays["y_train"], arrays["y_test"])
    return Dataset(name, x_train, y_train, x_test, y_test)


def load_inputs(path: str | os.PathLike, float_dtype: str = "float32") -> np.ndarray:
    """Only the inputs (x_train, else x) of a .npz file, e.g. for BN recalibration.

    Integer and bool arrays (token ids, masks) keep their dtype: casting ids to float would
    feed an Embedding floats. Float arrays become `float_dtype` (the model's)."""
    name = os.path.basename(os.fspath(path))
    arrays = _read_npz(path, ())
    key = "x_train" if "x_train" in arrays else "x" if "x" in arrays else None
    if key is None:
        raise BnfoldError(f"{name} has no x_train (or x) array: save one with np.savez(path, x_train=...)")
    if np.issubdtype(arrays[key].dtype, np.integer) or arrays[key].dtype == np.bool_:
        x = arrays[key]
    else:
        x = _float_array(name, key, arrays[key]).astype(float_dtype)
    if x.ndim < 2 or len(x) == 0:
        raise BnfoldError(f"{name}: {key} has shape {x.shape}: it needs one row per sample")
    return x


def require_labels(data: Dataset, classes: int) -> None:
    """Check that `data` is a classification set with labels in [0, classes)."""
    if not data.is_classification:
        raise BnfoldError(f"{data.name}: y_train must hold integer class labels for this model")
    for part, y in (("train", data.y_train), ("test", data.y_test)):
        if y.ndim != 1 or y.min(initial=0) < 0 or y.max(initial=0) >= classes:
            raise BnfoldError(
                f"{data.name}: y_{part} must be 1-D labels in 0..{classes - 1}: check the file"
            )


def _read_npz(path, keys) -> dict[str, np.ndarray]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BnfoldError(f"data file {path!r} does not exist: pass 'digits' or an existing .npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise BnfoldError(
                    f"{os.path.basename(path)} lacks {', '.join(missing)}: save it with "
                    "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
                )
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BnfoldError(
            f"cannot read {path!r} as .npz ({str(exc)[:120]}): write it with np.savez (no object arrays)"
        ) from None


def _float_array(name: str, key: str, x: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise BnfoldError(f"{name}: {key} has dtype {x.dtype}: it must be numeric")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise BnfoldError(f"{name}: {key} contains NaN or infinity: clean the data first")
    return x


def _targets(name: str, y_train: np.ndarray, y_test: np.ndarray):
    if np.issubdtype(y_train.dtype, np.integer) and np.issubdtype(y_test.dtype, np.integer):
        return y_train.astype(np.int64), y_test.astype(np.int64)
    return _float_array(name, "y_train", y_train), _float_array(name, "y_test", y_test)
