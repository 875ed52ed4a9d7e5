"""Automatic sanity flags, in the spirit of AutoAttack's ``checks.py`` (shared anchors §2.2, §2.7).

Each check is a small function over per-example results; a raised flag names the model (and, where it
applies, the attack and eps), says what was seen and what it suggests, and marks the records it
concerns ``unreliable``. Checks:

* ``randomized_outputs``: two forward passes on the same clean input differ (use EoT / the ``rand`` version).
* ``probability_outputs``: the attacked outputs are probabilities (CE on them is a weak objective).
* ``zero_gradients``: the input gradient of the attack objective is exactly zero at clean points.
* ``gradient_free_beats_white_box`` / ``transfer_beats_white_box``: Square, or examples crafted on a
  surrogate, break more examples than the white-box attacks at the same or a larger eps.
* ``single_step_beats_iterative``: FGSM breaks more than an iterative attack at the same eps.
* ``accuracy_not_decreasing_with_eps``: an attack's accuracy rises with eps, or the attack never moves
  accuracy below clean accuracy.
* ``not_chance_at_large_eps``: at a large eps (L∞ 0.5 lets every image become one grey image) accuracy
  stays above the most frequent class's share.
* ``pgd_not_converged``: the reported PGD run repeated with 2k steps (same restarts, losses and random
  starts) breaks clearly more examples than the reported k-step run.
* ``invalid_adversarial_examples``: an attack returned non-finite or out-of-ball examples (they were
  replaced by the clean input, never credited).
* ``surrogate_is_target``: a "transfer" surrogate has the target's weights.
* ``member_collapse``: a member's clean accuracy is more than ``checks.collapse_gap`` below the best member's.
* ``attack_failed_unit_test``: on a model built so that an adversarial example provably exists at 0.45·eps
  (``ensemble_core.evaluation.sanity``), the configured attack did not find it for every point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

WHITE_BOX_THREATS = ("white-box", "worst-case")
ALL_THREATS = ("white-box", "gradient-free", "worst-case", "transfer")


@dataclass
class Flag:
    name: str
    model: str
    message: str
    value: Any = None
    attack: str | None = None  # an attack label, or None for every attack
    eps: float | None = None  # one eps, or None for every eps
    threats: tuple[str, ...] = WHITE_BOX_THREATS
    details: dict[str, Any] = field(default_factory=dict)

    def applies_to(self, record: dict[str, Any]) -> bool:
        return (record["model"] == self.model and record["threat"] in self.threats
                and (self.attack is None or record["attack"] == self.attack)
                and (self.eps is None or abs(record["eps"] - self.eps) < 1e-12))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threats"] = list(self.threats)
        return d


def check_randomized(model: str, n_random: int, n: int) -> list[Flag]:
    if n_random == 0:
        return []
    return [Flag("randomized_outputs", model,
                 f"{n_random}/{n} examples gave different outputs on two forward passes of the same input: the "
                 "model is randomised; attack it with expectation over transformation (AutoAttack version='rand')",
                 n_random / max(n, 1), threats=ALL_THREATS)]


def check_probability_outputs(model: str, attacked_rule: str, n_probs: int, n: int) -> list[Flag]:
    if n == 0 or n_probs / n < 0.5:
        return []
    return [Flag("probability_outputs", model,
                 f"the attacked outputs ({attacked_rule}) are probabilities for {n_probs}/{n} examples: "
                 "cross-entropy on probabilities is a weak objective; attack logits or log-probabilities",
                 n_probs / n)]


def check_zero_gradients(model: str, n_zero_cw: int, n_zero_ce: int, n: int) -> list[Flag]:
    if n_zero_cw == 0:
        return []
    return [Flag("zero_gradients", model,
                 f"the input gradient of the CW margin is exactly zero at {n_zero_cw}/{n} clean examples "
                 f"({n_zero_ce}/{n} for cross-entropy): gradient masking (non-differentiable or saturated "
                 "layers); use BPDA, other losses, or gradient-free and transfer attacks",
                 n_zero_cw / max(n, 1), details={"zero_ce": n_zero_ce, "zero_cw": n_zero_cw, "n": n})]


def check_weaker_attack_beats_stronger(model: str, name: str, weak: dict[float, float], strong: dict[float, float],
                                       tol: float, weak_label: str, threats: tuple[str, ...] = WHITE_BOX_THREATS
                                       ) -> list[Flag]:
    """Flag when ``weak`` (accuracy by eps) is below ``strong`` at the same or a larger eps by more than ``tol``."""
    worst = None
    for e_w, acc_w in weak.items():
        for e_s, acc_s in strong.items():
            if e_s >= e_w - 1e-12 and acc_w < acc_s - tol and (worst is None or acc_s - acc_w > worst[2]):
                worst = (e_w, e_s, acc_s - acc_w, acc_w, acc_s)
    if worst is None:
        return []
    e_w, e_s, gap, acc_w, acc_s = worst
    return [Flag(name, model,
                 f"{weak_label} reaches {acc_w:.3f} at eps {e_w:g}, below the white-box attacks' {acc_s:.3f} at eps "
                 f"{e_s:g}: the white-box attacks are not finding adversarial examples that exist (gradient masking "
                 "or a weak configuration)", gap, threats=threats,
                 details={"eps_weak": e_w, "eps_white_box": e_s, "acc_weak": acc_w, "acc_white_box": acc_s})]


# The "no progress at all" variant only fires when the sweep reaches an eps where every sound attack
# breaks some examples of an undefended [0, 1]-image classifier (13/255 L∞, 0.5 L2).
NO_PROGRESS_MIN_EPS = {"Linf": 0.05, "L2": 0.5}


def check_monotone(model: str, attack: str, by_eps: dict[float, float], clean_acc: float, tol: float,
                   threat: str, norm: str = "Linf") -> list[Flag]:
    flags: list[Flag] = []
    eps = sorted(by_eps)
    rises = [(a, b) for a, b in zip(eps, eps[1:], strict=False) if by_eps[b] > by_eps[a] + tol]
    if rises:
        a, b = rises[0]
        flags.append(Flag("accuracy_not_decreasing_with_eps", model,
                          f"{attack}: accuracy rises from {by_eps[a]:.3f} at eps {a:g} to {by_eps[b]:.3f} "
                          f"at eps {b:g}; "
                          "a larger ball contains the smaller one, so the attack is not finding what exists",
                          by_eps[b] - by_eps[a], attack=attack, threats=(threat, "worst-case")))
    elif eps and clean_acc > 0 and by_eps[eps[-1]] >= clean_acc - 1e-12 and eps[-1] >= NO_PROGRESS_MIN_EPS[norm]:
        flags.append(Flag("accuracy_not_decreasing_with_eps", model,
                          f"{attack}: accuracy stays at the clean accuracy {clean_acc:.3f} up to eps {eps[-1]:g}: the "
                          "attack made no progress at all", 0.0, attack=attack, threats=(threat, "worst-case")))
    return flags


def check_member_collapse(model: str, member_acc: list[float], gap: float, n: int) -> list[Flag]:
    """A member far below the best member's clean accuracy: the ensemble is not what its size says."""
    accs = [a for a in member_acc if a == a]  # drop NaN (no examples)
    if len(accs) < 2 or n == 0:
        return []
    best, worst = max(accs), min(accs)
    if best - worst <= gap:
        return []
    k = member_acc.index(worst)
    return [Flag("member_collapse", model,
                 f"member {k} classifies {worst:.3f} of the {n} white-box images correctly clean, against "
                 f"{best:.3f} for the best member: it has collapsed (undertrained, or pushed off the data by a "
                 "diversity term); the ensemble's robustness rests on fewer members than it has",
                 best - worst, threats=ALL_THREATS, details={"member": k, "member_clean_acc": member_acc,
                                                             "gap": gap})]


