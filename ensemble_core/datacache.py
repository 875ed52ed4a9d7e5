"""Data sets decoded once per machine (issue "Warm start"): uint8 arrays kept on disk beside their source.

:func:`ensemble_core.data.load_dataset` decodes its source every time a process first asks for a split: the
MNIST pickle takes about 3 s (float32 pixels read and rounded back to bytes), and every Ray Train worker of
every train job is a new process. :func:`load_dataset_cached` keeps the decoded split as raw ``.npy`` arrays
(images uint8, labels int64) in a cache folder and reads them back in milliseconds.

- **Same arrays.** A cached split is the arrays ``load_dataset`` returned when it was written; the unit tests
  check equality byte for byte.
- **Never stale.** The cache key hashes the data set, the split, the cache format and, for every source file,
  its resolved path, size and modification time: a replaced or touched source file is decoded again.
- **Safe under concurrency.** Two processes (the ranks of one DDP job) may write the same entry at once: each
  writes a private temporary file and renames it into place; a reader sees a whole entry or none.
- **Where.** ``ROBUST_ENSEMBLES_CACHE_DIR``, else ``$XDG_CACHE_HOME/robust-ensembles/datasets``, else
  ``~/.cache/robust-ensembles/datasets`` (the user's own folder, not a shared ``/tmp`` where another user
  could plant arrays). ``ROBUST_ENSEMBLES_CACHE_DIR=off`` turns the cache off; a folder that cannot be
  written is skipped silently (the split is then decoded as without a cache).
- The synthetic data set is generated, not read: it is never cached.

The training loop reads its data through this module; the evaluation reads through
:func:`ensemble_core.data.load_dataset` and its per-process cache (the evaluation's code fingerprint covers
``data.py``, not this file, and the arrays are the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ensemble_core.data import (
    DATASET_INFO,
    FASHION_MNIST_DEFAULT_DIR,
    TensorDataset,
    _find_idx,
    _mnist_pickle_path,
    load_dataset,
)

CACHE_ENV = "ROBUST_ENSEMBLES_CACHE_DIR"
CACHE_FORMAT = "robust-ensembles/dataset-cache-v1"
_OFF = ("off", "0", "no", "false", "none")


def cache_dir() -> Path | None:
    """The cache folder, or None when ``ROBUST_ENSEMBLES_CACHE_DIR`` turns the cache off."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    if raw.lower() in _OFF:
        return None
    if raw:
        return Path(raw)
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "robust-ensembles" / "datasets"


def source_files(name: str, data_dir: str | None = None) -> list[Path]:
    """The files :func:`~ensemble_core.data.load_dataset` reads for ``name`` (raises as it would when they are
    missing); empty for the synthetic data set, which is generated."""
    if name not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}")
    data_dir = data_dir or os.environ.get("ROBUST_ENSEMBLES_DATA_DIR")
    if name == "mnist":
        return [_mnist_pickle_path()]
    if name == "fashion_mnist":
        root = Path(data_dir or FASHION_MNIST_DEFAULT_DIR)
        if not root.is_dir():
            return []  # load_dataset names the problem
        return [_find_idx(root, f"{p}-{kind}-idx{d}-ubyte")
                for p in ("train", "t10k") for kind, d in (("images", 3), ("labels", 1))]
    if name in ("cifar10", "cifar100"):
        if not data_dir:
            return []
        root = Path(data_dir)
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (root / sub).is_dir():
                root = root / sub
        return sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    return []


def cache_key(name: str, split: str, files: list[Path]) -> str:
    """16 hex digits over the data set, the split, the cache format and each source file's path, size and
    modification time."""
    parts = [CACHE_FORMAT, name, split]
    for f in files:
        st = f.stat()
        parts.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def load_dataset_cached(name: str, split: str = "train", data_dir: str | None = None) -> TensorDataset:
    """:func:`~ensemble_core.data.load_dataset`, read from the machine's cache when the entry exists and
    written to it when not (see the module's docstring)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = cache_dir()
    files = source_files(name, data_dir) if folder is not None else []
    if folder is None or not files:
        return load_dataset(name, split, data_dir)
    entry = folder / f"{name}-{split}-{cache_key(name, split, files)}"
    images, labels = entry.with_suffix(".images.npy"), entry.with_suffix(".labels.npy")
    if images.is_file() and labels.is_file():
        try:
            x, y = np.load(images), np.load(labels)
            return TensorDataset(torch.from_numpy(x), torch.from_numpy(y), DATASET_INFO[name])
        except (OSError, ValueError):
            pass  # unreadable: decode again and rewrite it
    ds = load_dataset(name, split, data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # labels first: an entry counts as present once its images file is in place
        _write(labels, ds.labels.numpy())
        _write(images, ds.images.numpy())
    except OSError:
        pass  # a read-only or full cache folder: the decoded split is still right
    return ds


def _write(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
