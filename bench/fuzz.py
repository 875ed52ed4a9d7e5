"""Fuzz at scale: ``python -m bench fuzz`` runs the API fuzz tests with large counts (issue #27).

The CI run of ``tests/integration/test_fuzz_api.py`` keeps its small counts (24 cases per operation,
15 stateful sequences); this runs the same two tests in a pytest subprocess with
``RE_FUZZ_EXAMPLES`` (default 320 per operation: 5,000+ cases over the schema's operations, positive and
negative) and ``RE_FUZZ_STATEFUL_EXAMPLES`` (default 400 sequences of up to ``RE_FUZZ_STATEFUL_STEPS`` = 12
steps, chained by the links schemathesis infers), against ``create_app`` with auth on and a real
PostgreSQL. The property: no 5xx. It prints the tests' own figure lines and saves them to
``runs/bench/fuzz.json``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import header, save

TEST = "tests/integration/test_fuzz_api.py"


def run() -> None:
    """``python -m bench fuzz``."""
    load = os.getloadavg()[0]
    examples = os.environ.get("RE_FUZZ_EXAMPLES", "320")
    sequences = os.environ.get("RE_FUZZ_STATEFUL_EXAMPLES", "400")
    steps = os.environ.get("RE_FUZZ_STATEFUL_STEPS", "12")
    print(header(f"API fuzz at scale: {examples} cases per operation, {sequences} stateful sequences", load))
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "RE_FUZZ_EXAMPLES": examples, "RE_FUZZ_STATEFUL_EXAMPLES": sequences,
           "RE_FUZZ_STATEFUL_STEPS": steps, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", TEST], cwd=root,
                          env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    lines = [x for x in proc.stdout.splitlines() if x.startswith("fuzz")]
    for x in lines:
        print(x)
    figures: dict[str, object] = {"returncode": proc.returncode, "wall_s": wall, "lines": lines,
                                  "examples_per_operation": int(examples), "stateful_sequences": int(sequences),
                                  "stateful_steps": int(steps), "load_avg_1m_end": round(os.getloadavg()[0], 2)}
    m = re.search(r"fuzz: (\d+) cases", "\n".join(lines))
    s = re.search(r"fuzz stateful: (\d+) sequences, (\d+) steps \((\d+) following", "\n".join(lines))
    if m:
        figures["cases"] = int(m.group(1))
    if s:
        figures.update(sequences=int(s.group(1)), steps=int(s.group(2)), linked_steps=int(s.group(3)))
    path = save("fuzz", figures, load)
    print(f"fuzz: pytest exit {proc.returncode} in {wall:.0f} s -> {path}")
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:])
        raise SystemExit(1)


__all__ = ["run"]
