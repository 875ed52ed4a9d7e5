"""Ensembles as safetensors and Hugging Face-layout folders: names, shapes, normalisation, refusals, round trips.

The "outside" members are a plain torch LeNet (``tests/plain_torch.py``) with the layer list of ``lenet5``,
so the tests check that our registry maps someone else's ``state_dict`` onto the same function.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from plain_torch import MEAN, STD, plain
from safetensors.torch import save, save_file

from ensemble_core import registry_io as rio
from ensemble_core.checkpoint import ensemble_from_state, load_checkpoint, load_ensemble
from ensemble_core.data import load_dataset
from ensemble_core.models import place
from ensemble_core.training import train_local

ARCH = rio.member_arch("lenet5", "mnist", mean=[MEAN], std=[STD])


def mnist_images(n: int = 16) -> torch.Tensor:
    x, _ = load_dataset("mnist", "test").subset(list(range(n))).as_float()
    return x


def test_a_plain_torch_state_dict_becomes_the_same_function() -> None:
    nets = [plain(0), plain(1)]
    ens, canon, report = rio.validate_members(ARCH, [n.state_dict() for n in nets], "mean_logits", "mnist")
    x = mnist_images()
    with torch.no_grad():
        for net, member in zip(nets, ens.members, strict=True):
            assert torch.allclose(member(x), net(x), atol=1e-5)
        assert torch.allclose(ens(x), torch.stack([n(x) for n in nets]).mean(0), atol=1e-5)
    assert set(canon[0]) == set(rio.expected_tensors(ARCH))
    assert report.images == 20 and report.output_shape == [20, 10] and "foolbox" in report.source


def test_expected_tensors_list_each_tensor_once_without_normalisation() -> None:
    names = rio.expected_tensors(ARCH)
    assert "conv1.weight" in names and "convs.0.weight" not in names  # conv1 is also convs.0: stored once
    assert "mean" not in names and "std" not in names
    assert names["fc1.weight"] == ((500, 800), True)
    resnet = rio.expected_tensors(rio.member_arch("resnet20", "cifar10"))
    assert resnet["layers.0.bn1.num_batches_tracked"] == ((), False)


def test_an_alias_name_is_accepted_and_a_num_batches_tracked_may_be_missing() -> None:
    sd = plain(0).state_dict()
    sd["convs.0.weight"] = sd.pop("conv1.weight")
    ens, canon, _ = rio.validate_members(ARCH, [sd], "mean_logits", "mnist")
    assert torch.equal(canon[0]["conv1.weight"], sd["convs.0.weight"])
    arch = rio.member_arch("resnet20", "cifar10")
    member = rio.build_arch_member(arch)
    tensors = {k: v for k, v in rio.canonical_tensors(member).items() if not k.endswith("num_batches_tracked")}
    out, problems = rio.check_member_tensors(arch, tensors, "member 0")
    assert problems == []
    assert torch.equal(rio.member_from_tensors(arch, out).stem.weight, member.stem.weight)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.__setitem__("conv1.weight", torch.zeros(20, 1, 3, 3)), r"'conv1.weight' has shape \[20, 1, 3, 3\]"),
    (lambda sd: sd.pop("rep.bias"), r"missing 1 tensor\(s\) of lenet5: 'rep.bias'"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(3)), r"unexpected tensor 'extra.weight'"),
    (lambda sd: sd["fc1.bias"].__setitem__(0, float("nan")), r"'fc1.bias' holds NaN"),
    (lambda sd: sd.__setitem__("rep.bias", torch.zeros(64, dtype=torch.int64)), r"expected a floating-point"),
    (lambda sd: sd.__setitem__("classifier.weight", torch.zeros(5, 64)), r"lenet5 expects \[10, 64\]"),
    (lambda sd: sd.__setitem__("mean", torch.zeros(1, 1, 1, 1)), r"'mean' is .* the declared input range"),
])
def test_wrong_names_shapes_and_values_are_refused_naming_the_tensor(change: object, message: str) -> None:
    sd = plain(0).state_dict()
    change(sd)  # type: ignore[operator]
    with pytest.raises(rio.UploadError, match=message) as e:
        rio.validate_members(ARCH, [plain(1).state_dict(), sd], "mean_logits", "mnist")
    assert e.value.problems[0][0] == "weights" and "member 1" in e.value.problems[0][1]


def test_non_finite_outputs_on_real_images_are_refused() -> None:
    sd = plain(0).state_dict()
    sd["classifier.weight"] = torch.full((10, 64), 3e38)  # finite weights, infinite logits
    with pytest.raises(rio.UploadError, match="member 0: non-finite outputs on real foolbox"):
        rio.validate_members(ARCH, [sd], "mean_logits", "mnist")


def test_unknown_architecture_dataset_combine_and_bad_normalisation_name_their_field() -> None:
    for kwargs, field in ((dict(architecture="vgg99", dataset="mnist"), "architecture"),
                          (dict(architecture="lenet5", dataset="svhn"), "dataset")):
        with pytest.raises(rio.UploadError) as e:
            rio.member_arch(**kwargs)  # type: ignore[arg-type]
        assert e.value.problems[0][0] == field
    for kwargs, field in ((dict(input_range=(1, 0)), "input_range"), (dict(std=[0.0]), "std"),
                          (dict(mean=[0.1, 0.2]), "mean"), (dict(kwargs={"nope": 1}), "architecture_kwargs"),
                          (dict(kwargs={"rep_dim": -1}), "architecture_kwargs")):
        with pytest.raises(rio.UploadError) as e:
            rio.member_arch("lenet5", "mnist", **kwargs)  # type: ignore[arg-type]
        assert e.value.problems[0][0] == field
    with pytest.raises(rio.UploadError, match="parameters per member, more than"):  # built on meta: no allocation
        rio.member_arch("lenet5", "mnist", kwargs={"rep_dim": 10**9})
    with pytest.raises(rio.UploadError) as e:
        rio.validate_members(ARCH, [plain(0).state_dict()], "median", "mnist")
    assert e.value.problems[0][0] == "combine"


def test_an_input_range_folds_into_the_normalisation() -> None:
    """A member trained on pixels in [0, 255] normalised by (x - 127.5) / 127.5 reads [0, 1] images as
    (x - 0.5) / 0.5."""
    arch = rio.member_arch("lenet5", "mnist", input_range=(0, 255), mean=[127.5], std=[127.5])
    assert arch["mean"] == [0.5] and arch["std"] == [0.5]
    cifar = rio.member_arch("resnet20", "cifar10", input_range=(-1, 1))
    assert cifar["mean"] == [0.5] * 3 and cifar["std"] == [0.5] * 3


def test_pickles_zip_archives_and_garbage_are_refused_and_no_code_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (Path.write_text, (marker, "ran"))  # type: ignore[return-value]

    raw = pickle.dumps({"conv1.weight": Evil()})
    buf = io.BytesIO()
    torch.save(plain(0).state_dict(), buf)  # a zip holding a pickle
    for data, message in ((raw, "a pickle is refused"), (buf.getvalue(), "zip archive"),
                          (b"\x00" * 4, "shorter than"), (b"\xff" * 64, "no JSON header"),
                          (len(b"{}").to_bytes(8, "little") + b"{}xx", "not a valid safetensors file")):
        with pytest.raises(rio.UploadError, match=message) as e:
            rio.parse_safetensors(data, "weights")
        assert e.value.problems[0][0] == "weights"
    assert not marker.exists()
    good = save(plain(0).state_dict())
    assert set(rio.parse_safetensors(good, "weights")) == set(plain(0).state_dict())


def test_one_file_with_every_member_splits_by_index() -> None:
    members = [rio.canonical_tensors(rio.member_from_tensors(ARCH, plain(i).state_dict())) for i in range(3)]
    one = rio.parse_safetensors(save(rio.ensemble_tensors(members)), "weights")
    split = rio.split_members([one])
    assert len(split) == 3 and all(torch.equal(split[i]["rep.weight"], members[i]["rep.weight"]) for i in range(3))
    with pytest.raises(rio.UploadError, match="without gaps"):
        rio.split_members([{"members.0.a": torch.zeros(1), "members.2.a": torch.zeros(1)}])


def test_a_folder_loads_back_into_an_identical_ensemble_and_reads_as_a_checkpoint(tmp_path: Path) -> None:
    nets = [plain(0), plain(1), plain(2)]
    ens, canon, report = rio.validate_members(ARCH, [n.state_dict() for n in nets], "mean_probs", "mnist")
    ens = place(ens, "cpu")  # the layout every loaded ensemble has on a CPU, so logits compare bit for bit
    config = rio.make_config(ARCH, "mnist", "mean_probs", 3, mean=[MEAN], std=[STD], training="SGD, 1 epoch",
                             name="plain", version="1", validation=report.to_dict())
    sha = rio.write_folder(tmp_path / "m", config, canon)
    assert rio.file_sha256(tmp_path / "m" / rio.WEIGHTS_FILE) == sha
    back = rio.load_folder(tmp_path / "m")
    assert back.combine == "mean_probs" and not back.training
    assert back.state_dict().keys() == ens.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ens.state_dict().items())
    x = mnist_images()
    with torch.no_grad():
        assert torch.equal(back.member_logits(x), ens.member_logits(x))
        via_ckpt = ensemble_from_state(load_checkpoint(tmp_path / "m"))  # what the evaluation runner does
        assert torch.equal(via_ckpt.member_logits(x), ens.member_logits(x)) and via_ckpt.combine == "mean_probs"
        assert torch.equal(load_ensemble(tmp_path / "m", combine="vote").predict(x),
                           ens.with_combine("vote").predict(x))
    spec = __import__("json").loads(load_checkpoint(tmp_path / "m")["spec"])
    assert spec["dataset"] == "mnist" and spec["members"] == 3 and spec["method"] is None
    # the file itself is plain safetensors: members.<i>.<canonical name>, no normalisation buffers
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / rio.WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "pt"
    assert "members.2.classifier.weight" in keys and "members.0.mean" not in keys and len(keys) == 3 * 10


def test_a_trained_checkpoint_exports_to_a_folder_with_its_training_spec(tmp_path: Path) -> None:
    spec = {"method": "baseline", "dataset": "synthetic", "members": 2, "epochs": 1, "batch_size": 64,
            "eval_subset": 100}
    _, ckpt = train_local(spec, tmp_path / "run", progress=False, log=lambda s: None)
    out = rio.export_checkpoint(ckpt, tmp_path / "hf", name="baseline-synthetic")
    config = rio.read_config(out)
    assert config["training"]["method"] == "baseline" and config["training"]["epochs"] == 1
    x, _ = load_dataset("synthetic", "test").as_float()
    with torch.no_grad():
        assert torch.equal(rio.load_folder(out).member_logits(x), load_ensemble(ckpt).member_logits(x))


def test_save_file_of_a_plain_state_dict_is_what_users_upload(tmp_path: Path) -> None:
    save_file(plain(0).state_dict(), str(tmp_path / "m0.safetensors"))
    tensors = rio.parse_safetensors((tmp_path / "m0.safetensors").read_bytes(), "weights")
    out, problems = rio.check_member_tensors(ARCH, tensors, "member 0")
    assert problems == [] and set(out) == set(rio.expected_tensors(ARCH))
