"""The shared training loop: data, stages, optimizers, schedules, metrics, checkpoints and resume.

Methods only supply a loss (``ensemble_core.methods``); this loop is the same for every method and
for one process or many. Distribution is injected: ``wrap`` wraps the :class:`TrainNet` (Ray's
``prepare_model`` gives DDP), ``rank`` / ``world_size`` select this process's share of each global
batch, and ``on_epoch_end`` receives the metrics and the checkpoint state (Ray's ``report``, or a
file write when run locally).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ensemble_core.checkpoint import FORMAT, ensemble_from_state, load_checkpoint, save_checkpoint
from ensemble_core.data import (
    DATASET_INFO,
    GlobalBatchLoader,
    TensorDataset,
    iterate_eval,
    test_subset,
    train_val_split,
)
from ensemble_core.datacache import load_dataset_cached
from ensemble_core.ensemble import Ensemble
from ensemble_core.methods import get_method
from ensemble_core.methods.base import Method, StepContext, TrainNet
from ensemble_core.models import build_model, place
from ensemble_core.spec import OptimizerSpec, ScheduleSpec, TrainSpec


class TrainingStopped(Exception):
    """Raised inside the loop when ``should_stop`` says so (a cancel request)."""


@dataclass
class TrainHooks:
    wrap: Callable[[nn.Module, bool], nn.Module] | None = None  # (net, find_unused_parameters) -> module
    on_epoch_end: Callable[[dict[str, Any], dict[str, Any] | None], None] | None = None
    should_stop: Callable[[], bool] | None = None
    log: Callable[[str], None] = print
    progress_bar: bool = False
    # called with "data", "model" and "first_step" as the run reaches each: the start-up breakdown of
    # docs/benchmarks.md ("Start-up breakdown"); "first_step" after the first optimizer step of this call
    on_phase: Callable[[str], None] | None = None


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    state: dict[str, Any] | None  # final checkpoint state (rank 0)
    results: dict[str, Any] = field(default_factory=dict)


def lr_factor(schedule: ScheduleSpec, epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based)."""
    if schedule.warmup_epochs and epoch < schedule.warmup_epochs:
        return (epoch + 1) / (schedule.warmup_epochs + 1)
    if schedule.name == "multistep":
        return schedule.gamma ** sum(1 for m in schedule.milestones if epoch >= m)
    if schedule.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return 1.0


def make_optimizer(groups: list[dict[str, Any]], opt: OptimizerSpec) -> torch.optim.Optimizer:
    for g in groups:
        g["initial_lr"] = g["lr"]
    if opt.name == "adam":
        return torch.optim.Adam(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov,
                           weight_decay=opt.weight_decay)


def pick_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def clean_accuracy(ensemble: Ensemble, ds: TensorDataset, device: torch.device | str = "cpu",
                   batch_size: int = 500) -> dict[str, Any]:
    """Accuracy of the deployed rule (abstentions are wrong) and of each member, on ``ds``."""
    was_training = ensemble.training
    ensemble.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    abstain = torch.zeros((), dtype=torch.long, device=device)
    member_correct = torch.zeros(len(ensemble), dtype=torch.long, device=device)
    for x, y in iterate_eval(ds, batch_size, device):
        z = ensemble.member_logits(x)
        pred = ensemble.rule.predict_labels(z)
        correct += (pred == y).sum()
        abstain += (pred < 0).sum()
        member_correct += (z.argmax(-1) == y).sum(1)
    ensemble.train(was_training)
    n = max(len(ds), 1)
    return {"acc": correct.item() / n, "abstain_rate": abstain.item() / n,
            "member_acc": [c / n for c in member_correct.tolist()], "n": len(ds)}


COLLAPSE_GAP = 0.2  # a member this far (20 points) below the median of the others' clean accuracy is flagged


def collapsed_members(accs: list[float], gap: float = COLLAPSE_GAP) -> list[int]:
    """Members whose clean accuracy is at least ``gap`` below the median of the *other* members' (the
    training-time collapse guard, issue 21: e.g. a DKD auxiliary at 20 % beside members at 97 %). Needs at
    least two members; the returned indices are positions in ``accs``."""
    if len(accs) < 2:
        return []
    out = []
    for i, a in enumerate(accs):
        others = sorted(accs[:i] + accs[i + 1:])
        mid = len(others) // 2
        median = others[mid] if len(others) % 2 else 0.5 * (others[mid - 1] + others[mid])
        if median - a >= gap:
            out.append(i)
    return out


