"""Cost of isolation: a worker per call against the in-process path and plain torch.hub.

Run by hand (not in CI)::

    .venv/bin/python benchmarks/bench_isolation.py [--runs 5]
    SAFEHUB_WARM=0 .venv/bin/python benchmarks/bench_isolation.py   # a cold worker per call

Isolated calls take the default path: forked from the warm zygote (its one-off start falls in
the first run of the first row, which the median leaves out), or cold with ``SAFEHUB_WARM=0``.
``benchmarks/bench_warm.py`` compares the two on ``list``.

Every figure is the median of ``--runs`` runs, measured in this one process and on the same
local hubconf folders, so the ratios compare like with like. The floor for any cold worker that
touches tensors is a fresh ``python -I -c "import torch"``, measured too.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from safehub._run import run_isolated  # noqa: E402
from safehub._sandbox import Sandbox  # noqa: E402
from safehub._worker import hubconf as hubconf_helper  # noqa: E402
from _common import forgetting_modules  # noqa: E402 - this folder is on sys.path


TORCH_HUBCONF = '''
    dependencies = ["torch"]
    import torch
    from torch import nn


    def small():
        """About 1 MB of float32 parameters."""
        return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))


    def big():
        """About 256 MB of float32 parameters."""
        return nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(4)])
'''

PURE_HUBCONF = '''
    dependencies = []


    def answer():
        """No torch at all."""
        return {"answer": 42}
'''


def median_time(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def in_process(repo: Path, action: str, model: str | None = None) -> Any:
    with forgetting_modules(), hubconf_helper.prepended_sys_path(str(repo)):
        module = hubconf_helper.import_hubconf(str(repo))
        if action == "list":
            return hubconf_helper.list_entrypoints(module)
        return hubconf_helper.get_entrypoint(module, model)()


def torch_hub_load(repo: Path, model: str) -> Any:
    with forgetting_modules():
        return torch.hub.load(str(repo), model, source="local")


def cold_import_torch() -> None:
    # os._exit, as the worker does: interpreter teardown after torch costs a few tenths of a second.
    subprocess.run([sys.executable, "-I", "-c", "import os, torch; os._exit(0)"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    sandbox = Sandbox(timeout=600)
    with tempfile.TemporaryDirectory(prefix="safehub-bench-") as tmp:
        torch_repo, pure_repo = Path(tmp, "torch_repo"), Path(tmp, "pure_repo")
        for repo, text in ((torch_repo, TORCH_HUBCONF), (pure_repo, PURE_HUBCONF)):
            repo.mkdir()
            (repo / "hubconf.py").write_text(textwrap.dedent(text))

        rows: list[tuple[str, float | None, float, float]] = []

        def row(label: str, hub: Callable[[], Any] | None, local: Callable[[], Any], isolated: Callable[[], Any]) -> None:
            hub_s = median_time(hub, runs) if hub else None
            rows.append((label, hub_s, median_time(local, runs), median_time(isolated, runs)))
            print(f"  measured {label}", file=sys.stderr)

        row(
            "list, pure-Python hubconf",
            None,
            lambda: in_process(pure_repo, "list"),
            lambda: run_isolated(pure_repo, "list", sandbox=sandbox),
        )
        row(
            "load object, pure-Python",
            lambda: torch_hub_load(pure_repo, "answer"),
            lambda: in_process(pure_repo, "load", "answer"),
            lambda: run_isolated(pure_repo, "load", model="answer", sandbox=sandbox),
        )
        row(
            "list, hubconf imports torch",
            None,
            lambda: in_process(torch_repo, "list"),
            lambda: run_isolated(torch_repo, "list", sandbox=sandbox),
        )
        for model in ("small", "big"):
            row(
                f"load {model}, returns=object",
                lambda m=model: torch_hub_load(torch_repo, m),
                lambda m=model: in_process(torch_repo, "load", m),
                lambda m=model: run_isolated(torch_repo, "load", model=m, sandbox=sandbox),
            )
            row(
                f"load {model}, returns=weights",
                lambda m=model: torch_hub_load(torch_repo, m).state_dict(),
                lambda m=model: in_process(torch_repo, "load", m).state_dict(),
                lambda m=model: run_isolated(torch_repo, "load", model=m, returns="weights", sandbox=sandbox),
            )
        floor = median_time(cold_import_torch, runs)

    print(f"\nmedian of {runs} runs, seconds; torch {torch.__version__}, Python {sys.version.split()[0]}\n")
    header = (
        f"{'call':32} {'torch.hub':>10} {'in-process':>11} {'isolated':>9} {'iso/hub':>8} {'iso/in-proc':>12}"
        f" {'iso-in-proc':>12}"
    )
    print(header)
    print("-" * len(header))
    for label, hub_s, local_s, isolated_s in rows:
        hub_text = f"{hub_s:10.3f}" if hub_s is not None else f"{'-':>10}"
        ratio_hub = f"{isolated_s / hub_s:7.1f}x" if hub_s else f"{'-':>8}"
        print(
            f"{label:32} {hub_text} {local_s:11.3f} {isolated_s:9.3f} {ratio_hub} {isolated_s / local_s:11.1f}x"
            f" {isolated_s - local_s:11.3f}s"
        )
    print(f"\nfloor: a fresh `python -I -c 'import os, torch; os._exit(0)'` takes {floor:.3f} s")


if __name__ == "__main__":
    main()
