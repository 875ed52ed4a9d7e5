"""A fingerprint of the code that makes an evaluation's numbers (docs/evaluation.md, "Cache keys").

Every cached evaluation state and every crafted transfer example is keyed by it (with the attack plan, the
target checkpoint and the surrogates), so a change to the attacks, the scoring, the combine rules or the
test-subset selection recomputes instead of mixing rows from two versions of the code; reproduction pages and
the leaderboard print it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent  # ensemble_core/
# What the examples and their scoring depend on: the attacks and their loops, the objectives, the plan and the
# per-example bookkeeping, the attack unit tests, the reference AutoAttack wrapper, the combine rules (generic
# and the methods' vote rules) and the test-subset selection.
EVAL_SOURCES = ("evaluation/attacks.py", "evaluation/engine.py", "evaluation/objectives.py", "evaluation/runner.py",
                "evaluation/sanity.py", "evaluation/state.py", "evaluation/reference_autoattack.py", "ensemble.py",
                "methods/dkd.py", "methods/parl.py", "data.py")
LIBRARIES = ("torch", "torchattacks", "pyautoattack")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.lru_cache(maxsize=1)
def evaluation_code_fingerprint() -> str:
    """16 hex digits over :data:`EVAL_SOURCES` (contents) and the attack libraries' versions."""
    h = hashlib.sha256()
    for rel in EVAL_SOURCES:
        path = _ROOT / rel
        h.update(rel.encode())
        h.update(path.read_bytes() if path.exists() else b"<absent>")
    for lib in LIBRARIES:
        h.update(f"{lib}={_version(lib)}".encode())
    return h.hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """The evaluation-code fingerprint, the libraries and, where the code is a git checkout, its commit."""
    out: dict[str, Any] = {"evaluation_code": evaluation_code_fingerprint(),
                           "libraries": {lib: _version(lib) for lib in LIBRARIES}}
    try:
        top = _ROOT.parent
        commit = subprocess.run(["git", "-C", str(top), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(top), "status", "--porcelain", "--", "ensemble_core"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        out["git_commit"] = commit + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out
