"""The per-machine cache of decoded data sets (ensemble_core/datacache.py): same arrays, never stale, atomic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ensemble_core import datacache
from ensemble_core.data import DataUnavailableError, _load_fashion_arrays, load_dataset
from ensemble_core.datacache import CACHE_ENV, cache_dir, load_dataset_cached


def _idx(path: Path, data: bytes, dims: tuple[int, ...]) -> None:
    import struct

    path.write_bytes(struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(">" + "I" * len(dims), *dims) + data)


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST folder of 3 train and 2 test images with known pixels."""
    root = tmp_path / "fashion"
    root.mkdir()
    _idx(root / "train-images-idx3-ubyte", bytes(range(3)) * (28 * 28), (3, 28, 28))
    _idx(root / "train-labels-idx1-ubyte", bytes([7, 1, 9]), (3,))
    _idx(root / "t10k-images-idx3-ubyte", bytes([200, 3]) * (28 * 28), (2, 28, 28))
    _idx(root / "t10k-labels-idx1-ubyte", bytes([0, 4]), (2,))
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_the_cached_split_is_the_decoded_split_byte_for_byte(fashion_dir: Path, cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_dataset_cached("fashion_mnist", "train", str(fashion_dir))
    names = _entries(cache)
    assert len(names) == 2 and all(n.startswith("fashion_mnist-train-") for n in names)
    # the second read comes from the cache, not from the source: decoding now would fail
    monkeypatch.setattr(datacache, "load_dataset", lambda *a, **k: pytest.fail("decoded again"))
    second = load_dataset_cached("fashion_mnist", "train", str(fashion_dir))
    want = load_dataset("fashion_mnist", "train", str(fashion_dir))
    for got in (first, second):
        assert torch.equal(got.images, want.images) and got.images.dtype == torch.uint8
        assert torch.equal(got.labels, want.labels) and got.labels.tolist() == [7, 1, 9]
        assert got.info == want.info
    assert second.images[1, 0, 0, :3].tolist() == [1, 2, 0]


def test_a_changed_source_file_is_decoded_again(fashion_dir: Path, cache: Path) -> None:
    load_dataset_cached("fashion_mnist", "test", str(fashion_dir))
    _idx(fashion_dir / "t10k-labels-idx1-ubyte", bytes([5, 6]), (2,))
    st = (fashion_dir / "t10k-labels-idx1-ubyte").stat()
    os.utime(fashion_dir / "t10k-labels-idx1-ubyte", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _load_fashion_arrays.cache_clear()  # data.py's own per-process cache (a new process starts without it)
    again = load_dataset_cached("fashion_mnist", "test", str(fashion_dir))
    assert again.labels.tolist() == [5, 6]
    assert len(_entries(cache)) == 4  # a new key; the old entry is left (a few MB) rather than raced for


def test_mnist_from_the_cache_equals_the_pickle(cache: Path) -> None:
    want = load_dataset("mnist", "test")
    load_dataset_cached("mnist", "test")
    got = load_dataset_cached("mnist", "test")
    assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    assert got.images.shape == (10_000, 1, 28, 28)


def test_off_synthetic_and_unwritable_folders_fall_back_to_decoding(fashion_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_dir() is None
    assert load_dataset_cached("fashion_mnist", "test", str(fashion_dir)).labels.tolist() == [0, 4]
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))  # cannot be created: decoded, not cached, no error
    assert load_dataset_cached("fashion_mnist", "test", str(fashion_dir)).labels.tolist() == [0, 4]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c2"))
    synthetic = load_dataset_cached("synthetic", "test")
    assert torch.equal(synthetic.images, load_dataset("synthetic", "test").images)
    assert not (tmp_path / "c2").exists()


def test_default_folder_is_the_users_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "robust-ensembles" / "datasets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "robust-ensembles" / "datasets"


def test_missing_data_and_bad_arguments_raise_as_load_dataset_does(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_dataset_cached("fashion_mnist", "train", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailableError, match="not found in"):
        load_dataset_cached("fashion_mnist", "train", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="split must be"):
        load_dataset_cached("mnist", "valid")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset_cached("imagenet", "train")


def test_a_torn_entry_is_never_read(fashion_dir: Path, cache: Path) -> None:
    load_dataset_cached("fashion_mnist", "train", str(fashion_dir))
    images = next(p for p in cache.iterdir() if p.name.endswith(".images.npy"))
    images.write_bytes(images.read_bytes()[:50])  # a truncated file (not what the rename can leave; a disk fault)
    again = load_dataset_cached("fashion_mnist", "train", str(fashion_dir))
    assert again.labels.tolist() == [7, 1, 9]
    assert len(images.read_bytes()) > 50  # rewritten whole
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
