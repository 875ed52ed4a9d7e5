"""The CLDL reference code's training details as train-spec options (issue 21, spec cldl §3, A12):
Adam's ε, ``epochs + 1`` passes, the last partial batch kept, horizontal flip of 1-channel images."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from ensemble_core.data import GlobalBatchLoader, synthetic_dataset
from ensemble_core.spec import TrainSpec
from ensemble_core.training import make_optimizer, train_ensemble

torch.set_num_threads(1)


def test_adam_eps_reaches_the_optimizer_and_is_bounded() -> None:
    spec = TrainSpec.model_validate({"optimizer": {"eps": 1e-7}})
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer([{"params": [p], "lr": 1e-3, "weight_decay": 0.0}], spec.optimizer)
    assert opt.param_groups[0]["eps"] == 1e-7
    assert TrainSpec.model_validate({}).optimizer.eps == 1e-8  # torch's default stays ours
    for bad in (0.0, 0.1):
        with pytest.raises(ValidationError) as e:
            TrainSpec.model_validate({"optimizer": {"eps": bad}})
        assert e.value.errors()[0]["loc"] == ("optimizer", "eps")


def test_one_adam_step_uses_the_eps() -> None:
    """A first Adam step is lr·g/(|g| + ε) per coordinate (bias-corrected moments m̂ = g, v̂ = g²)."""
    g = torch.tensor([1e-7, 1.0])
    for eps in (1e-8, 1e-7):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = make_optimizer([{"params": [p], "lr": 1.0, "weight_decay": 0.0}],
                             TrainSpec.model_validate({"optimizer": {"eps": eps}}).optimizer)
        p.grad = g.clone()
        opt.step()
        assert p.detach().tolist() == pytest.approx((-(g / (g.abs() + eps))).tolist(), rel=1e-5)


def test_keeping_the_last_partial_batch() -> None:
    ds = synthetic_dataset(300, seed=0)
    drop = GlobalBatchLoader(ds, 128, seed=0)
    keep = GlobalBatchLoader(ds, 128, seed=0, drop_last=False)
    assert len(drop) == 2 and len(keep) == 3
    kept = list(keep.epoch(0))
    assert [b.x.shape[0] for b in kept] == [128, 128, 44] and [b.global_size for b in kept] == [128, 128, 44]
    seen = torch.cat([b.y for b in kept])
    assert torch.equal(seen.sort().values, ds.labels.sort().values)  # every image once
    dropped = list(drop.epoch(0))
    assert all(torch.equal(a.x, b.x) for a, b in zip(dropped, kept[:2], strict=False))  # same first batches
    with pytest.raises(ValueError, match="one process"):
        GlobalBatchLoader(ds, 128, seed=0, world_size=2, drop_last=False)
    with pytest.raises(ValidationError, match="drop_last"):
        TrainSpec.model_validate({"drop_last": False, "workers": 2})


def test_flip_on_one_channel_images_without_crop() -> None:
    ds = synthetic_dataset(64, seed=1)
    plain = list(GlobalBatchLoader(ds, 64, seed=0).epoch(0))[0]
    flip = list(GlobalBatchLoader(ds, 64, seed=0, flip=True).epoch(0))[0]
    assert torch.equal(plain.y, flip.y)
    flipped = [bool(torch.equal(f, p.flip(-1))) and not torch.equal(f, p) for f, p in zip(flip.x, plain.x, strict=True)]
    same = [bool(torch.equal(f, p)) for f, p in zip(flip.x, plain.x, strict=True)]
    assert all(a or b for a, b in zip(flipped, same, strict=True))  # each image flipped or untouched: no crop
    assert 16 < sum(flipped) < 48  # about half of 64
    # default: MNIST-like data is not flipped, with or without augment (crop only)
    assert GlobalBatchLoader(ds, 64, seed=0).flip is False
    assert GlobalBatchLoader(ds, 64, seed=0, augment=True).flip is False


def test_extra_pass_trains_epochs_plus_one() -> None:
    base: dict[str, Any] = {"method": "baseline", "dataset": "synthetic", "members": 1, "epochs": 1,
                            "batch_size": 128, "train_subset": 300, "eval_subset": 50, "seed": 0}
    plain = train_ensemble(base)
    extra = train_ensemble({**base, "extra_pass": True, "drop_last": False})
    assert [h["epoch"] for h in plain.history] == [1]
    assert [h["epoch"] for h in extra.history] == [1, 2] and extra.history[-1]["total_epochs"] == 2
    assert extra.state is not None and extra.state["progress"]["epochs"] == 2
    assert TrainSpec.model_validate({**base, "extra_pass": True}).passes == 2