@dataclass
class RunSetup:
    spec: TrainSpec
    method: Method
    net: TrainNet
    train: TensorDataset
    val: TensorDataset | None
    selection: TensorDataset
    test: TensorDataset
    arch: dict[str, Any]


def setup_run(spec: TrainSpec, device: torch.device,
              on_phase: Callable[[str], None] | None = None) -> RunSetup:
    """Data, members (one seed per member), auxiliary modules and the method object for ``spec``.

    ``on_phase("data")`` is called once the data sets are decoded and split, ``on_phase("model")`` once the
    members and auxiliary modules are built and on ``device``."""
    info = DATASET_INFO[spec.dataset]
    full_train = load_dataset_cached(spec.dataset, "train", spec.data_dir)  # decoded once per machine
    full_test = load_dataset_cached(spec.dataset, "test", spec.data_dir)
    train, val = train_val_split(full_train, spec.val_size, spec.data_order_seed, spec.train_subset)
    selection = test_subset(full_test, "selection")
    test = test_subset(full_test, "report", n=spec.eval_subset or None)
    if on_phase is not None:
        on_phase("data")
    method = get_method(spec.method).from_spec_dict(
        spec.hyperparameters, members=spec.members, num_classes=info.num_classes, dataset=spec.dataset,
        architecture=spec.architecture)
    kwargs = method.model_kwargs(spec.architecture)
    members = []
    for k in range(spec.members):
        torch.manual_seed(spec.seed * 1000 + k)  # independent, reproducible initialisation per member
        members.append(build_model(spec.architecture, num_classes=info.num_classes, in_channels=info.in_channels,
                                   image_size=info.image_size, mean=info.mean, std=info.std, **kwargs))
    torch.manual_seed(spec.seed * 1000 + 999)
    rep_layer = getattr(members[0], "rep", None)
    rep_dim = rep_layer.out_features if isinstance(rep_layer, nn.Linear) else members[0].feature_dim
    aux = method.build_aux(members[0].feature_dim, rep_dim)
    net = place(TrainNet(members, aux, method), device)
    if on_phase is not None:
        on_phase("model")
    return RunSetup(spec, method, net, train, val, selection, test, members[0].arch_config)


