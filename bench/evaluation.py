"""Evaluation: images per second of the evaluation runner / a bare torchattacks loop on the same
ensemble and attack (target >= 0.9).

The ensemble is 3 LeNet-5 members trained here for one short epoch on MNIST (so most test images are
classified correctly and get attacked). The runner is ``ensemble_core.evaluation.run_evaluation`` with
one white-box PGD attack and its optional extras off (member transfer, large-eps and convergence
checks); it still runs its clean pass with the model checks and the attack unit tests, which a bare
loop does not. The bare loop does the minimum the same result needs: clean predictions, ``torchattacks
.PGD`` on the correctly classified images (the runner attacks only those too), predictions on the
adversarial images. Two ratios: the whole job's images/s, and the PGD unit alone (the runner's own
timing of that unit). Each side runs ``reps`` times, alternating; the fastest run counts.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import header, save, table

TARGET = 0.9


def train_ensemble_quickly(members: int = 3, n: int = 6000, batch: int = 128, seed: int = 0) -> Any:
    """``members`` LeNet-5 trained for one epoch of ``n`` MNIST images (Adam), as an eval-mode Ensemble."""
    from ensemble_core.data import DATASET_INFO, load_dataset, to_float
    from ensemble_core.ensemble import Ensemble
    from ensemble_core.models import build_model

    info = DATASET_INFO["mnist"]
    ds = load_dataset("mnist", "train")
    nets = []
    for k in range(members):
        torch.manual_seed(seed + k)
        m = build_model("lenet5", mean=info.mean, std=info.std)
        opt = torch.optim.Adam(m.parameters(), lr=2e-3)
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + k))[:n]
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(to_float(ds.images[idx])), ds.labels[idx]).backward()
            opt.step()
        nets.append(m.eval())
    return Ensemble(nets, "mean_logits").eval()


def bare_loop(ens: Any, images: torch.Tensor, labels: torch.Tensor, eps: float, alpha: float, steps: int,
              batch: int) -> tuple[float, int]:
    """Seconds for clean predictions, PGD on the correct ones and adversarial predictions; robust count."""
    import torchattacks

    from ensemble_core.data import to_float

    target = ens.attack_target()
    for p in ens.parameters():
        p.requires_grad_(False)
    robust = 0
    t0 = time.perf_counter()
    try:
        for lo in range(0, len(images), batch):
            x, y = to_float(images[lo : lo + batch]), labels[lo : lo + batch]
            with torch.no_grad():
                ok = ens.predict(x) == y
            idx = ok.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            atk = torchattacks.PGD(target, eps=eps, alpha=alpha, steps=steps, random_start=True)
            adv = atk(x[idx], y[idx])
            with torch.no_grad():
                robust += int((ens.predict(adv) == y[idx]).sum())
    finally:
        for p in ens.parameters():
            p.requires_grad_(True)
    return time.perf_counter() - t0, robust


def run(n: int = 200, batch: int = 100, eps: float = 0.1, steps: int = 20, reps: int = 2) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from ensemble_core.data import load_dataset
    from ensemble_core.evaluation import prepare_plan, run_evaluation
    from ensemble_core.evaluation.attacks import default_alpha
    from ensemble_core.spec import AttackSpec

    ens = train_ensemble_quickly()
    test = load_dataset("mnist", "test")
    attack = {"name": "pgd", "eps": [eps], "steps": steps}
    spec = {"target_checkpoint": "in-memory", "n_examples": n, "batch_size": batch, "split": "report",
            "attacks": [attack], "member_transfer": None, "checks": {"large_eps": None, "convergence": False}}
    plan = prepare_plan(spec, ens, dataset="mnist", test_set=test)  # the runner's own choice of images
    images, labels = plan.images, plan.labels
    alpha = default_alpha(AttackSpec.model_validate(attack), eps)
    unit = f"wb|0|{eps:g}"
    runner_runs, bare_runs = [], []
    for _ in range(reps):
        t_bare, robust_bare = bare_loop(ens, images, labels, eps, alpha, steps, batch)
        bare_runs.append(t_bare)
        t0 = time.perf_counter()
        r = run_evaluation(spec, ens, dataset="mnist", test_set=test, log=lambda line: None, plots=False)
        runner_runs.append((time.perf_counter() - t0, float(r["timings_s"][unit])))
    t_bare = min(bare_runs)
    t_job = min(t for t, _ in runner_runs)
    t_unit = min(u for _, u in runner_runs)
    rows = [{"path": "bare torchattacks loop", "seconds": t_bare, "images_per_s": n / t_bare},
            {"path": "runner, whole job", "seconds": t_job, "images_per_s": n / t_job},
            {"path": "runner, PGD unit", "seconds": t_unit, "images_per_s": n / t_unit}]
    job_ratio, unit_ratio = t_bare / t_job, t_bare / t_unit
    print(header(f"evaluation: images/s of the runner / a bare torchattacks loop (3 x lenet5, mean_logits, "
                 f"PGD-{steps} eps {eps}, {n} MNIST report images, batch {batch}, fastest of {reps})", load0))
    print(table(rows, ["path", "seconds", "images_per_s"]))
    print(f"runner / bare images/s: whole job {job_ratio:.3f} ({'met' if job_ratio >= TARGET else 'NOT met'}), "
          f"PGD unit {unit_ratio:.3f} ({'met' if unit_ratio >= TARGET else 'NOT met'}); target >= {TARGET}; "
          f"robust: bare {robust_bare}/{n}, runner's timings {r['timings_s']}")
    result = {"n": n, "batch": batch, "eps": eps, "steps": steps, "rows": rows, "job_ratio": job_ratio,
              "unit_ratio": unit_ratio, "runner_timings_s": r["timings_s"], "bare_runs_s": bare_runs,
              "runner_runs_s": runner_runs}
    save("evaluation", result, load0)
    return result


def bare_autoattack_loop(ens: Any, images: torch.Tensor, labels: torch.Tensor, eps: float, batch: int,
                         seed: int) -> tuple[float, int]:
    """Seconds and robust count of a bare loop of the reference AutoAttack, the minimum the runner's result needs.

    Per batch: clean predictions on the deployed rule, one ``pyautoattack`` ``run_standard_evaluation``
    (``reference_autoattack``: nothing around it) on the correctly classified images of the attack target,
    predictions on its examples. Each batch uses the seed the runner derives for the same batch (its
    ``("wb", attack 0, eps, batch, "autoattack", restart 0)`` tag), so both sides attack the same images
    with the same random draws and do the same work.
    """
    from ensemble_core.data import to_float
    from ensemble_core.evaluation.attacks import derive_seed
    from ensemble_core.evaluation.reference_autoattack import reference_autoattack

    target = ens.attack_target()
    for p in ens.parameters():
        p.requires_grad_(False)
    robust = 0
    t0 = time.perf_counter()
    try:
        for b, lo in enumerate(range(0, len(images), batch)):
            x, y = to_float(images[lo : lo + batch]), labels[lo : lo + batch]
            with torch.no_grad():
                ok = ens.predict(x) == y
            idx = ok.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            s = derive_seed(seed, "wb", 0, eps, b, "autoattack", 0) % (2**31)
            adv = reference_autoattack(target, x[idx], y[idx], eps=eps, seed=s, batch_size=250)
            with torch.no_grad():
                robust += int((ens.predict(adv) == y[idx]).sum())
    finally:
        for p in ens.parameters():
            p.requires_grad_(True)
    return time.perf_counter() - t0, robust


def run_autoattack(n: int = 100, batch: int = 100, eps: float = 0.1, reps: int = 2, ens: Any = None,
                   test: Any = None) -> dict[str, Any]:
    """The runner with the reference AutoAttack (``{"name": "autoattack"}``, version standard) against
    :func:`bare_autoattack_loop` on the same ensemble and images; same ratios as :func:`run`."""
    load0 = os.getloadavg()[0]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from ensemble_core.data import load_dataset
    from ensemble_core.evaluation import prepare_plan, run_evaluation
    from ensemble_core.evaluation.reference_autoattack import PYAUTOATTACK_VERSION

    ens = ens if ens is not None else train_ensemble_quickly()
    test = test if test is not None else load_dataset("mnist", "test")
    attack = {"name": "autoattack", "eps": [eps], "version": "standard"}
    spec = {"target_checkpoint": "in-memory", "n_examples": n, "batch_size": batch, "split": "report", "seed": 0,
            "attacks": [attack], "member_transfer": None, "checks": {"large_eps": None, "convergence": False}}
    plan = prepare_plan(spec, ens, dataset="mnist", test_set=test)
    images, labels = plan.images, plan.labels
    unit = f"wb|0|{eps:g}"
    runner_runs, bare_runs, robust_runner = [], [], None
    for _ in range(reps):
        t_bare, robust_bare = bare_autoattack_loop(ens, images, labels, eps, batch, 0)
        bare_runs.append(t_bare)
        t0 = time.perf_counter()
        r = run_evaluation(spec, ens, dataset="mnist", test_set=test, log=lambda line: None, plots=False)
        runner_runs.append((time.perf_counter() - t0, float(r["timings_s"][unit])))
        rec = next(x for x in r["records"] if x.get("threat") == "white-box"
                   and (x.get("attack_params") or {}).get("name") == "autoattack")
        robust_runner = int(rec["n_robust"])
    t_bare, t_job, t_unit = min(bare_runs), min(t for t, _ in runner_runs), min(u for _, u in runner_runs)
    rows = [{"path": "bare pyautoattack loop", "seconds": t_bare, "images_per_s": n / t_bare},
            {"path": "runner, whole job", "seconds": t_job, "images_per_s": n / t_job},
            {"path": "runner, AutoAttack unit", "seconds": t_unit, "images_per_s": n / t_unit}]
    job_ratio, unit_ratio = t_bare / t_job, t_bare / t_unit
    print(header(f"evaluation: images/s of the runner / a bare loop of the reference AutoAttack (pyautoattack "
                 f"{PYAUTOATTACK_VERSION} standard, L∞ eps {eps}; 3 x lenet5, mean_logits, {n} MNIST report images, "
                 f"batch {batch}, fastest of {reps})", load0))
    print(table(rows, ["path", "seconds", "images_per_s"]))
    print(f"runner / bare images/s: whole job {job_ratio:.3f} ({'met' if job_ratio >= TARGET else 'NOT met'}), "
          f"AutoAttack unit {unit_ratio:.3f} ({'met' if unit_ratio >= TARGET else 'NOT met'}); target >= {TARGET}; "
          f"robust: bare {robust_bare}/{n}, runner {robust_runner}/{n}; runner's timings {r['timings_s']}")
    result = {"n": n, "batch": batch, "eps": eps, "attack": "autoattack (reference, standard)", "rows": rows,
              "job_ratio": job_ratio, "unit_ratio": unit_ratio, "robust_bare": robust_bare,
              "robust_runner": robust_runner, "runner_timings_s": r["timings_s"], "bare_runs_s": bare_runs,
              "runner_runs_s": runner_runs}
    save("evaluation_autoattack", result, load0)
    return result
