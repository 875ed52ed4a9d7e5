"""Reference AutoAttack (pyautoattack 0.2.0) against torchattacks' port, on trained ensembles.

``python -m bench.autoattack_crosscheck [--checkpoint PATH ...] [--eps 0.1 0.2 0.3] [--n 200] [--seed 0]``

For each checkpoint and L∞ eps, on the same ``n`` MNIST report images (``test_subset("report", n, 0)``),
attacks the images the deployed rule classifies correctly (as the evaluation runner does) with

* ``reference``: :class:`ensemble_core.evaluation.reference_autoattack.ReferenceAutoAttack`, version
  ``standard`` (APGD-CE 100 iterations, APGD-T 100 × 9 targets, FAB-T 100 × 9 targets, Square 5,000
  queries; 1 restart each);
* ``port``: ``torchattacks.AutoAttack(target, norm, eps, version="standard", n_classes=10, seed)``, exactly
  what the runner's ``autoattack`` ran until now (APGD, APGD-T and FAB at torchattacks' default 10 steps);
* ``port-100`` (``--port100``): the port's components built by hand at the reference's 100 steps
  (``APGD``, ``APGDT``, ``FAB(multi_targeted)``, ``Square(5000)`` in a ``MultiAttack``), to tell the step
  count apart from the rest of the port,

each on the ensemble's attack target (``Ensemble.attack_target()``), under one seed, and scores every
example on the deployed rule (``ens.predict(adv) == y``; out-of-ball or non-finite rows would be counted and
replaced by the clean image). Reports robust accuracy over all ``n`` images, per-image agreement with the
reference, the images each side breaks alone, the reference's breaks per component, and wall time
(1 thread). Results go to ``$RE_BENCH_DIR/autoattack_crosscheck.json`` and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import header, save

DEFAULT_GLOBS = ("runs/leaderboard/budget-*/reproduce/mnist-*/baseline-m3/ensemble.pt",
                 "runs/leaderboard/budget-*/reproduce/mnist-*/methods/adv_en-m3-*/ensemble.pt")


def _seeded_call(atk: Any, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """``atk(x, y)`` under ``seed``, the caller's random state restored (as the runner runs attacks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return atk(x, y).detach()


def _valid(adv: torch.Tensor, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, int]:
    finite = torch.isfinite(adv).flatten(1).all(1)
    bad = ~finite | ((adv - x).abs().flatten(1).amax(1) > eps + 1e-5) | (adv < -1e-6).flatten(1).any(1) | \
        (adv > 1 + 1e-6).flatten(1).any(1)
    adv = torch.where(bad.view(-1, 1, 1, 1), x, adv)
    return adv, int(bad.sum())