def make_state(setup: RunSetup, optimizer: torch.optim.Optimizer | None, stage: int, epoch: int,
               history: list[dict[str, Any]], finished: bool) -> dict[str, Any]:
    """The checkpoint dict (see :mod:`ensemble_core.checkpoint`); ``epoch`` = epochs done in ``stage``."""
    net = setup.net
    return {
        "format": FORMAT,
        "spec": json.dumps(setup.spec.resolved()),
        "arch": json.dumps(setup.arch),
        "members": [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in net.members],
        "aux": {n: {k: v.detach().cpu().clone() for k, v in a.state_dict().items()} for n, a in net.aux.items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "progress": {"stage": stage, "epoch": epoch, "finished": finished,
                     "stages": len(setup.method.stages()), "epochs": setup.spec.passes},
        "combine": setup.spec.combine or setup.method.combine(),
        "history": json.dumps(history),
    }


def _restore(setup: RunSetup, state: dict[str, Any]) -> None:
    for m, sd in zip(setup.net.members, state["members"], strict=True):
        m.load_state_dict(sd)
    for n, sd in state["aux"].items():
        setup.net.aux[n].load_state_dict(sd)


def train_ensemble(spec: TrainSpec | dict[str, Any], *, device: torch.device | str | None = None, rank: int = 0,
                   world_size: int = 1, resume_state: dict[str, Any] | None = None,
                   hooks: TrainHooks | None = None) -> TrainResult:
    """Train the ensemble described by ``spec``; resume from ``resume_state`` when given.

    Every rank calls this with the same spec; rank 0 evaluates, builds checkpoint states and
    returns them. ``hooks.on_epoch_end`` is called on every rank once per epoch (a barrier under Ray).
    """
    spec = spec if isinstance(spec, TrainSpec) else TrainSpec.model_validate(spec)
    hooks = hooks or TrainHooks()
    device = torch.device(device) if device is not None else pick_device(spec.use_gpu)
    if spec.deterministic:
        torch.use_deterministic_algorithms(True)
    setup = setup_run(spec, device, hooks.on_phase)
    method, net = setup.method, setup.net
    first_step_seen = False
    stages = method.stages()
    info = DATASET_INFO[spec.dataset]
    augment = info.augment_by_default if spec.augment is None else spec.augment
    loader = GlobalBatchLoader(setup.train, spec.batch_size, spec.data_order_seed, rank, world_size, device, augment,
                               flip=spec.hflip, drop_last=spec.drop_last)
    passes = spec.passes  # epochs, plus one with extra_pass (the CLDL reference code's range(0, epochs + 1))
    history: list[dict[str, Any]] = []
    start_stage, start_epoch, opt_state = 0, 0, None
    if resume_state is not None:
        _restore(setup, resume_state)
        history = json.loads(resume_state["history"])
        prog = resume_state["progress"]
        start_stage, start_epoch = prog["stage"], prog["epoch"]
        if prog.get("finished"):
            start_stage = len(stages)
        elif start_epoch >= passes:  # the stage had ended: go on with the next one
            start_stage, start_epoch = start_stage + 1, 0
        else:
            opt_state = resume_state["optimizer"]
        hooks.log(f"resuming at stage {start_stage + 1}/{len(stages)}, epoch {start_epoch + 1}/{passes}")

    total_epochs = len(stages) * passes
    optimizer: torch.optim.Optimizer | None = None
    bar = None
    if hooks.progress_bar and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_epochs * len(loader), initial=(start_stage * passes + start_epoch) * len(loader),
                   unit="step", dynamic_ncols=True)
    for stage_idx in range(start_stage, len(stages)):
        stage = stages[stage_idx]
        net.set_stage(stage)
        optimizer = make_optimizer(method.param_groups(net, spec.optimizer.lr, spec.optimizer.weight_decay),
                                   spec.optimizer)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
            opt_state = None
        model = hooks.wrap(net, method.find_unused_parameters) if hooks.wrap else net
        first_epoch = start_epoch if stage_idx == start_stage else 0
        for epoch in range(first_epoch, passes):
            factor = lr_factor(spec.schedule, epoch, passes)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * factor
            net.train()
            t0, c0 = time.perf_counter(), time.process_time()
            sums: dict[str, torch.Tensor] = {}
            steps = 0
            epoch_seed = (spec.data_order_seed * 1_000_003 + stage_idx * 10_007 + epoch) * 100_003
            for batch in loader.epoch(stage_idx * 100_000 + epoch):
                g = torch.Generator().manual_seed(epoch_seed + batch.index)
                ctx = StepContext(epoch, batch.index, stage_idx, rank, world_size, batch.global_size,
                                  batch.offset, g, device, epoch_seed=epoch_seed)
                out = model(batch.x, batch.y, ctx)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                if hooks.on_phase is not None and not first_step_seen:
                    first_step_seen = True
                    hooks.on_phase("first_step")
                for k, v in {"loss": out.loss, **out.terms}.items():
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v
                steps += 1
                if bar is not None:
                    bar.update(1)
                if hooks.should_stop is not None and steps % 10 == 0 and hooks.should_stop():
                    raise TrainingStopped("stop requested")
            keys = sorted(sums)
            vec = torch.stack([sums[k] for k in keys]) / max(steps, 1)
            if world_size > 1 and dist.is_available() and dist.is_initialized():
                vec = vec.to(device)
                dist.all_reduce(vec)
                vec = vec / world_size
            metrics: dict[str, Any] = {f"train_{k}": float(v) for k, v in zip(keys, vec.tolist(), strict=True)}
            metrics.update(stage=stage_idx, stage_name=stage.name, epoch=epoch + 1,
                           global_epoch=stage_idx * passes + epoch + 1, total_epochs=total_epochs,
                           lr=optimizer.param_groups[0]["lr"], epoch_time_s=time.perf_counter() - t0,
                           epoch_cpu_s=time.process_time() - c0)
            state = None
            if rank == 0:
                metrics.update(_epoch_eval(setup, stage, device))
                history.append(metrics)
                state = make_state(setup, optimizer, stage_idx, epoch + 1, history, finished=False)
                hooks.log(_format_epoch(metrics))
            if hooks.should_stop is not None and hooks.should_stop():
                if hooks.on_epoch_end:
                    hooks.on_epoch_end(metrics, state)
                raise TrainingStopped("stop requested")
            if hooks.on_epoch_end:
                hooks.on_epoch_end(metrics, state)
    if bar is not None:
        bar.close()

    if rank != 0:
        return TrainResult({}, history, None)
    final = _final_eval(setup, device)
    state = make_state(setup, optimizer, len(stages) - 1, passes, history, finished=True)
    state["results"] = json.dumps(final)
    return TrainResult(final["metrics"], history, state, final)


