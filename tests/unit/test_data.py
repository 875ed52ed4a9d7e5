"""Data pipeline: shapes, ranges, determinism under a seed, splits, augmentation keeps labels, sharding."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_core.data import (
    DataUnavailableError,
    GlobalBatchLoader,
    augment_batch,
    foolbox_samples,
    load_dataset,
    protocol_test_order,
    synthetic_dataset,
    test_subset,
    train_val_split,
)


def test_mnist_is_the_full_real_set_as_uint8() -> None:
    tr, te = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    assert tr.images.shape == (60_000, 1, 28, 28) and te.images.shape == (10_000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and int(tr.images.max()) == 255 and int(tr.images.min()) == 0
    assert sorted(tr.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(te.labels).min() > 800  # every digit well represented


def test_fashion_mnist_reads_the_debian_idx_files() -> None:
    tr, te = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    assert tr.images.shape == (60_000, 1, 28, 28) and te.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(tr.labels).tolist() == [6000] * 10  # the official balanced training set


def test_fashion_mnist_missing_dir_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match=str(tmp_path / "nowhere")):
        load_dataset("fashion_mnist", "train", data_dir=str(tmp_path / "nowhere"))


def _write_fake_cifar10(root: Path, n: int = 6) -> None:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(n))}, f)


def test_cifar10_loader_reads_the_standard_python_format(tmp_path: Path) -> None:
    _write_fake_cifar10(tmp_path)
    tr = load_dataset("cifar10", "train", data_dir=str(tmp_path))
    te = load_dataset("cifar10", "test", data_dir=str(tmp_path / "cifar-10-batches-py"))
    assert tr.images.shape == (30, 3, 32, 32) and te.images.shape == (6, 3, 32, 32)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)[b"data"][0]
    assert te.images[0].flatten().tolist() == raw.tolist()  # channel-major rows, as the format says


def test_cifar_absent_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match="data_dir"):
        load_dataset("cifar10", "train")
    with pytest.raises(DataUnavailableError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", "train", data_dir=str(tmp_path))


@pytest.mark.parametrize("name, shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32)),
                                         ("cifar100", (3, 32, 32)), ("fashion_mnist", (1, 28, 28))])
def test_the_twenty_real_foolbox_images(name: str, shape: tuple) -> None:
    ds = foolbox_samples(name)
    assert len(ds) == 20 and tuple(ds.images.shape[1:]) == shape and ds.images.dtype == torch.uint8
    assert ds.labels.max() < ds.info.num_classes


def test_protocol_test_split_is_the_reference_random_seed_0_order() -> None:
    import random

    random.seed(0)
    assert protocol_test_order() == random.sample(range(10_000), 10_000)
    te = load_dataset("mnist", "test")
    sel, rep = test_subset(te, "selection"), test_subset(te, "report")
    assert len(sel) == 1000 and len(rep) == 9000
    order = protocol_test_order()
    assert torch.equal(sel.labels, te.labels[order[:1000]])
    assert torch.equal(test_subset(te, "report", n=2000).labels, te.labels[order[1000:3000]])
    a, b = test_subset(te, "report", n=500, seed=3), test_subset(te, "report", n=500, seed=3)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, test_subset(te, "report", n=500).images)


def test_train_val_split_is_seeded_and_disjoint() -> None:
    ds = synthetic_dataset(n=300, seed=0)
    ds.images[:, 0, 0, 0] = (torch.arange(300) % 256).to(torch.uint8)  # tag rows to trace them
    ds.images[:, 0, 0, 1] = (torch.arange(300) // 256).to(torch.uint8)
    tr, val = train_val_split(ds, 50, seed=1)
    tr2, val2 = train_val_split(ds, 50, seed=1)
    ids = lambda d: set((d.images[:, 0, 0, 0].long() + 256 * d.images[:, 0, 0, 1].long()).tolist())  # noqa: E731
    assert val is not None and len(tr) == 250 and len(val) == 50
    assert ids(tr).isdisjoint(ids(val)) and ids(tr) | ids(val) == set(range(300))
    assert torch.equal(val.images, val2.images)
    assert ids(train_val_split(ds, 50, seed=2)[1]) != ids(val)
    sub, _ = train_val_split(ds, 50, seed=1, train_subset=100)
    assert len(sub) == 100 and ids(sub) <= ids(tr)


def test_augmentation_keeps_labels_shapes_and_range_and_is_seeded() -> None:
    x = torch.rand(16, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    # a crop is a shifted copy: each output image equals a window of its zero-padded (maybe flipped) input
    p = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(4):
        found = any(torch.equal(a[i], w[:, r : r + 32, c : c + 32]) for w in (p[i], p[i].flip(2))
                    for r in range(9) for c in range(9))
        assert found


def test_loader_labels_follow_their_images_through_augmentation() -> None:
    ds = synthetic_dataset(n=256, seed=0, channels=3, size=32)
    ds.images[:, :, 8:24, 8:24] = (ds.labels * 20).view(-1, 1, 1, 1).to(torch.uint8)  # label painted at centre
    loader = GlobalBatchLoader(ds, 64, seed=0, augment=True)
    for batch in loader.epoch(0):
        centre = (batch.x[:, 0, 15, 15] * 255).round().long()  # the ±4 pixel shift keeps the centre inside
        assert torch.equal(centre, batch.y * 20)


def test_ranks_together_see_exactly_the_global_batch() -> None:
    ds = synthetic_dataset(n=200, seed=0)
    one = list(GlobalBatchLoader(ds, 40, seed=5, augment=True).epoch(3))
    r0 = list(GlobalBatchLoader(ds, 40, seed=5, rank=0, world_size=2, augment=True).epoch(3))
    r1 = list(GlobalBatchLoader(ds, 40, seed=5, rank=1, world_size=2, augment=True).epoch(3))
    assert len(one) == len(r0) == 5
    for a, b, c in zip(one, r0, r1, strict=True):
        assert torch.equal(a.x, torch.cat([b.x, c.x])) and torch.equal(a.y, torch.cat([b.y, c.y]))
        assert (b.offset, c.offset, b.global_size) == (0, 20, 40)
    # epochs differ, a resumed epoch restarts at the right step
    assert not torch.equal(one[0].x, next(GlobalBatchLoader(ds, 40, seed=5).epoch(4)).x)
    resumed = list(GlobalBatchLoader(ds, 40, seed=5, augment=True).epoch(3, start_step=2))
    assert [b.index for b in resumed] == [2, 3, 4] and torch.equal(resumed[0].x, one[2].x)


def test_loader_refuses_uneven_shares() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchLoader(synthetic_dataset(64), 30, seed=0, world_size=4)


def test_augmenting_a_slice_gives_the_rows_of_the_whole_batch() -> None:
    x = torch.rand(12, 3, 32, 32)
    whole = augment_batch(x, torch.Generator().manual_seed(7))
    for lo, hi in ((0, 4), (4, 9), (9, 12)):
        part = augment_batch(x[lo:hi], torch.Generator().manual_seed(7), offset=lo, total=12)
        assert torch.equal(part, whole[lo:hi])
    with pytest.raises(ValueError, match="not inside a batch of 12"):
        augment_batch(x[:4], torch.Generator().manual_seed(7), offset=10, total=12)


def test_a_crop_reads_the_window_its_drawn_shift_names() -> None:
    """Row shift first, column shift second, as drawn: the same crops any earlier run of the seed got."""
    x = torch.rand(6, 1, 28, 28)
    out = augment_batch(x, torch.Generator().manual_seed(3), pad=2, flip=False)
    shifts = torch.randint(0, 5, (6, 2), generator=torch.Generator().manual_seed(3))
    p = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for k, (dy, dx) in enumerate(shifts.tolist()):
        assert torch.equal(out[k], p[k, :, dy : dy + 28, dx : dx + 28])


def test_data_seed_changes_the_data_not_the_initial_weights() -> None:
    """``data_seed`` (issue #21, the LSD code's surrogates): the same members' initial weights as ``seed``, another
    batch order; unset, it is ``seed`` itself (so every existing spec trains exactly as before)."""
    from ensemble_core.spec import TrainSpec
    from ensemble_core.training import setup_run

    base = {"method": "baseline", "dataset": "synthetic", "members": 2, "train_subset": 256, "seed": 3}
    plain, same, other = (TrainSpec.model_validate({**base, **extra})
                          for extra in ({}, {"data_seed": 3}, {"data_seed": 4}))
    assert plain.data_order_seed == same.data_order_seed == 3 and other.data_order_seed == 4
    nets = [setup_run(s, torch.device("cpu")).net for s in (plain, other)]
    w0, w1 = (n.members[0].state_dict() for n in nets)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # initialisation follows seed alone
    setup = setup_run(plain, torch.device("cpu"))

    def first_labels(spec: TrainSpec) -> torch.Tensor:
        loader = GlobalBatchLoader(setup.train, 32, spec.data_order_seed, 0, 1, "cpu", False)
        return next(iter(loader.epoch(0))).y

    assert torch.equal(first_labels(plain), first_labels(same))
    assert not torch.equal(first_labels(plain), first_labels(other))
