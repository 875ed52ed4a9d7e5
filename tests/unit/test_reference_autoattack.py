"""Reference AutoAttack (pyautoattack 0.2.0) wiring, on tiny ensembles.

The tiny ensemble: 2 linear members on 1×4×4 inputs, 10 classes, log of mean probabilities. At eps 0.15
(``FULL``) APGD-CE breaks most points and two survive to every later component (APGD-T, FAB-T,
Square 5,000 queries: about 4 s per run, all of it pyautoattack's own loops); at eps 0.2 (``FAST``) APGD-CE
breaks every point in about 0.2 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ensemble_core.ensemble import Ensemble
from ensemble_core.evaluation.reference_autoattack import (
    PYAUTOATTACK_VERSION,
    ReferenceAutoAttack,
    ReferenceAutoAttackStopped,
    reference_autoattack,
)
from ensemble_core.evaluation.sanity import verify_witness, witness_problem

torch.set_num_threads(1)
FULL, FAST, BS = 0.15, 0.2, 8


def _tiny() -> tuple[Ensemble, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    members = []
    for _ in range(2):
        m = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
        with torch.no_grad():
            m[1].weight.copy_(torch.randn(10, 16, generator=g))
            m[1].bias.copy_(torch.randn(10, generator=g))
        members.append(m)
    ens = Ensemble(members, "log_mean_probs").eval()
    x = torch.rand(24, 1, 4, 4, generator=g)
    y = ens.predict(x)
    y[:3] = (y[:3] + 1) % 10  # three points misclassified clean: never attacked, returned as they are
    return ens, x, y


class Tripwire(nn.Module):
    """The ensemble, but its ``armed``-th forward call raises (an interruption mid-attack)."""

    def __init__(self, inner: nn.Module, armed: int | None) -> None:
        super().__init__()
        self.inner, self.armed, self.calls = inner, armed, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.armed is not None and self.calls == self.armed:
            raise KeyboardInterrupt("interrupted")
        return self.inner(x)


def _valid(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "Linf") -> None:
    assert adv.shape == x.shape and adv.dtype == x.dtype and torch.isfinite(adv).all()
    assert adv.min() >= 0 and adv.max() <= 1
    d = (adv - x).flatten(1)
    dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert (dist <= eps * (1 + 1e-5) + 1e-6).all()


@pytest.fixture(scope="module")
def tiny() -> tuple[Ensemble, torch.Tensor, torch.Tensor]:
    return _tiny()


@pytest.fixture(scope="module")
def bare_full(tiny: tuple[Ensemble, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One uninterrupted ``pyautoattack`` ``run_standard_evaluation`` at FULL: the reference's answer."""
    ens, x, y = tiny
    return reference_autoattack(ens, x, y, eps=FULL, seed=0, batch_size=BS)


def test_params_state_the_reference_standard_configuration() -> None:
    ens, _, _ = _tiny()
    p = ReferenceAutoAttack(ens, eps=0.3, seed=7).params()
    assert p["pyautoattack_version"] == PYAUTOATTACK_VERSION == "0.2.0"
    assert (p["version"], p["norm"], p["eps"], p["seed"], p["deviations"]) == ("standard", "Linf", 0.3, 7, [])
    comps = {c["name"]: c for c in p["components"]}
    assert list(comps) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (comps["apgd-ce"]["n_iter"], comps["apgd-ce"]["n_restarts"]) == (100, 1)
    for name in ("apgd-t", "fab-t"):
        assert (comps[name]["n_iter"], comps[name]["n_restarts"], comps[name]["n_target_classes"]) == (100, 1, 9)
    assert (comps["square"]["n_queries"], comps["square"]["n_restarts"], comps["square"]["p_init"]) == (5000, 1, 0.8)
    plus = ReferenceAutoAttack(ens, eps=0.3, version="plus").params()
    assert plus["component_names"] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert {c["name"]: c["n_restarts"] for c in plus["components"]}["apgd-ce"] == 5
    few = ReferenceAutoAttack(ens, eps=0.3, n_classes=5).params()
    assert {c["name"]: c.get("n_target_classes") for c in few["components"]}["apgd-t"] == 4 and few["deviations"]
    with pytest.raises(ValueError, match="norm"):
        ReferenceAutoAttack(ens, eps=0.3, norm="L0")


