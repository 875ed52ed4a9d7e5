"""Ensembles in the field's formats: safetensors weights, a Hugging Face-layout folder, validation of uploads.

A registered ensemble is a folder in the Hugging Face layout (``save_pretrained``'s):

- ``config.json``: what builds the members (the architecture from :mod:`ensemble_core.models`, the data
  set, the input range and normalisation), the combine rule, the number of members, the training spec
  (or the uploader's description) and the model's name, version and tags (:data:`CONFIG_FORMAT`);
- ``model.safetensors``: every member's tensors under ``members.<i>.<name>``, the key names of
  :class:`~ensemble_core.ensemble.Ensemble`'s ``state_dict``, each tensor once (a module registered under
  two names is stored under the first), without the normalisation buffers (they are in ``config.json``);
- ``README.md`` (exports only): the model card, written by :mod:`ensemble_core.interchange`.

No pickle is read anywhere here: weights come from safetensors (a header of JSON and raw tensor bytes; no
code), configurations from JSON. :func:`load_folder` returns an :class:`Ensemble` identical to the one saved;
:func:`checkpoint_state_from_folder` gives the same ensemble in the form of a checkpoint state, which is how
:func:`ensemble_core.checkpoint.load_checkpoint` (and so the evaluation runner) reads a folder.

Uploads (``POST /v1/models``) are checked by :func:`validate_members`: the tensor names and shapes must be
the architecture's, every tensor finite, and a forward pass on real test images of the data set must give
finite outputs of shape ``(N, classes)`` for every member and for the ensemble.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ensemble_core.ensemble import Ensemble
from ensemble_core.models import MemberNet, build_model, place

CONFIG_FORMAT = "robust-ensembles/hf-ensemble-v1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
NORM_BUFFERS = ("mean", "std")  # MemberNet's normalisation buffers: set from config.json, never uploaded
OPTIONAL_SUFFIXES = (".num_batches_tracked",)  # BatchNorm's step counter: unused in eval mode, optional
MAX_PROBLEMS = 20  # problems listed per refused upload
MAX_MEMBER_PARAMETERS = 100_000_000  # per member (ResNet-18 has 11 M); bounds what architecture arguments may ask
VALIDATION_IMAGES = 20
_MEMBER_KEY = re.compile(r"^members\.(\d+)\.(.+)$")


class UploadError(ValueError):
    """A refused upload: ``problems`` are ``(field, message)`` pairs naming the request field concerned."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))
        self.problems = problems


