"""Every figure of the performance issue in one process run (by hand, not in CI).

    .venv/bin/python benchmarks/bench_all.py [--runs 9] [--gib 1]

1. an isolated warm ``list`` against in-process ``torch.hub.list`` and a cold isolated ``list``
   (``bench_warm.py``);
2. to 4. a 1 GiB ``load`` in both ``returns`` modes against ``torch.hub.load``, transport against
   ``clone()``, and peak RSS of the caller and the worker (``bench_transport.py``).

Each part prints its own table with medians and ratios; see those scripts for the details.
"""

from __future__ import annotations

import argparse

import bench_transport
import bench_warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--gib", type=float, default=1.0)
    opts = parser.parse_args()
    print("== 1. isolated list: warm, cold, in-process ==", flush=True)
    bench_warm.main(["--runs", str(max(opts.runs, 15))])
    print("\n== 2-4. 1 GiB loads, transport, peak memory ==", flush=True)
    bench_transport.main(["--runs", str(opts.runs), "--gib", str(opts.gib)])


if __name__ == "__main__":
    main()
