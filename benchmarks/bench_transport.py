"""Tensor transport: isolated loads of a ~1 GiB model against torch.hub, memfds against clone(), memory.

Run by hand (not in CI)::

    .venv/bin/python benchmarks/bench_transport.py [--runs 5] [--gib 1] [--no-cold]

In one process, every figure the median of ``--runs`` runs, on one local hubconf whose entrypoint
builds ``--gib`` GiB of float32 parameters (16 Linear layers, each filled with its own value, so
building is cheap and deterministic; the build counts in every column):

(a) ``safehub.load(repo, "big", source="local", isolate=True, returns=...)`` for "weights" and
    "object", warm (forked by the zygote, the default) and cold (a fresh interpreter), against
    an in-process ``torch.hub.load(repo, "big", source="local")``. "returned": until the call
    returns; "+ read": and every byte of the result read once (the mapped pages faulted in).
(b) the transport alone, in this process: the worker's encoder into sealed memfds, their private
    mapping and the decoder, against ``clone()`` of the same bytes into fresh memory.
(c) peak RSS, each case in a fresh subprocess: the parent's ``ru_maxrss`` after it read every
    byte of the result, and the worker's, sampled with psutil (the warm worker is the
    zygote's child, so ``RUSAGE_CHILDREN`` would not see it).

Targets (issue 5): an isolated 1 GiB load within 1.25x of torch.hub in both modes; transport at
least as fast as clone(); parent peak RSS under 1.3x the result. The figures stay under 4 GiB of
memory for --gib 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import safehub  # noqa: E402
from safehub._memfds import map_sealed_memfd  # noqa: E402
from safehub._results import decode_object, decode_weights  # noqa: E402
from safehub._worker import objects, weights  # noqa: E402
from _common import forgetting_modules  # noqa: E402 - this folder is on sys.path


GIB = 1024**3
HUBCONF = '''
    dependencies = ["torch"]
    import torch
    from torch import nn


    def big(gib=1.0, layers=16):
        """About `gib` GiB of float32 parameters: square Linear layers, each filled with its own value."""
        width = int((gib * 2**30 / 4 / layers) ** 0.5)
        model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(layers)])
        for i, layer in enumerate(model):
            # Filled, not initialised at random, and not built on the meta device: its first use in
            # a process costs a quarter of a second, which every fresh worker would pay.
            layer.in_features = layer.out_features = width
            layer.weight = nn.Parameter(torch.full((width, width), 1.0 / (i + 1)))
            layer.bias = nn.Parameter(torch.full((width,), 1.0 / (i + 1)))
        return model
'''


def tensors_of(result: Any) -> list[torch.Tensor]:
    values = result.values() if isinstance(result, dict) else result.parameters()
    return [t.detach() for t in values]


def read_all(result: Any) -> float:
    return sum(float(t.sum()) for t in tensors_of(result))


def load(repo: Path, how: str, gib: float) -> Any:
    if how == "torch.hub":
        with forgetting_modules():
            return torch.hub.load(str(repo), "big", source="local", verbose=False, gib=gib)
    returns = how.split()[-1]
    return safehub.load(str(repo), "big", source="local", isolate=True, returns=returns, verbose=False, gib=gib)


def timed(fn: Callable[[], Any], then: Callable[[Any], Any] | None = None) -> tuple[float, float]:
    """(seconds until fn returned, seconds until ``then`` was done with its result too)."""
    gc.collect()
    start = time.perf_counter()
    result = fn()
    returned = time.perf_counter() - start
    if then is not None:
        then(result)
    done = time.perf_counter() - start
    del result
    gc.collect()
    return returned, done


def medians(samples: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    return {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for k, v in samples.items()}


@contextlib.contextmanager
def warm_path(on: bool):
    before = os.environ.get("SAFEHUB_WARM")
    os.environ["SAFEHUB_WARM"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["SAFEHUB_WARM"]
        else:
            os.environ["SAFEHUB_WARM"] = before


# -- (a) whole loads ---------------------------------------------------------------------------


def bench_loads(repo: Path, gib: float, runs: int, cold: bool) -> dict[str, tuple[float, float]]:
    ways = ["torch.hub", "safehub weights", "safehub object"]
    if cold:
        ways += ["safehub cold weights", "safehub cold object"]
    safehub.warmup()
    for how in ways:  # once each first: the zygote, caches, torch's own first-call costs
        with warm_path("cold" not in how):
            timed(lambda how=how: load(repo, how, gib))
    samples: dict[str, list[tuple[float, float]]] = {how: [] for how in ways}
    for _ in range(runs):  # interleaved, so drift in the machine hits every way alike
        for how in ways:
            with warm_path("cold" not in how):
                samples[how].append(timed(lambda how=how: load(repo, how, gib), read_all))
    return medians(samples)


# -- (b) the transport alone -------------------------------------------------------------------


def through_memfds(parts: list, metadata: dict, decode: Callable[[list], Any]) -> Any:
    written = weights.parts_to_memfds(parts, metadata)
    try:
        return decode([map_sealed_memfd(fd) for fd, _ in written])
    finally:
        for fd, _ in written:
            os.close(fd)


def bench_transport(gib: float, runs: int) -> tuple[dict[str, tuple[float, float]], int]:
    n = int(gib * GIB) // 4 // 16
    many = {f"w{i}": torch.full((n,), float(i)) for i in range(16)}
    one = {"w": torch.cat(list(many.values()))}
    def as_weights(tensors: dict) -> Any:
        return through_memfds(weights.weights_parts(tensors), weights.WEIGHTS_METADATA, decode_weights)

    def as_object(tensors: dict) -> Any:
        return through_memfds(objects.dumps(tensors, weights.DTYPE_NAMES), objects.OBJECT_METADATA, decode_object)

    ways: dict[str, Callable[[], Any]] = {
        "clone(), 16 tensors": lambda: {k: v.clone() for k, v in many.items()},
        "clone(), 1 tensor": lambda: {k: v.clone() for k, v in one.items()},
        "memfd weights, 16 tensors": lambda: as_weights(many),
        "memfd weights, 1 tensor": lambda: as_weights(one),
        "memfd object, 16 tensors": lambda: as_object(many),
        "memfd object, 1 tensor": lambda: as_object(one),
    }
    for fn in ways.values():
        timed(fn)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(runs):
        for name, fn in ways.items():
            samples[name].append(timed(fn, read_all))
    return medians(samples), 16 * n * 4


# -- (c) peak memory, one fresh process per case -----------------------------------------------


def child(how: str, repo: str, gib: float) -> None:
    """One load in this fresh process; print its memory figures as JSON."""
    import resource

    import psutil

    me = psutil.Process()
    if how != "torch.hub":
        safehub.warmup()  # the zygote is its own process: started before the baseline
    gc.collect()
    baseline = me.memory_info().rss
    peaks: dict[int, int] = {}
    stop = threading.Event()

    def zygotes() -> set[int]:
        # The zygote is this process's child; its forks (the workers) share its command line.
        return {p.pid for p in me.children() if "--zygote" in " ".join(p.cmdline())}

    skip = zygotes()
    zygote_rss = sum(psutil.Process(pid).memory_info().rss for pid in skip)

    def sample() -> None:
        while not stop.is_set():
            for proc in me.children(recursive=True):
                if proc.pid not in skip:
                    with contextlib.suppress(psutil.Error):
                        peaks[proc.pid] = max(peaks.get(proc.pid, 0), proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = load(Path(repo), how, gib)
    read_all(result)
    stop.set()
    sampler.join()
    left = [p for p in me.children(recursive=True) if p.pid not in skip]
    print(
        json.dumps(
            {
                "result": sum(t.nbytes for t in tensors_of(result)),
                "baseline": baseline,
                "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "worker_peak": max(peaks.values(), default=0),
                "workers_left": len(left),
                "zygote": zygote_rss,
            }
        )
    )


def bench_memory(repo: Path, gib: float) -> dict[str, dict[str, int]]:
    out = {}
    for how in ("torch.hub", "safehub weights", "safehub object"):
        done = subprocess.run(
            [sys.executable, __file__, "--child", how, "--repo", str(repo), "--gib", str(gib)],
            check=True, capture_output=True, text=True,
        )
        out[how] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# -- report ------------------------------------------------------------------------------------


def report(loads: dict, transport: dict, nbytes: int, memory: dict, runs: int, gib: float) -> None:
    print(f"\nmedian of {runs} runs; {gib:g} GiB of float32; torch {torch.__version__}, Python {sys.version.split()[0]}, "
          f"{len(os.sched_getaffinity(0))} cores\n")
    hub = loads["torch.hub"]
    print(f"(a) whole load, seconds        {'returned':>9} {'+ read':>9} {'/ hub':>7} {'/ hub +r':>9}")
    for how, (returned, done) in loads.items():
        print(f"    {how:26} {returned:9.3f} {done:9.3f} {returned / hub[0]:6.2f}x {done / hub[1]:8.2f}x")
    print(f"\n(b) transport of {nbytes / GIB:g} GiB, seconds {'done':>9} {'GB/s':>6} {'+ read':>9} {'/ clone':>8} {'/ clone +r':>10}")
    for name, (returned, done) in transport.items():
        base = transport["clone(), 1 tensor" if name.endswith("1 tensor") else "clone(), 16 tensors"]
        print(f"    {name:29} {returned:9.3f} {nbytes / returned / 1e9:6.2f} {done:9.3f} "
              f"{returned / base[0]:7.2f}x {done / base[1]:9.2f}x")
    print(f"\n(c) peak RSS, MiB              {'parent':>8} {'baseline':>9} {'added':>7} {'peak/res':>9} "
          f"{'added/res':>10} {'worker':>7} {'zygote':>7} {'left':>5}")
    for how, m in memory.items():
        mib = 1024 * 1024
        print(f"    {how:26} {m['peak'] / mib:8.0f} {m['baseline'] / mib:9.0f} {(m['peak'] - m['baseline']) / mib:7.0f} "
              f"{m['peak'] / m['result']:8.2f}x {(m['peak'] - m['baseline']) / m['result']:9.2f}x "
              f"{m['worker_peak'] / mib:7.0f} {m['zygote'] / mib:7.0f} {m['workers_left']:5d}")
    print("\ntargets")
    for mode in ("weights", "object"):
        ratio = loads[f"safehub {mode}"][0] / hub[0]
        print(f"    isolated {mode} load within 1.25x of torch.hub: {ratio:.2f}x -> {'met' if ratio <= 1.25 else 'MISSED'}")
    for name in ("memfd weights, 16 tensors", "memfd object, 16 tensors", "memfd weights, 1 tensor"):
        base = transport["clone(), 1 tensor" if name.endswith("1 tensor") else "clone(), 16 tensors"][0]
        ratio = transport[name][0] / base
        print(f"    {name} as fast as clone(): {ratio:.2f}x its time -> {'met' if ratio <= 1.0 else 'MISSED'}")
    for how in ("safehub weights", "safehub object"):
        m = memory[how]
        print(f"    parent peak RSS of {how} under 1.3x the result: {m['peak'] / m['result']:.2f}x "
              f"({(m['peak'] - m['baseline']) / m['result']:.2f}x above the interpreter with torch) -> "
              f"{'met' if m['peak'] <= 1.3 * m['result'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-worker rows of (a)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--repo", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child(opts.child, opts.repo, opts.gib)
        return
    with tempfile.TemporaryDirectory(prefix="safehub-bench-") as tmp:
        repo = Path(tmp, "repo")
        repo.mkdir()
        (repo / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
        memory = bench_memory(repo, opts.gib)
        print("  measured (c) memory", file=sys.stderr)
        loads = bench_loads(repo, opts.gib, opts.runs, not opts.no_cold)
        print("  measured (a) loads", file=sys.stderr)
        transport, nbytes = bench_transport(opts.gib, opts.runs)
        print("  measured (b) transport", file=sys.stderr)
    report(loads, transport, nbytes, memory, opts.runs, opts.gib)


if __name__ == "__main__":
    main()
