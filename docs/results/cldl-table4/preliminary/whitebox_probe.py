"""Time the campaign's white-box suite on a small slice of one target (to extrapolate to the campaign's 500).

    OMP_NUM_THREADS=1 nice python docs/results/cldl-table4/preliminary/whitebox_probe.py cldl-3-4-4-s0 100

made ``whitebox-probe-cldl-3-4-4-s0-100.json`` beside this file (155 s on 2026-12-07, one thread, the campaign
training on the other core). Its figures are a probe of the suite's cost on a 100-image slice, not campaign
records; the campaign's evaluation units run the suite on 500 images.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ensemble_core.campaign import Paths, campaign_evaluation_spec, get_campaign
from ensemble_core.evaluation import run_evaluation

WHITE_BOX = ("white-box", "gradient-free", "worst-case")


def main(target: str, n: int) -> None:
    torch.set_num_threads(1)
    paths = Paths.of(get_campaign("cldl-table4"))
    ckpt = paths.checkpoint(target)
    spec = campaign_evaluation_spec("mnist", str(ckpt))
    checks = spec.get("checks", {})
    spec = {**spec, "n_examples": n, "transfer_n_examples": None, "transfer_attacks": [],
            "checks": {**checks, "n_examples": min(n, checks.get("n_examples", n))}}
    t0 = time.time()
    res = run_evaluation(spec, ckpt, out_dir=Path(tempfile.mkdtemp()), device="cpu", plots=False,
                         log=lambda m: print(f"  {m}", flush=True))
    recs = [r for r in res["records"] if r["model"] == "target" and r["threat"] in WHITE_BOX]
    for r in recs:
        print(r["attack"], r["eps"], round(100 * r["robust_acc"], 1), r.get("unreliable"), flush=True)
    wall = time.time() - t0
    print("wall", round(wall), "s for", n, "images", flush=True)
    out = Path(__file__).with_name(f"whitebox-probe-{target}-{n}.json")
    out.write_text(json.dumps({"wall_s": wall, "records": recs}, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