# ------------------------------------------------------------------------------------------ architecture
def member_arch(architecture: str, dataset: str, *, input_range: Sequence[float] = (0.0, 1.0),
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The architecture config (``MemberNet.arch_config``'s keys) of a member that reads images in ``input_range``.

    The service's attacks work on pixels in ``[0, 1]``; a member trained on pixels in ``[lo, hi]``, then
    normalised with ``(x - mean) / std``, sees the same numbers when ``[0, 1]`` images are normalised with
    ``mean' = (mean - lo) / (hi - lo)`` and ``std' = std / (hi - lo)``: that is what its normalisation
    buffers hold. ``mean`` / ``std`` default to no normalisation (0 and 1); one value or one per channel.
    Raises :class:`UploadError` naming the field for a bad value.
    """
    from ensemble_core.data import DATASET_INFO
    from ensemble_core.models import model_names

    problems: list[tuple[str, str]] = []
    if architecture not in model_names():
        problems.append(("architecture", f"unknown architecture {architecture!r}; expected one of "
                                         f"{', '.join(model_names())}"))
    if dataset not in DATASET_INFO:
        problems.append(("dataset", f"unknown dataset {dataset!r}; expected one of {', '.join(DATASET_INFO)}"))
    if problems:
        raise UploadError(problems)
    info = DATASET_INFO[dataset]
    c = info.in_channels
    lo, hi = (float(v) for v in input_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise UploadError([("input_range", f"expected two finite numbers lo < hi, got {list(input_range)}")])

    def per_channel(name: str, values: Sequence[float] | None, default: float) -> list[float]:
        vals = [float(v) for v in (values if values is not None else [default])]
        if len(vals) == 1:
            vals = vals * c
        if len(vals) != c:
            raise UploadError([(name, f"{dataset} images have {c} channel(s): give 1 or {c} values, got {len(vals)}")])
        if not all(math.isfinite(v) for v in vals):
            raise UploadError([(name, "values must be finite")])
        return vals

    m = per_channel("mean", mean, 0.0)
    s = per_channel("std", std, 1.0)
    if any(v <= 0 for v in s):
        raise UploadError([("std", "values must be positive")])
    span = hi - lo
    arch = {"name": architecture, "num_classes": info.num_classes, "in_channels": c, "image_size": info.image_size,
            "mean": [(v - lo) / span for v in m], "std": [v / span for v in s], "kwargs": dict(kwargs or {})}
    try:  # on the meta device: no memory is allocated, whatever size the arguments ask for
        with torch.device("meta"):
            n_params = sum(p.numel() for p in build_arch_member(arch).parameters())
    except Exception as e:  # TypeError, ValueError, RuntimeError of a layer: the arguments are wrong
        raise UploadError([("architecture_kwargs", f"{architecture} cannot be built with these arguments: "
                                                   f"{str(e)[:200]}")]) from None
    if n_params > MAX_MEMBER_PARAMETERS:
        raise UploadError([("architecture_kwargs", f"{architecture} with these arguments has {n_params:,} parameters "
                                                   f"per member, more than {MAX_MEMBER_PARAMETERS:,}")])
    return arch


def build_arch_member(arch: Mapping[str, Any]) -> MemberNet:
    """A fresh member of ``arch`` (random weights)."""
    return build_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                       image_size=arch["image_size"], mean=tuple(arch["mean"]), std=tuple(arch["std"]),
                       **dict(arch.get("kwargs") or {}))


def alias_map(model: torch.nn.Module) -> dict[str, str]:
    """Every ``state_dict`` key except the normalisation buffers -> its canonical key.

    A module registered twice (LeNet-5's ``conv1`` is also ``convs.0``) has one tensor under two keys; the
    canonical key is the first in ``state_dict`` order, the one stored."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in NORM_BUFFERS:
            continue
        out[key] = first.setdefault(id(value), key)
    return out


def expected_tensors(arch: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Canonical tensor name -> (shape, is floating point) of one member of ``arch``."""
    model = build_arch_member(arch)
    sd = model.state_dict()
    return {k: (tuple(sd[k].shape), sd[k].is_floating_point()) for k in sorted(set(alias_map(model).values()))}


def canonical_tensors(member: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A member's tensors under their canonical names (each once, no normalisation buffers), contiguous, on CPU."""
    sd = member.state_dict()
    names = sorted(set(alias_map(member).values()))
    return {canon: sd[canon].detach().to("cpu").contiguous().clone() for canon in names}


def full_state_dict(arch: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                    model: MemberNet | None = None) -> dict[str, torch.Tensor]:
    """The complete ``state_dict`` of a member (aliases and normalisation buffers included) from its canonical
    tensors: what ``load_state_dict(strict=True)`` takes. ``model``: a member of ``arch`` to read the keys from."""
    model = model if model is not None else build_arch_member(arch)
    aliases = alias_map(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key in NORM_BUFFERS:
            out[key] = value  # from arch: set_normalization in build_model
        elif aliases[key] in tensors:
            out[key] = tensors[aliases[key]].to(value.dtype)
        elif key.endswith(OPTIONAL_SUFFIXES):
            out[key] = value
        else:
            raise KeyError(f"no tensor {aliases[key]!r}")
    return out


def member_from_tensors(arch: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> MemberNet:
    """A member of ``arch`` holding ``tensors`` (canonical names), in eval mode."""
    model = build_arch_member(arch)
    model.load_state_dict(full_state_dict(arch, tensors, model), strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------ safetensors
def parse_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes; :class:`UploadError` for anything else (pickles included).

    safetensors reads a little-endian length, a JSON header and raw tensor bytes: no code runs, whatever
    the file holds."""
    from safetensors.torch import load as st_load

    if data[:4] == b"PK\x03\x04":
        raise UploadError([(where, "a zip archive (a torch.save file or a torch.export .pt2 program) is refused: "
                                   "loading either runs pickled code; save the weights with "
                                   "safetensors.torch.save_file")])
    if data[:1] == b"\x80":
        raise UploadError([(where, "a pickle is refused (loading it would run code); save the weights with "
                                   "safetensors.torch.save_file")])
    if len(data) < 8:
        raise UploadError([(where, "not a safetensors file (shorter than its 8-byte header length)")])
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > 100_000_000 or data[8:9] != b"{":
        raise UploadError([(where, "not a safetensors file (no JSON header after the 8-byte length; a pickle or "
                                   "torch.save file is refused: save the weights with safetensors.torch.save_file)")])
    try:
        return st_load(data)
    except Exception as e:  # SafetensorError and friends: the message says what is wrong
        raise UploadError([(where, f"not a valid safetensors file: {str(e)[:200]}")]) from None


def split_members(files: Sequence[Mapping[str, torch.Tensor]], where: str = "weights") -> list[dict[str, torch.Tensor]]:
    """Members' tensor dicts from uploaded files: one file per member, or one file holding every member under
    ``members.<i>.<name>`` (this format's ``model.safetensors``)."""
    if len(files) == 1 and files[0] and all(_MEMBER_KEY.match(k) for k in files[0]):
        members: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in files[0].items():
            m = _MEMBER_KEY.match(key)
            assert m is not None
            members.setdefault(int(m.group(1)), {})[m.group(2)] = value
        idx = sorted(members)
        if idx != list(range(len(idx))):
            raise UploadError([(where, f"member indices must be 0..{len(idx) - 1} without gaps, got {idx[:10]}")])
        return [members[i] for i in idx]
    return [dict(f) for f in files]


def check_member_tensors(arch: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str,
                         model: MemberNet | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(canonical tensors as float32 / int64, problems)`` of one uploaded member.

    A tensor may be named by any of its keys in the architecture's ``state_dict`` (``conv1.weight`` or
    ``convs.0.weight``). ``mean`` / ``std`` buffers may be present when they equal the declared
    normalisation; ``num_batches_tracked`` may be absent. ``model``: a member of ``arch`` (built when None)."""
    model = model if model is not None else build_arch_member(arch)
    aliases = alias_map(model)
    sd = model.state_dict()
    problems: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key in NORM_BUFFERS:
            if value.shape != sd[key].shape or not torch.allclose(value.float(), sd[key], atol=1e-5):
                problems.append(f"{where}: {key!r} is {value.flatten().tolist()[:8]}, but the declared input range "
                                f"and normalisation give {sd[key].flatten().tolist()}")
            continue
        canon = aliases.get(key)
        if canon is None:
            problems.append(f"{where}: unexpected tensor {key!r} (not in {arch['name']})")
            continue
        want = sd[canon]
        if tuple(value.shape) != tuple(want.shape):
            problems.append(f"{where}: {key!r} has shape {list(value.shape)}, {arch['name']} expects "
                            f"{list(want.shape)}")
            continue
        if want.is_floating_point():
            if not value.is_floating_point():
                problems.append(f"{where}: {key!r} is {value.dtype}, expected a floating-point tensor")
                continue
            value = value.to(torch.float32)
            if not bool(torch.isfinite(value).all()):
                problems.append(f"{where}: {key!r} holds NaN or infinite values")
                continue
        else:
            if value.is_floating_point() or value.dtype == torch.bool:
                problems.append(f"{where}: {key!r} is {value.dtype}, expected an integer tensor")
                continue
            value = value.to(want.dtype)
        if canon in out and not torch.equal(out[canon], value):
            problems.append(f"{where}: {key!r} and another name of the same tensor hold different values")
            continue
        out[canon] = value.contiguous()
    missing = [k for k in sorted(set(aliases.values())) if k not in out and not k.endswith(OPTIONAL_SUFFIXES)]
    if missing:
        problems.append(f"{where}: missing {len(missing)} tensor(s) of {arch['name']}: "
                        f"{', '.join(repr(k) for k in missing[:8])}{' ...' if len(missing) > 8 else ''}")
    return out, problems


@dataclass
class ValidationReport:
    """What the forward check of an upload saw (stored with the model, shown on its page)."""

    images: int
    source: str
    output_shape: list[int]
    member_accuracy: list[float] = field(default_factory=list)
    accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "source": self.source, "output_shape": self.output_shape,
                "member_accuracy": self.member_accuracy, "accuracy": self.accuracy,
                "note": "accuracy on these few real test images only: a sanity check of the input range and "
                        "normalisation, not an evaluation"}


def validation_images(dataset: str, n: int = VALIDATION_IMAGES) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images in [0, 1], labels, source)``: real test images of ``dataset`` (foolbox's shipped samples
    where they exist, else the head of the test split)."""
    from ensemble_core.data import DataUnavailableError, foolbox_samples, load_dataset, to_float

    try:
        ds = foolbox_samples(dataset)
        source = f"foolbox's {len(ds)} shipped {dataset} test images"
    except (DataUnavailableError, KeyError, OSError):
        ds = load_dataset(dataset, "test")
        source = f"the first {min(n, len(ds))} {dataset} test images"
    idx = torch.arange(min(n, len(ds)))
    return to_float(ds.images[idx]), ds.labels[idx], source


def validate_members(arch: Mapping[str, Any], members: Sequence[Mapping[str, torch.Tensor]], combine: str,
                     dataset: str, *, where: str = "weights",
                     images: tuple[torch.Tensor, torch.Tensor, str] | None = None
                     ) -> tuple[Ensemble, list[dict[str, torch.Tensor]], ValidationReport]:
    """Check uploaded members against ``arch`` and run them on real images; :class:`UploadError` on any problem.

    Returns the ensemble (eval mode), the members' canonical tensors and the forward check's report."""
    from ensemble_core.data import DataUnavailableError
    from ensemble_core.ensemble import combine_rule
    from ensemble_core.spec import MAX_MEMBERS

    if not members:
        raise UploadError([(where, "no member weights")])
    if len(members) > MAX_MEMBERS:
        raise UploadError([(where, f"{len(members)} members; at most {MAX_MEMBERS}")])
    import ensemble_core.methods as methods

    methods.method_names()  # method-specific combine rules (DKD's boosted vote) are registered on import
    try:
        combine_rule(combine)
    except ValueError as e:
        raise UploadError([("combine", str(e))]) from None
    canon: list[dict[str, torch.Tensor]] = []
    problems: list[str] = []
    reference = build_arch_member(arch)
    for i, tensors in enumerate(members):
        out, p = check_member_tensors(arch, tensors, f"member {i}", reference)
        canon.append(out)
        problems += p
    if problems:
        shown = problems[:MAX_PROBLEMS] + ([f"... and {len(problems) - MAX_PROBLEMS} more"]
                                           if len(problems) > MAX_PROBLEMS else [])
        raise UploadError([(where, "; ".join(shown))])
    ens = Ensemble([member_from_tensors(arch, t) for t in canon], combine).eval()
    for p in ens.parameters():
        p.requires_grad_(False)
    try:
        x, y, source = images if images is not None else validation_images(dataset)
    except (DataUnavailableError, ValueError) as e:
        raise UploadError([("dataset", f"no test images to check the model on: {e}")]) from None
    want = (int(x.shape[0]), int(arch["num_classes"]))
    member_acc: list[float] = []
    with torch.no_grad():
        for i, m in enumerate(ens.members):
            try:
                z = m(x)
            except RuntimeError as e:
                raise UploadError([(where, f"member {i}: the forward pass failed: {str(e)[:200]}")]) from None
            if tuple(z.shape) != want:
                raise UploadError([(where, f"member {i}: outputs of shape {list(z.shape)} on {want[0]} images, "
                                           f"expected {list(want)}")])
            if not bool(torch.isfinite(z).all()):
                raise UploadError([(where, f"member {i}: non-finite outputs on real {source}")])
            member_acc.append(float((z.argmax(1) == y).float().mean()))
        scores = ens(x)
        if tuple(scores.shape) != want or not bool(torch.isfinite(scores).all()):
            raise UploadError([("combine", f"the ensemble's {combine} scores are not finite (N, classes) outputs")])
        acc = float((ens.predict(x) == y).float().mean())
    return ens, canon, ValidationReport(want[0], source, list(want), member_acc, acc)


# ------------------------------------------------------------------------------------------ folders
def ensemble_tensors(members: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``model.safetensors``' content: ``members.<i>.<canonical name>``."""
    return {f"members.{i}.{k}": v.contiguous() for i, m in enumerate(members) for k, v in sorted(m.items())}


def make_config(arch: Mapping[str, Any], dataset: str, combine: str, n_members: int, *,
                input_range: Sequence[float] = (0.0, 1.0), mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, training: Any = None, source: Mapping[str, Any] | None = None,
                name: str | None = None, version: str | None = None, tags: Sequence[str] = (),
                paper: Mapping[str, Any] | None = None, validation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of an ensemble folder (:data:`CONFIG_FORMAT`)."""
    return {
        "format": CONFIG_FORMAT, "library_name": "robust-ensembles", "model_type": "robust-ensembles-ensemble",
        "name": name, "version": version, "tags": list(tags), "architecture": arch["name"],
        "arch": dict(arch), "members": n_members, "combine": combine, "dataset": dataset,
        "num_classes": arch["num_classes"],
        "input": {"shape": [arch["in_channels"], arch["image_size"], arch["image_size"]],
                  "range": [float(v) for v in input_range],
                  "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
                  "note": "the ensemble takes images with pixels in [0, 1]; 'range', 'mean' and 'std' are the "
                          "members' own convention, folded into their normalisation buffers (arch.mean, arch.std)"},
        "training": training, "source": dict(source or {}), "paper": dict(paper or {}),
        "validation": dict(validation or {}),
    }


def write_folder(out_dir: str | Path, config: Mapping[str, Any], members: Sequence[Mapping[str, torch.Tensor]],
                 card: str | None = None) -> str:
    """Write ``config.json``, ``model.safetensors`` (and ``README.md`` when ``card``) into ``out_dir``; returns
    the SHA-256 of ``model.safetensors``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(ensemble_tensors(members), str(out / WEIGHTS_FILE),
              metadata={"format": "pt", "robust_ensembles": CONFIG_FORMAT})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if card is not None:
        (out / CARD_FILE).write_text(card)
    return file_sha256(out / WEIGHTS_FILE)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_config(folder: str | Path) -> dict[str, Any]:
    """A folder's ``config.json``, checked for :data:`CONFIG_FORMAT`."""
    path = Path(folder) / CONFIG_FILE
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"{path} is not a robust-ensembles ensemble config ({CONFIG_FORMAT})")
    return config


def read_members(folder: str | Path, device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """The members' canonical tensors of a folder's ``model.safetensors``."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / WEIGHTS_FILE), device=str(device))
    return split_members([tensors], where=WEIGHTS_FILE)


def load_folder(folder: str | Path, combine: str | None = None, device: str | torch.device = "cpu") -> Ensemble:
    """The ensemble of a folder (``config.json`` + ``model.safetensors``) in eval mode, its deployed rule unless
    ``combine``. Reads no pickle."""
    import ensemble_core.methods as methods

    methods.method_names()
    config = read_config(folder)
    members = read_members(folder)
    if len(members) != config["members"]:
        raise ValueError(f"{folder}: config.json says {config['members']} members, {WEIGHTS_FILE} holds "
                         f"{len(members)}")
    ens = Ensemble([member_from_tensors(config["arch"], t) for t in members], combine or config["combine"])
    ens = place(ens, device).eval()
    for p in ens.parameters():
        p.requires_grad_(False)
    return ens


def checkpoint_state_from_folder(folder: str | Path) -> dict[str, Any]:
    """A folder as a checkpoint state (``ensemble_core.checkpoint``'s format), so every reader of checkpoints
    (``ensemble_from_state``, the evaluation runner) takes registered models unchanged."""
    from ensemble_core.checkpoint import FORMAT

    config = read_config(folder)
    arch = config["arch"]
    members = [full_state_dict(arch, t) for t in read_members(folder)]
    spec = config.get("training") if isinstance(config.get("training"), dict) else {}
    spec = {**spec, "dataset": config["dataset"], "architecture": config["architecture"],
            "members": config["members"], "combine": config["combine"]}
    spec.setdefault("method", None)
    return {"format": FORMAT, "arch": json.dumps(arch), "members": members, "combine": config["combine"],
            "spec": json.dumps(spec), "registered_model": json.dumps(
                {k: config.get(k) for k in ("name", "version", "tags", "source")})}


def is_folder(path: str | Path) -> bool:
    """Whether ``path`` is an ensemble folder (a directory with ``config.json`` and ``model.safetensors``)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def folder_from_checkpoint(checkpoint: str | Path) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]], str,
                                                               dict[str, Any]]:
    """``(arch, members' canonical tensors, combine, training spec)`` of a checkpoint file (``ensemble.pt``)."""
    from ensemble_core.checkpoint import checkpoint_spec, ensemble_from_state, load_checkpoint

    state = load_checkpoint(checkpoint)
    ens = ensemble_from_state(state)
    arch = json.loads(state["arch"])
    return arch, [canonical_tensors(m) for m in ens.members], ens.combine, checkpoint_spec(state)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, name: str | None = None,
                      card: str | None = None) -> Path:
    """A trained ensemble's checkpoint (``ensemble.pt``) as a folder in the Hugging Face layout."""
    arch, members, combine, spec = folder_from_checkpoint(checkpoint)
    config = make_config(arch, spec.get("dataset", "mnist"), combine, len(members), mean=arch["mean"],
                         std=arch["std"], training=spec, source={"kind": "checkpoint"}, name=name)
    write_folder(out_dir, config, members, card)
    return Path(out_dir)


def atomic_folder(parent: str | Path) -> Path:
    """A new hidden temporary directory inside ``parent`` (rename it into place once complete)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))


def remove_tree(path: str | Path) -> None:
    """Remove a directory tree if it exists (ignoring a concurrent removal)."""
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["CARD_FILE", "CONFIG_FILE", "CONFIG_FORMAT", "WEIGHTS_FILE", "UploadError", "ValidationReport",
           "alias_map", "atomic_folder", "canonical_tensors", "check_member_tensors", "checkpoint_state_from_folder",
           "ensemble_tensors", "expected_tensors", "export_checkpoint", "file_sha256", "folder_from_checkpoint",
           "full_state_dict", "is_folder", "load_folder", "make_config", "member_arch", "member_from_tensors",
           "parse_safetensors", "read_config", "read_members", "remove_tree", "split_members", "validate_members",
           "validation_images", "write_folder"]
