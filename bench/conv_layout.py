"""Memory layout of convolution weights on a CPU: default (NCHW) against channels-last, per architecture.

``ensemble_core.models.place`` stores convolution weights channels-last on a CPU (training, evaluation,
checkpoint loading). This benchmark times one member's passes of the kinds methods use (forward + backward,
input gradient, double backward) in both layouts, one thread, fastest of several runs, in the same process a
few seconds apart, and prints default / channels-last (> 1: channels-last is faster). It also checks that both
layouts give the same logits to float precision (same math, another summation order).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from bench.common import header, save, table, timeit_auto
from bench.methods import member_passes
from ensemble_core.models import build_model

ARCHS = (("lenet5", 1, 28, 128), ("dkd_mnist", 1, 28, 64), ("resnet20", 3, 32, 128))


def run(reps: int = 3) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for arch, channels, size, batch in ARCHS:
            torch.manual_seed(0)
            m = build_model(arch, num_classes=10, in_channels=channels, image_size=size)
            x, y = torch.rand(batch, channels, size, size), torch.randint(0, 10, (batch,))
            with torch.no_grad():
                ref = m(x)
            for name in ("fwd_bwd", "input_grad", "double"):
                m = m.to(memory_format=torch.contiguous_format)
                default = timeit_auto(member_passes(m, x, y)[name], reps)
                m = m.to(memory_format=torch.channels_last)
                last = timeit_auto(member_passes(m, x, y)[name], reps)
                rows.append({"arch": arch, "batch": batch, "pass": name, "default_ms": 1000 * default,
                             "channels_last_ms": 1000 * last, "ratio": default / last})
            with torch.no_grad():
                diff = float((m(x) - ref).abs().max())
            rows[-1]["max_logit_diff"] = diff
    finally:
        torch.set_num_threads(threads)
    print(header("convolution weight layout on a CPU, one member, one thread (ratio = default / channels-last; "
                 "> 1: channels-last faster)", load0))
    print(table(rows, ["arch", "batch", "pass", "default_ms", "channels_last_ms", "ratio", "max_logit_diff"]))
    result = {"rows": rows, "reps": reps}
    save("conv_layout", result, load0)
    return result


if __name__ == "__main__":
    run()