def check_large_eps(model: str, norm: str, eps: float, acc: float, n: int, majority_share: float,
                    tol: float) -> list[Flag]:
    if n == 0 or acc <= majority_share + tol:
        return []
    return [Flag("not_chance_at_large_eps", model,
                 f"at {norm} eps {eps:g} (where every image can be moved to the same image) PGD leaves accuracy "
                 f"{acc:.3f} on {n} examples, above the most frequent class's share {majority_share:.3f}: the "
                 "attack cannot follow the model's gradients", acc, details={"eps": eps, "norm": norm, "n": n})]


def check_convergence(model: str, attack: str, eps: float, steps: int, acc_k: float, acc_2k: float, n: int,
                      tol: float) -> list[Flag]:
    if acc_k - acc_2k <= tol:
        return []
    return [Flag("pgd_not_converged", model,
                 f"{attack} at eps {eps:g}: {2 * steps} steps reach {acc_2k:.3f} against the reported {acc_k:.3f} "
                 f"with {steps} (same restarts, on {n} examples): the attack has not converged; use more steps",
                 acc_k - acc_2k, details={"eps": eps, "steps": steps, "acc_k": acc_k, "acc_2k": acc_2k, "n": n})]


def check_invalid(model: str, attack: str | None, count: int, threats: tuple[str, ...]) -> list[Flag]:
    if count == 0:
        return []
    where = attack or "an attack"
    return [Flag("invalid_adversarial_examples", model,
                 f"{where} returned {count} non-finite or out-of-ball examples (replaced by the clean input, so "
                 "they count as not fooled); the attack is numerically unstable on this model", count,
                 attack=attack, threats=threats)]


def check_surrogate_is_target(model: str, surrogate: str) -> list[Flag]:
    return [Flag("surrogate_is_target", model,
                 f"the transfer surrogate {surrogate!r} has the same weights as {model!r}: this is a white-box "
                 "attack, not black-box transfer", 1, threats=("transfer",))]


def check_unit_test(model: str, attack: str, eps: float, missed: int, n: int, threats: tuple[str, ...]) -> list[Flag]:
    if missed == 0:
        return []
    return [Flag("attack_failed_unit_test", model,
                 f"{attack} at eps {eps:g} missed {missed}/{n} adversarial examples that provably exist at distance "
                 f"{0.45 * eps:g} on the attack unit-test model (Zimmermann et al. 2022): this configuration is "
                 "too weak to trust its robust accuracy", missed / max(n, 1), attack=attack, eps=eps, threats=threats)]


def apply_flags(records: Iterable[dict[str, Any]], flags: list[Flag]) -> None:
    """Attach the names of the flags that concern each record and set ``unreliable``."""
    for r in records:
        names = sorted({f.name for f in flags if f.applies_to(r)})
        r["flags"] = names
        r["unreliable"] = bool(names)
