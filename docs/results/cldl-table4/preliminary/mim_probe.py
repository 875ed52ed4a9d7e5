"""Why our MIM transfer examples differed from AdverTorch's (``advertorch_check.py``: about 1 point weaker).

Crafts the MIM transfer sets (10 steps of ε/5, decay 1.0, ε 0.2, on each baseline surrogate's log of mean
probabilities, CE and the CW margin κ 0.1) four ways on the same seeded 2,000-image slice as ``advertorch_check.py``
and scores the six seed-0 targets (per image, among clean-correct images):

- ``ours``: the engine's MIM (``ensemble_core/evaluation/engine.py``) with its zero-gradient guard;
- ``unguarded``: the same loop with ``MIM_ZERO_DIV = 0``, i.e. torchattacks' MIFGSM division (the engine before
  the guard): where the gradient is all zero it divides 0 by 0, the momentum turns NaN, ``sign`` gives 0 and the
  example stops for good;
- ``advertorch``: AdverTorch 0.2.3's ``LinfMomentumIterativeAttack`` with the loss as the LSD code passes it
  (batch-mean cross-entropy; the CW margin summed), as ``advertorch_check.py`` builds it;
- ``floor``: our loop with AdverTorch's normalisation, ``g / max(Σ|g|, 1e-6)`` of that loss's gradient.

It records, per variant pair, the share of identical examples, and per step the share of images whose gradient
has an L1 norm under 1e-6 (AdverTorch's floor). Needs AdverTorch beside the project (see ``advertorch_check.py``)::

    PYTHONPATH=/tmp/advertorch OMP_NUM_THREADS=1 nice python docs/results/cldl-table4/preliminary/mim_probe.py

It writes ``mim-probe.json`` beside this file.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from ensemble_core.campaign import Paths, campaign_evaluation_spec, get_campaign
from ensemble_core.data import to_float
from ensemble_core.evaluation import engine
from ensemble_core.evaluation.attacks import build_attack, run_attack
from ensemble_core.evaluation.runner import deployed_predict, load_model, prepare_plan, transfer_view
from ensemble_core.spec import AttackSpec

HERE = Path(__file__).resolve().parent
EPS, STEPS = 0.2, 10
_spec = importlib.util.spec_from_file_location("advertorch_check", HERE / "advertorch_check.py")
ac = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(ac)  # type: ignore[union-attr]


def floor_variant(view: Any, loss: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Our MIM loop with AdverTorch's normalisation; also the share of images under the floor at each step."""
    adv, g, small = x.clone(), torch.zeros_like(x), []
    for _ in range(STEPS):
        a = adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(ac.LOSSES[loss](view(a), y), a)
        l1 = grad.abs().flatten(1).sum(1)
        small.append(float((l1 < 1e-6).float().mean()))
        g = g + grad / l1.clamp_min(1e-6).view(-1, 1, 1, 1)
        adv = adv + EPS / 5 * g.sign()
        adv = (x + (adv - x).clamp(-EPS, EPS)).clamp(0, 1)
    return adv.detach(), small


def main() -> None:
    torch.set_num_threads(1)
    paths = Paths.of(get_campaign("cldl-table4"))
    ckpt = {u: paths.checkpoint(u) for u in ac.TARGETS}
    spec = {**campaign_evaluation_spec("mnist", str(ckpt[ac.TARGETS[0]])), "attacks": []}
    surs = {n: str(paths.checkpoint(u)) for n, u in ac.SURROGATES}
    plan = prepare_plan(spec, ckpt[ac.TARGETS[0]], surrogates=surs, dataset="mnist", device="cpu")
    x, y = to_float(plan.images[plan.in_tr]), plan.labels[plan.in_tr]
    targets = {u: load_model(str(p), u).ensemble.eval() for u, p in ckpt.items()}
    with torch.no_grad():
        clean = {u: deployed_predict(t, x) == y for u, t in targets.items()}
    variants = ("ours", "unguarded", "advertorch", "floor")
    robust = {v: {u: clean[u].clone() for u in targets} for v in variants}
    out: dict[str, Any] = {"eps": EPS, "steps": STEPS, "n_images": len(x), "torch": torch.__version__,
                           "mim_zero_div": engine.MIM_ZERO_DIV}
    b = ac.BATCH
    for s in plan.surrogates:
        view = transfer_view(s.ensemble).eval()
        for p in view.parameters():
            p.requires_grad_(False)
        for loss in ("ce", "cw"):
            t0 = time.time()
            spec_ = AttackSpec(name="mim", steps=STEPS, alpha_ratio=0.2, momentum=1.0, losses=[loss], kappa=0.1)
            made: dict[str, torch.Tensor] = {}
            made["ours"] = run_attack(build_attack(view, spec_, EPS, loss, num_classes=10), x, y, 0)
            guard, engine.MIM_ZERO_DIV = engine.MIM_ZERO_DIV, 0.0
            try:
                made["unguarded"] = run_attack(build_attack(view, spec_, EPS, loss, num_classes=10), x, y, 0)
            finally:
                engine.MIM_ZERO_DIV = guard
            atk = ac._attacks(view, EPS, loss)["mim"]
            made["advertorch"] = torch.cat([atk.perturb(x[i:i + b], y[i:i + b]).detach() for i in range(0, len(x), b)])
            parts = [floor_variant(view, loss, x[i:i + b], y[i:i + b]) for i in range(0, len(x), b)]
            made["floor"] = torch.cat([p[0] for p in parts])

            def same(p: torch.Tensor, q: torch.Tensor) -> float:
                return round(float(((p - q).abs().flatten(1).amax(1) < 1e-6).float().mean()), 4)

            res: dict[str, Any] = {
                "identical": {f"{v}/advertorch": same(made[v], made["advertorch"])
                              for v in ("ours", "unguarded", "floor")},
                "non-finite rows, unguarded": int((~torch.isfinite(made["unguarded"])).flatten(1).any(1).sum()),
                "share under AdverTorch's floor, per step": [round(sum(p[1][k] for p in parts) / len(parts), 4)
                                                              for k in range(STEPS)],
                "robust among clean-correct %": {}, "wall_s": round(time.time() - t0, 1)}
            with torch.no_grad():
                for u, t in targets.items():
                    res["robust among clean-correct %"][u] = {}
                    for v in variants:
                        ok = deployed_predict(t, torch.nan_to_num(made[v])) == y
                        robust[v][u] &= ok
                        res["robust among clean-correct %"][u][v] = round(
                            100 * float((ok & clean[u]).sum()) / float(clean[u].sum()), 2)
            out[f"{s.name} {loss}"] = res
            print(s.name, loss, json.dumps(res), flush=True)
    out["the CE+CW cell (worst case over both surrogates and both losses)"] = {
        u: {v: round(100 * float(robust[v][u].sum()) / float(clean[u].sum()), 2) for v in variants} for u in targets}
    print(json.dumps(out["the CE+CW cell (worst case over both surrogates and both losses)"]), flush=True)
    (HERE / "mim-probe.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
