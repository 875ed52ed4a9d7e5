"""PNG plots of an evaluation (matplotlib, Agg backend): accuracy vs eps, target against baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLES = {"target": "-", "baseline": "--"}


def _line_style(model: str) -> str:
    return _STYLES.get(model, ":")


def plot_accuracy_vs_eps(result: dict[str, Any], threats: tuple[str, ...], norm: str, path: Path, title: str) -> bool:
    """Robust accuracy against eps, one colour per attack, solid target and dashed baseline; False if no data."""
    recs = [r for r in result["records"] if r["threat"] in threats and r["norm"] == norm
            and r["robust_acc"] is not None]
    if not recs:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    attacks = list(dict.fromkeys(r["attack"] for r in recs))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ai, attack in enumerate(attacks):
        for model in result["models"]:
            pts = sorted((r["eps"], r["robust_acc"], r["unreliable"]) for r in recs
                         if r["attack"] == attack and r["model"] == model)
            if not pts:
                continue
            worst = attack.startswith("worst case")
            with_transfer = "transfer" in attack
            # worst-case lines underneath (wide, translucent), the attacks on top
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], _line_style(model),
                    marker="D" if with_transfer else "s" if worst else "o",
                    color=("dimgrey" if with_transfer else "black") if worst else colours[ai % len(colours)],
                    linewidth=4 if worst else 1.5, alpha=0.45 if worst else 1.0, zorder=1 if worst else 3,
                    label=f"{model}: {attack}")
            bad = [p for p in pts if p[2]]
            if bad:
                ax.scatter([p[0] for p in bad], [100 * p[1] for p in bad], s=140, facecolors="none",
                           edgecolors="red", linewidths=1.5, zorder=5)
    for model in result["models"]:
        ax.axhline(100 * result["clean"][model]["clean_acc"], color="grey", linestyle=_line_style(model),
                   linewidth=0.8)
    ax.set_xlabel(f"eps ({norm})")
    ax.set_ylabel("robust accuracy (%) over all examples")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    n = recs[0]["n_examples"]
    ax.set_title(f"{title}\n{result['dataset']}, {n} examples, seed {result['seed']}; red ring = flagged", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_member_transfer(result: dict[str, Any], model: str, path: Path) -> bool:
    mt = result["member_transfer"].get(model)
    if not mt:
        return False
    acc = mt["accuracy"]
    k = len(acc)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.1 * k + 1.5), dpi=110)
    im = ax.imshow([[100 * v for v in row] for row in acc], vmin=0, vmax=100, cmap="viridis")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{100 * acc[i][j]:.0f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(k), [f"m{j}" for j in range(k)])
    ax.set_yticks(range(k), [f"m{i}" for i in range(k)])
    ax.set_xlabel("evaluated on member j")
    ax.set_ylabel("crafted on member i")
    ax.set_title(f"{model}: accuracy (%) under member transfer\nPGD L∞ eps {mt['eps']:g}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_plots(result: dict[str, Any], out: Path) -> list[str]:
    names = []
    for norm in ("Linf", "L2"):
        name = f"robust_acc_vs_eps_{norm}.png"
        if plot_accuracy_vs_eps(result, ("white-box", "gradient-free", "worst-case"), norm, out / name,
                                f"White-box and gradient-free attacks ({norm})"):
            names.append(name)
    if plot_accuracy_vs_eps(result, ("transfer",), "Linf", out / "transfer_acc_vs_eps.png",
                            "Black-box transfer (worst case over surrogates and losses)"):
        names.append("transfer_acc_vs_eps.png")
    for model in result["member_transfer"]:
        name = f"member_transfer_{model}.png"
        if plot_member_transfer(result, model, out / name):
            names.append(name)
    return names
