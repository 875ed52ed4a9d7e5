"""Reference AutoAttack: PyPI ``pyautoattack`` 0.2.0 (Croce & Hein's own code) behind a torchattacks-like call.

``ReferenceAutoAttack(model, eps=..., norm=..., version=..., seed=...)(x, y)`` returns adversarial
examples of the same shape as ``x``, in ``[0, 1]`` and inside the eps-ball, from AutoAttack run with the
reference's **own** configuration: the iteration counts, restarts and target classes that
``pyautoattack.AutoAttack(version=...)`` sets are never changed (``params()`` reads them back from the
configured attack objects, so the record states what ran, not what was assumed). For ``version="standard"``
at L∞ / L2 that is APGD-CE (100 iterations, 1 restart), APGD-T (targeted DLR, 100 iterations, 1 restart,
9 target classes), FAB-T (100 iterations, 1 restart, 9 target classes) and Square (5,000 queries, 1 restart,
``p_init`` 0.8), each run only on the points the previous ones left robust.

**What is attacked, what is returned.** ``model`` is the ensemble's differentiable view
(:meth:`ensemble_core.ensemble.Ensemble.attack_target`), returning ``(N, C)`` logits or log-probabilities.
AutoAttack attacks only the points that view classifies correctly and counts a point as broken when the
view's argmax leaves the true class; points it never breaks (including those the view misclassifies
clean) are returned **unchanged: the clean input**, never a failed perturbation. The caller scores every
returned example on the deployed rule. For a vote rule the view is a surrogate (log of mean
probabilities), so "broken" here means broken on the surrogate: a point the surrogate already gets wrong
clean is not attacked, and an example that fools the surrogate may still be classified correctly by the
vote; the deployed-rule scoring counts such a point as robust.

**Log-probabilities.** Every loss AutoAttack uses is sound on log-probabilities (all outputs ``<= 0``), as
well as on logits: APGD-CE's cross-entropy of ``log p`` is ``-log p_y`` (``softmax(log p) = p`` because
``sum p = 1``); the DLR and targeted-DLR losses and Square's margin use differences of outputs (the true
class is masked with ``-inf`` in Square, not zeroed), so they are invariant to a per-example shift and never
read a masked zero; FAB linearises the differences ``f_j - f_y`` and their gradients, whose zero set is the
decision boundary whatever the monotone map applied to the probabilities. The gradients of ``log p_j`` for
``j != y`` do not saturate when the ensemble is confident, which is why the margin losses keep working where
cross-entropy's gradient underflows. AutoAttack's own check for probability outputs (rows in ``[0, 1]``
summing to 1) does not fire on log-probabilities.

**Resume.** pyautoattack 0.2.0's own ``state_path`` cannot resume: its state file stores the attack set as
the string ``"{'apgd-ce', ...}"``, so a reloaded state never matches and ``run_standard_evaluation``
raises ``ValueError``; with that worked around it raises ``UnboundLocalError`` (``y_adv`` is only assigned
when no state was restored), and by design it would return only the examples of the resumed run. So this
wrapper drives pyautoattack's ``run_standard_evaluation`` one (component, batch) piece at a time -- on the
exact batches, in the exact order, that one uninterrupted ``run_standard_evaluation`` uses, each
component reseeding itself as the reference does, so the result is bit-for-bit the reference's (a unit
test checks it) -- and keeps its own state file (``state_path``): the robust flags, every adversarial
example found so far and the finished pieces, written atomically after every piece. A run stopped by an
exception or by ``should_stop`` resumes after its last finished piece; a finished run is returned from
the state without attacking again. A state file made with another model, other inputs, another seed or
configuration (a fingerprint mismatch) is ignored and overwritten, with a log line.

**Quiet, seeded, device.** Nothing is printed; pyautoattack's log records (logger ``auto-attack``) are
held back and its warnings (randomised outputs, probability outputs, zero gradients, too many target
classes, a dynamic defence, Square beating the gradient attacks) are collected in ``last_run["warnings"]``
(``verbose=True`` lets them through to the logging configuration). pyautoattack calls
``torch.manual_seed(seed)`` (and the CUDA seed) at the start of every component on every batch; the run
happens inside ``torch.random.fork_rng``, so the caller's random state is untouched and the result depends
only on ``seed``, the model and the inputs. Its dynamic-defence check installs and then clears a
``sys.settrace`` tracer; the caller's tracer (a debugger, coverage) is restored after each piece. The
attack runs on the model's device (its first parameter or buffer; else the inputs' device):
pyautoattack's ``device`` defaults to ``"cpu"``, so it is always passed explicitly; ``x`` is moved there
and the examples come back on ``x``'s device. Model parameters stop requiring grad during the call (FAB's
``backward`` would otherwise fill their ``.grad``) and are restored after.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyautoattack
import torch
from pyautoattack import AutoAttack
from torch import nn

PYAUTOATTACK_VERSION: str = getattr(pyautoattack, "__version__", "unknown")
STATE_FORMAT = "ensemble_core.reference_autoattack/1"
NORMS = ("Linf", "L2")
VERSIONS = ("standard", "plus", "rand")
_AA_LOGGER = "auto-attack"

log = logging.getLogger(__name__)


class ReferenceAutoAttackStopped(RuntimeError):
    """Raised between pieces when ``should_stop()`` returns True (the state, if any, was saved first)."""


class _Collect(logging.Handler):
    """Keeps pyautoattack's warning records (deduplicated, in order)."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.sink:
            self.sink.append(msg)


