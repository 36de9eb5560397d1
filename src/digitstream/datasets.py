"""Image data sets: scikit-learn's digits, MNIST-format IDX files, NumPy ``.npz``.

Every loader returns images as ``X`` of shape (n_samples, n_features), float64,
and labels ``y`` of shape (n_samples,).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from digitstream.errors import UserError


@dataclass
class Dataset:
    name: str  # the spec it was loaded from, e.g. "digits" or "idx:/data/mnist"
    X: np.ndarray  # (n_samples, n_features) float64
    y: np.ndarray  # (n_samples,)
    value_range: tuple[float, float]  # the range pixel values may take, e.g. (0, 16)

    @property
    def n_features(self) -> int:
        return self.X.shape[1]


def load_dataset(spec: str) -> Dataset:
    """Load ``digits``, ``idx:DIR`` or ``npz:FILE``; raise UserError with a reason."""
    if spec == "digits":
        # heavy: scikit-learn, for this data set only
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return Dataset("digits", bunch.data.astype(np.float64), bunch.target, (0.0, 16.0))
    kind, sep, where = spec.partition(":")
    if not sep or not where:
        raise UserError(f"unknown data set {spec!r}: expected digits, idx:DIR or npz:FILE")
    if kind == "idx":
        X, y = _load_idx_dir(Path(where))
        return Dataset(spec, X, y, (0.0, 255.0))
    if kind == "npz":
        X, y = _load_npz(Path(where))
        low, high = (float(X.min()), float(X.max())) if X.size else (0.0, 1.0)
        return Dataset(spec, X, y, (low, high))
    raise UserError(f"unknown data set kind {kind!r} in {spec!r}: expected idx:DIR or npz:FILE")


_IDX_DTYPES: dict[int, npt.DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in .gz) into an array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path} is not an IDX file (truncated header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise UserError(
            f"{path}: header says {shape} of {dtype} ({expected} bytes), "
            f"file holds {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzipped if the name ends in .gz); uint8 only."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _find(directory: Path, stem: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (directory / name).exists():
            return directory / name
    raise UserError(f"no {stem}[.gz] in {directory}")


def _load_idx_dir(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    if not directory.is_dir():
        raise UserError(f"IDX data set directory {directory} does not exist")
    images = read_idx(_find(directory, "train-images-idx3-ubyte"))
    labels = read_idx(_find(directory, "train-labels-idx1-ubyte"))
    if images.ndim < 2 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{directory}: {len(images)} images but {len(labels)} labels")
    return images.reshape(len(images), -1).astype(np.float64), labels.astype(np.int64)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "X" not in data or "y" not in data:
                raise UserError(f"{path} must hold arrays named X and y, has {sorted(data.files)}")
            X, y = data["X"], data["y"]
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if X.ndim < 2 or y.ndim != 1 or len(X) != len(y):
        raise UserError(
            f"{path}: X has shape {X.shape}, y has shape {y.shape}; "
            "expected (n, features...) and (n,)"
        )
    if not np.issubdtype(X.dtype, np.number):
        raise UserError(f"{path}: X must be numeric, is {X.dtype}")
    return X.reshape(len(X), -1).astype(np.float64), y