def port_attack(target: torch.nn.Module, eps: float, seed: int, steps: int | None) -> Any:
    """torchattacks' AutoAttack ``standard`` (``steps=None``), or its components at ``steps`` iterations."""
    import torchattacks

    if steps is None:
        return torchattacks.AutoAttack(target, norm="Linf", eps=eps, version="standard", n_classes=10,
                                       seed=seed, verbose=False)
    return torchattacks.MultiAttack([
        torchattacks.APGD(target, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce"),
        torchattacks.APGDT(target, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=10),
        torchattacks.FAB(target, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, multi_targeted=True,
                         n_classes=10),
        torchattacks.Square(target, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed)])


def crosscheck(ens: Any, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int,
               variants: tuple[str, ...] = ("reference", "port")) -> dict[str, Any]:
    """Robust flags (over every image), time and validity of each variant at ``eps``; agreement with the reference."""
    from ensemble_core.evaluation.reference_autoattack import ReferenceAutoAttack

    target = ens.attack_target()
    with torch.no_grad():
        clean = ens.predict(x) == y
    idx = clean.nonzero().squeeze(1)
    out: dict[str, Any] = {"eps": eps, "n": len(x), "clean_correct": int(clean.sum())}
    flags: dict[str, torch.Tensor] = {}
    for v in variants:
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if v == "reference":
            atk = ReferenceAutoAttack(target, eps=eps, norm="Linf", seed=seed, n_classes=10)
            adv = atk(x[idx], y[idx])
            extra = {"broken_by_component": atk.last_run["broken"], "aa_warnings": atk.last_run["warnings"],
                     "seconds_by_component": {k: round(s, 1) for k, s in atk.last_run["seconds"].items()},
                     "params": atk.params()}
        else:
            atk = port_attack(target, eps, seed, None if v == "port" else int(v.split("-")[1]))
            adv = _seeded_call(atk, x[idx], y[idx], seed)
        seconds = time.perf_counter() - t0
        adv, invalid = _valid(adv, x[idx], eps)
        robust = torch.zeros(len(x), dtype=torch.bool)
        with torch.no_grad():
            robust[idx] = ens.predict(adv) == y[idx]
        flags[v] = robust
        out[v] = {"robust": int(robust.sum()), "robust_acc": float(robust.float().mean()), "seconds": seconds,
                  "invalid": invalid, **extra}
    if "reference" in flags:
        ref = flags["reference"]
        for v, f in flags.items():
            if v != "reference":
                out[v].update(agreement=float((f == ref).float().mean()),
                              broken_only_by_reference=int((f & ~ref).sum()),
                              broken_only_by_this=int((~f & ref).sum()))
    out["robust_flags"] = {v: "".join("1" if b else "0" for b in f.tolist()) for v, f in flags.items()}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.autoattack_crosscheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="*", help="ensemble.pt files (default: the leaderboard's MNIST baseline "
                                                   "and ADV-EN)")
    p.add_argument("--eps", nargs="*", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port100", action="store_true", help="also run the port's components at 100 steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="autoattack_crosscheck", help="name of the JSON under $RE_BENCH_DIR")
    args = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    from ensemble_core.checkpoint import checkpoint_spec, load_checkpoint, load_ensemble
    from ensemble_core.data import load_dataset, test_subset, to_float

    paths = args.checkpoint or sorted(q for g in DEFAULT_GLOBS for q in glob.glob(g))
    if not paths:
        p.error("no checkpoints found; pass --checkpoint")
    sub = test_subset(load_dataset("mnist", "test"), "report", args.n, 0)
    x, y = to_float(sub.images), sub.labels
    variants = ("reference", "port") + (("port-100",) if args.port100 else ())
    print(header(f"reference AutoAttack (pyautoattack) vs torchattacks' port, L∞, {args.n} MNIST report images, "
                 f"seed {args.seed}", load0))
    results = []
    for path in paths:
        spec = checkpoint_spec(load_checkpoint(path))
        ens = load_ensemble(path)
        model = {"path": path, "method": spec.get("method"), "members": spec.get("members"),
                 "epochs": spec.get("epochs"), "train_subset": spec.get("train_subset"), "seed": spec.get("seed"),
                 "deployed_rule": ens.combine, "attacked_rule": ens.attack_target().combine}
        for eps in args.eps:
            r = crosscheck(ens, x, y, eps, args.seed, variants)
            r["model"] = model
            results.append(r)
            cells = " | ".join(f"{v} {r[v]['robust_acc']:.1%} ({r[v]['seconds']:.0f} s"
                               + (f", agree {r[v]['agreement']:.1%}" if v != "reference" else "") + ")"
                               for v in variants)
            print(f"{model['method']} ({ens.combine}) eps {eps:g}: clean {r['clean_correct']}/{args.n} | {cells} | "
                  f"reference breaks {r['reference']['broken_by_component']}", flush=True)
            save(args.out, {"n": args.n, "seed": args.seed, "eps": args.eps, "variants": variants,
                            "results": results}, load0)
    print("\n| model (deployed → attacked) | ε | clean | reference AA | port | "
          + ("port, 100 steps | " if args.port100 else "") + "agreement (port) | only ref. breaks | only port breaks | "
          "time ref. / port (s) |")
    print("|---" * (9 + int(args.port100)) + "|")
    for r in results:
        m = r["model"]
        print(f"| {m['method']} ({m['deployed_rule']} → {m['attacked_rule']}) | {r['eps']:g} | "
              f"{r['clean_correct'] / r['n']:.1%} | {r['reference']['robust_acc']:.1%} | "
              f"{r['port']['robust_acc']:.1%} | "
              + (f"{r['port-100']['robust_acc']:.1%} | " if args.port100 else "")
              + f"{r['port']['agreement']:.1%} | {r['port']['broken_only_by_reference']} | "
              f"{r['port']['broken_only_by_this']} | {r['reference']['seconds']:.0f} / {r['port']['seconds']:.0f} |")
    path_out = Path(os.environ.get("RE_BENCH_DIR", "runs/bench")) / f"{args.out}.json"
    print(f"\nfull results: {path_out}")
    return json.loads(path_out.read_text())


if __name__ == "__main__":
    main()