def _eval_ensemble(setup: RunSetup, members: list[int] | None = None) -> Ensemble:
    net = setup.net
    chosen = [net.members[i] for i in (members if members is not None else range(len(net.members)))]
    return Ensemble(chosen, setup.spec.combine or setup.method.combine())


def _epoch_eval(setup: RunSetup, stage: Any, device: torch.device) -> dict[str, Any]:
    """Per-epoch monitoring on the validation split (if any) and the PROTOCOL's selection subset."""
    members = sorted(set(stage.train_members) | set(stage.frozen_members))
    ens = _eval_ensemble(setup, members)
    out: dict[str, Any] = {}
    if setup.val is not None:
        r = clean_accuracy(ens, setup.val, device)
        out["val_clean_acc"] = r["acc"]
    r = clean_accuracy(ens, setup.selection, device)
    out["sel_clean_acc"] = r["acc"]
    for i, a in zip(members, r["member_acc"], strict=True):
        out[f"sel_member_acc_{i}"] = a
    collapsed = [members[j] for j in collapsed_members(r["member_acc"])]
    if collapsed:
        out["member_collapse"] = collapsed
    setup.net.train()
    return out


def _final_eval(setup: RunSetup, device: torch.device) -> dict[str, Any]:
    ens = _eval_ensemble(setup)
    r = clean_accuracy(ens, setup.test, device)
    metrics = {"test_clean_acc": r["acc"], "test_abstain_rate": r["abstain_rate"],
               **{f"test_member_acc_{i}": a for i, a in enumerate(r["member_acc"])}}
    if setup.val is not None:
        metrics["val_clean_acc"] = clean_accuracy(ens, setup.val, device)["acc"]
    setup.net.eval()
    extra = setup.method.results(setup.net, setup.test, device)
    return {"metrics": metrics, "method_results": extra, "combine": ens.combine,
            "member_collapse": {"members": collapsed_members(r["member_acc"]), "gap": COLLAPSE_GAP,
                                "rule": "a member whose clean accuracy is at least gap below the median of the "
                                        "other members' on the test subset"},
            "test_subset": {"split": "report", "n": r["n"], "order": "random.seed(0) shuffle of the test split"}}


def _format_epoch(m: dict[str, Any]) -> str:
    parts = [f"stage {m['stage'] + 1} epoch {m['epoch']}", f"loss {m.get('train_loss', float('nan')):.4f}"]
    for k in ("val_clean_acc", "sel_clean_acc"):
        if k in m:
            parts.append(f"{k} {m[k]:.4f}")
    parts.append(f"{m['epoch_time_s']:.1f}s")
    if m.get("member_collapse"):
        accs = ", ".join(f"{i}: {100 * m[f'sel_member_acc_{i}']:.1f} %" for i in m["member_collapse"])
        parts.append(f"WARNING member collapse ({accs}, >= {100 * COLLAPSE_GAP:.0f} points below the others' median)")
    return " | ".join(parts)


def train_local(spec: TrainSpec | dict[str, Any], out_dir: str | Path, *, resume: bool = True,
                progress: bool = True, device: str | torch.device | None = None,
                log: Callable[[str], None] = print) -> tuple[TrainResult, Path]:
    """Train on this machine without the service: checkpoints every epoch to ``out_dir/checkpoint.pt``,
    resumes from it when present, and writes the final ``out_dir/ensemble.pt``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    resume_state = load_checkpoint(ckpt) if resume and ckpt.exists() else None

    def on_epoch_end(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is not None:
            save_checkpoint(state, ckpt)

    result = train_ensemble(spec, device=device, resume_state=resume_state,
                            hooks=TrainHooks(on_epoch_end=on_epoch_end, log=log, progress_bar=progress))
    assert result.state is not None
    final = save_checkpoint(result.state, out / "ensemble.pt")
    (out / "results.json").write_text(json.dumps({"metrics": result.metrics, **result.results}, indent=2))
    return result, final


__all__ = ["TrainHooks", "TrainResult", "TrainingStopped", "clean_accuracy", "ensemble_from_state",
           "train_ensemble", "train_local"]