def _model_device(model: nn.Module | Callable[..., torch.Tensor]) -> torch.device | None:
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return None


def _tensor_digest(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


class ReferenceAutoAttack:
    """AutoAttack from ``pyautoattack``, callable like a torchattacks attack: ``atk(x, y) -> adv``.

    Args:
        model: the differentiable view to attack (``Ensemble.attack_target()``): ``(N, C)`` logits or
            log-probabilities, deterministic, in eval mode.
        eps: radius of the threat model (inputs are images in ``[0, 1]``).
        norm: ``"Linf"`` or ``"L2"``.
        version: pyautoattack's ``"standard"`` (default), ``"plus"`` or ``"rand"`` (20 EoT iterations,
            for randomised defences); its configuration is used unchanged.
        seed: pyautoattack's seed (every component reseeds with it); any integer in ``[0, 2**63)``.
        n_classes: number of classes; with fewer than 10, the targeted components use ``n_classes - 1``
            target classes instead of 9 (recorded in ``params()["deviations"]``).
        state_path: file for the resumable state (see the module docstring); ``None`` keeps nothing.
        batch_size: pyautoattack's ``batch_size`` (its default 250); the batches are the reference's.
        should_stop: polled before every piece; when it returns True the state is saved and
            :class:`ReferenceAutoAttackStopped` is raised.
        verbose: let pyautoattack's log records through to the logging configuration.
    """

    def __init__(self, model: nn.Module | Callable[..., torch.Tensor], *, eps: float, norm: str = "Linf",
                 version: str = "standard", seed: int = 0, n_classes: int = 10,
                 state_path: str | Path | None = None, batch_size: int = 250,
                 should_stop: Callable[[], bool] | None = None, verbose: bool = False) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed!r}")
        if n_classes < 4 and version != "rand":
            raise ValueError(f"AutoAttack's DLR losses need at least 4 classes, got {n_classes}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.eps, self.norm, self.version = float(eps), norm, version
        self.seed, self.n_classes, self.batch_size = int(seed), int(n_classes), int(batch_size)
        self.state_path = Path(state_path) if state_path is not None else None
        self.should_stop, self.verbose = should_stop, verbose
        self.last_run: dict[str, Any] = {}
        self._params = self._describe(self._build(torch.device("cpu")))

    # ---------------------------------------------------------------------------------- config
    def _build(self, device: torch.device) -> AutoAttack:
        aa = AutoAttack(self.model, eps=self.eps, norm=self.norm, seed=self.seed, version=self.version,
                        device=device)
        if self.n_classes - 1 < 9:  # the reference's 9 target classes need 10 classes
            aa.apgd_targeted.n_target_classes = self.n_classes - 1
            aa.fab.n_target_classes = self.n_classes - 1
        return aa

    def _describe(self, aa: AutoAttack) -> dict[str, Any]:
        comps: list[dict[str, Any]] = []
        for c in aa.attacks_to_run:
            if c in ("apgd-ce", "apgd-dlr"):
                a = aa.apgd
                comps.append({"name": c, "loss": "ce" if c == "apgd-ce" else "dlr", "n_iter": a.n_iter,
                              "n_restarts": a.n_restarts, "eot_iter": a.eot_iter, "rho": a.thr_decr})
            elif c == "apgd-t":
                a = aa.apgd_targeted
                comps.append({"name": c, "loss": "dlr-targeted", "n_iter": a.n_iter, "n_restarts": a.n_restarts,
                              "n_target_classes": a.n_target_classes, "eot_iter": a.eot_iter, "rho": a.thr_decr})
            elif c in ("fab", "fab-t"):
                f = aa.fab
                # run_standard_evaluation sets fab.n_restarts = 1 before FAB-T, whatever the version.
                comps.append({"name": c, "targeted": c == "fab-t", "n_iter": f.n_iter,
                              "n_restarts": 1 if c == "fab-t" else f.n_restarts,
                              **({"n_target_classes": f.n_target_classes} if c == "fab-t" else {}),
                              "alpha_max": f.alpha_max, "eta": f.eta, "beta": f.beta})
            elif c == "square":
                s = aa.square
                comps.append({"name": c, "n_queries": s.n_queries, "n_restarts": s.n_restarts, "p_init": s.p_init,
                              "loss": s.loss, "rescale_schedule": s.rescale_schedule})
        deviations = []
        if self.n_classes - 1 < 9:
            deviations.append(f"{self.n_classes} classes: {self.n_classes - 1} target classes instead of 9")
        return {"name": "autoattack", "implementation": f"pyautoattack {PYAUTOATTACK_VERSION} AutoAttack "
                                                        "(reference, Croce & Hein)",
                "pyautoattack_version": PYAUTOATTACK_VERSION, "version": self.version, "norm": self.norm,
                "eps": self.eps, "seed": self.seed, "batch_size": self.batch_size, "n_classes": self.n_classes,
                "components": comps, "component_names": [c["name"] for c in comps], "deviations": deviations,
                "success_criterion": "argmax of the attacked (differentiable) view != label; unbroken points "
                                     "are returned as the clean input"}

    def params(self) -> dict[str, Any]:
        """Everything the attack runs with, read back from the configured pyautoattack objects."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._params.items()}

    @property
    def components(self) -> list[str]:
        return list(self._params["component_names"])

    # ---------------------------------------------------------------------------------- state
    def _fingerprint(self, x: torch.Tensor, y: torch.Tensor) -> str:
        h = hashlib.sha256()
        h.update(repr((STATE_FORMAT, self._params)).encode())
        _tensor_digest(h, x)
        _tensor_digest(h, y)
        if isinstance(self.model, nn.Module):
            for k, t in self.model.state_dict().items():
                h.update(k.encode())
                _tensor_digest(h, t)
        return h.hexdigest()

    def _load_state(self, fp: str) -> dict[str, Any] | None:
        if self.state_path is None or not self.state_path.exists():
            return None
        try:
            st = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: start again
            log.info("reference AutoAttack: unreadable state %s (%s); starting afresh", self.state_path, e)
            return None
        if not isinstance(st, dict) or st.get("format") != STATE_FORMAT or st.get("fingerprint") != fp:
            log.info("reference AutoAttack: %s belongs to another run (model, inputs or configuration); "
                     "starting afresh", self.state_path)
            return None
        return st

    def _save_state(self, st: dict[str, Any]) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=self.state_path.name + ".")
        os.close(fd)
        try:
            torch.save(st, tmp)
            os.replace(tmp, self.state_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # ---------------------------------------------------------------------------------- running
    @contextlib.contextmanager
    def _quiet_and_seeded(self, device: torch.device, warnings_sink: list[str]) -> Iterator[None]:
        aa_log = logging.getLogger(_AA_LOGGER)
        handler = _Collect(warnings_sink)
        saved_propagate = aa_log.propagate
        aa_log.addHandler(handler)
        if not self.verbose:
            aa_log.propagate = False
        cuda = []
        if torch.cuda.is_available():
            cuda = sorted({torch.cuda.current_device(), *([device.index or 0] if device.type == "cuda" else [])})
        params = list(self.model.parameters()) if isinstance(self.model, nn.Module) else []
        grads = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.random.fork_rng(devices=cuda):
                yield
        finally:
            for p, r in zip(params, grads, strict=True):
                p.requires_grad_(r)
            aa_log.removeHandler(handler)
            aa_log.propagate = saved_propagate

    def _piece(self, aa: AutoAttack, comp: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aa.attacks_to_run = [comp]
        tracer = sys.gettrace()
        try:
            return aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
        finally:
            if sys.gettrace() is not tracer:
                sys.settrace(tracer)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward(x, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: AutoAttack's where it broke the point, else ``x`` itself."""
        if x.dim() < 2 or y.shape != (x.shape[0],):
            raise ValueError(f"expected x (N, ...) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        out_device, out_dtype = x.device, x.dtype
        device = _model_device(self.model) or x.device
        xd = x.detach().to(device=device, dtype=torch.float32)
        yd = y.detach().to(device=device, dtype=torch.long)
        n, bs = len(xd), self.batch_size
        fp = self._fingerprint(xd, yd)
        st = self._load_state(fp)
        resumed = st is not None
        warnings_sink: list[str] = list(st["warnings"]) if st else []
        run: dict[str, Any] = {"resumed": resumed, "pieces_run": [], "pieces_restored": 0, "n": n}
        aa = self._build(device)
        t_call = time.perf_counter()
        with self._quiet_and_seeded(device, warnings_sink):
            if st is None:
                # The reference's first pass: the view's predictions on every point, batch by batch.
                with torch.no_grad():
                    pred = torch.cat([self.model(xd[i:i + bs]).argmax(1) for i in range(0, n, bs)]) if n else \
                        torch.zeros(0, dtype=torch.long, device=device)
                st = {"format": STATE_FORMAT, "fingerprint": fp, "params": repr(self._params),
                      "robust": (pred == yd).cpu(), "clean_correct": int((pred == yd).sum()),
                      "x_adv": xd.cpu().clone(), "y_adv": pred.cpu(),
                      "done": [], "current": None, "current_idx": torch.zeros(0, dtype=torch.long),
                      "batches_done": 0, "broken": {}, "seconds": {}, "warnings": []}
                self._save_state(st)
            else:
                run["pieces_restored"] = sum(int(math.ceil(st["broken"][c][1] / bs)) for c in st["done"]) + \
                    int(st["batches_done"])
            robust = st["robust"].clone()
            for comp in self.components:
                if comp in st["done"]:
                    continue
                if st["current"] != comp:
                    st["current"], st["current_idx"], st["batches_done"] = comp, robust.nonzero().squeeze(1), 0
                    st["broken"][comp] = [0, int(st["current_idx"].numel())]
                    st["seconds"].setdefault(comp, 0.0)
                idx = st["current_idx"]
                n_batches = int(math.ceil(idx.numel() / bs))
                for b in range(int(st["batches_done"]), n_batches):
                    if self.should_stop is not None and self.should_stop():
                        st["warnings"] = list(warnings_sink)
                        self._save_state(st)
                        raise ReferenceAutoAttackStopped(f"stopped before {comp} batch {b + 1}/{n_batches}")
                    sel = idx[b * bs:(b + 1) * bs]
                    t0 = time.perf_counter()
                    xa, ya = self._piece(aa, comp, xd[sel.to(device)], yd[sel.to(device)])
                    broke = (ya != yd[sel.to(device)]).cpu()
                    hit = sel[broke]
                    robust[hit] = False
                    st["x_adv"][hit] = xa[broke.to(xa.device)].detach().cpu()
                    st["y_adv"][hit] = ya[broke.to(ya.device)].detach().cpu()
                    st["robust"] = robust.clone()
                    st["broken"][comp][0] += int(broke.sum())
                    st["seconds"][comp] += time.perf_counter() - t0
                    st["batches_done"] = b + 1
                    st["warnings"] = list(warnings_sink)
                    run["pieces_run"].append((comp, b, int(sel.numel())))
                    self._save_state(st)
                st["done"].append(comp)
                st["current"], st["current_idx"], st["batches_done"] = None, torch.zeros(0, dtype=torch.long), 0
                self._save_state(st)
        # The reference's Square check (check_square_sr never fires on one component at a time).
        sq = st["broken"].get("square")
        if sq and n and sq[0] / n > 0.002 and len(self.components) > 1:
            msg = (f"Square Attack has decreased the robust accuracy of {sq[0] / n:.2%}. This might indicate that "
                   "the robustness evaluation using AutoAttack is unreliable.")
            if msg not in warnings_sink:
                warnings_sink.append(msg)
        robust_after, left = {}, st["clean_correct"]
        for comp in self.components:
            if comp in st["broken"]:
                left -= st["broken"][comp][0]
            robust_after[comp] = left / n if n else float("nan")
        run.update(clean_acc=st["clean_correct"] / n if n else float("nan"), robust_acc=int(robust.sum()) / n
                   if n else float("nan"), robust_acc_after=robust_after,
                   broken={k: v[0] for k, v in st["broken"].items()},
                   attacked={k: v[1] for k, v in st["broken"].items()},
                   seconds=dict(st["seconds"]), wall_s=time.perf_counter() - t_call, warnings=list(warnings_sink),
                   robust=robust.clone(), y_adv=st["y_adv"].clone())
        self.last_run = run
        return st["x_adv"].to(device=out_device, dtype=out_dtype)


def reference_autoattack(model: nn.Module | Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
                         eps: float, norm: str = "Linf", version: str = "standard", seed: int = 0,
                         n_classes: int = 10, batch_size: int = 250) -> torch.Tensor:
    """The *bare* reference: one ``pyautoattack.AutoAttack(...).run_standard_evaluation`` call, nothing else.

    Used to check the wrapper (same examples bit for bit) and as the bare side of ``bench eval``. It is
    quiet but does not protect the caller's random state, tracer or parameter ``requires_grad``.
    """
    device = _model_device(model) or x.device
    aa = AutoAttack(model, eps=eps, norm=norm, seed=seed, version=version, device=device)
    if n_classes - 1 < 9:
        aa.apgd_targeted.n_target_classes = n_classes - 1
        aa.fab.n_target_classes = n_classes - 1
    aa_log, null = logging.getLogger(_AA_LOGGER), logging.NullHandler()
    saved, aa_log.propagate = aa_log.propagate, False
    aa_log.addHandler(null)  # without a handler, logging's last resort would print its warnings
    try:
        adv, _ = aa.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
    finally:
        aa_log.removeHandler(null)
        aa_log.propagate = saved
    return adv.to(x.device)