@pytest.mark.parametrize("norm,combine", [("Linf", "log_mean_probs"), ("Linf", "vote"), ("L2", "mean_logits")])
def test_breaks_every_point_where_an_adversarial_example_provably_exists(norm: str, combine: str) -> None:
    eps = 0.1 if norm == "Linf" else 1.0
    p = witness_problem(eps, norm, n=16, combine=combine)
    verify_witness(p)
    atk = ReferenceAutoAttack(p.ensemble.attack_target(), eps=eps, norm=norm, seed=0)
    adv = atk(p.x, p.y)
    _valid(adv, p.x, eps, norm)
    assert (p.ensemble.predict(adv) != p.y).all()  # scored on the deployed rule
    assert atk.last_run["robust_acc"] == 0.0 and atk.last_run["clean_acc"] == 1.0


def test_quiet_seeded_and_unbroken_points_returned_clean(tiny: tuple[Ensemble, torch.Tensor, torch.Tensor],
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    ens, x, y = tiny
    tracer = sys.gettrace()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a1 = ReferenceAutoAttack(ens, eps=FAST, seed=0, batch_size=BS)(x, y)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    assert sys.gettrace() is tracer  # pyautoattack's dynamic-defence check clears the tracer; restored
    torch.manual_seed(999)  # another global state: same examples
    a2 = ReferenceAutoAttack(ens, eps=FAST, seed=0, batch_size=BS)(x, y)
    assert torch.equal(a1, a2)
    _valid(a1, x, FAST)
    assert torch.equal(a1, reference_autoattack(ens, x, y, eps=FAST, seed=0, batch_size=BS))
    assert torch.equal(a1[:3], x[:3])  # misclassified clean: not attacked, returned as the clean input
    assert (ens.predict(a1[3:]) != y[3:]).all()
    assert all(p.requires_grad for p in ens.parameters())
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""


def test_matches_reference_and_resumes_after_an_interruption(tmp_path: Path, bare_full: torch.Tensor,
                                                             tiny: tuple[Ensemble, torch.Tensor, torch.Tensor]) -> None:
    ens, x, y = tiny
    state = tmp_path / "aa.pt"
    # APGD-CE on 3 batches of 8 takes about 330 forward calls: call 400 falls inside APGD-T.
    tw = Tripwire(ens, armed=400)
    with pytest.raises(KeyboardInterrupt):
        ReferenceAutoAttack(tw, eps=FULL, seed=0, batch_size=BS, state_path=state)(x, y)
    assert state.exists()
    tw.armed = None
    atk = ReferenceAutoAttack(tw, eps=FULL, seed=0, batch_size=BS, state_path=state)
    adv = atk(x, y)
    run = atk.last_run
    assert run["resumed"] and run["pieces_restored"] == 3  # the three APGD-CE batches
    ran = [c for c, _, _ in run["pieces_run"]]
    assert "apgd-ce" not in ran and ran[0] == "apgd-t" and {"fab-t", "square"} <= set(ran)
    assert torch.equal(adv, bare_full)  # bit for bit the uninterrupted reference
    _valid(adv, x, FULL)
    assert run["attacked"]["square"] >= 1 and run["robust_acc"] > 0  # every component really ran
    # A finished state: returned without attacking again.
    again = ReferenceAutoAttack(tw, eps=FULL, seed=0, batch_size=BS, state_path=state)
    assert torch.equal(again(x, y), bare_full) and again.last_run["pieces_run"] == []
    # The same file for another model (here the bare ensemble: other parameter names) starts afresh.
    assert not ReferenceAutoAttack(ens, eps=FULL, seed=0, batch_size=BS, state_path=state)._load_state(
        ReferenceAutoAttack(ens, eps=FULL, seed=0, batch_size=BS)._fingerprint(x, y))


def test_should_stop_between_pieces_and_foreign_states_ignored(
        tmp_path: Path, tiny: tuple[Ensemble, torch.Tensor, torch.Tensor]) -> None:
    ens, x, y = tiny
    state = tmp_path / "aa.pt"
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) == 2  # after the first APGD-CE batch

    with pytest.raises(ReferenceAutoAttackStopped):
        ReferenceAutoAttack(ens, eps=FAST, seed=0, batch_size=BS, state_path=state, should_stop=stop)(x, y)
    atk = ReferenceAutoAttack(ens, eps=FAST, seed=0, batch_size=BS, state_path=state)
    adv = atk(x, y)
    assert atk.last_run["pieces_restored"] == 1 and [b for _, b, _ in atk.last_run["pieces_run"]] == [1, 2]
    assert torch.equal(adv, reference_autoattack(ens, x, y, eps=FAST, seed=0, batch_size=BS))
    other = ReferenceAutoAttack(ens, eps=FAST, seed=1, batch_size=BS, state_path=state)  # another seed
    other(x, y)
    assert not other.last_run["resumed"] and len(other.last_run["pieces_run"]) == 3
