"""``make bench`` / ``python -m bench [NAME ...]``: run benchmarks and print their ratios.

Each benchmark prints the machine and its load average at start; results also go to
``$RE_BENCH_DIR/<name>.json`` (default ``runs/bench``). They run one after another, never at once.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "methods": "bench.methods",
    "conv_layout": "bench.conv_layout",
    "data": "bench.data_path",
    "ddp": "bench.ddp",
    "service": "bench.service_overhead",
    "queue": "bench.queue_bench",
    "eval": "bench.evaluation",
    "eval-aa": "bench.evaluation:run_autoattack",
    "storm": "bench.storm",
    "fuzz": "bench.fuzz",
    "soak": "bench.soak",
    "ddp-pool": "bench.ddp_pool",
}
OPT_IN = {"soak", "ddp-pool"}  # long (tens of minutes; ddp-pool starts two Rays): run only when named


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("names", nargs="*", help=f"which benchmarks (default all but {', '.join(sorted(OPT_IN))}): "
                                            f"{', '.join(BENCHMARKS)}")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for name in args.names or [n for n in BENCHMARKS if n not in OPT_IN]:
        module, _, func = BENCHMARKS[name].partition(":")
        getattr(importlib.import_module(module), func or "run")()
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
