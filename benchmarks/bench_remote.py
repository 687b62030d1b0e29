"""Remote models (``returns="remote"``): the cost of a call in the sandbox against the same call here.

Run by hand (not in CI)::

    .venv/bin/python benchmarks/bench_remote.py [--calls 2000] [--runs 9] [--loads 5] [--mib 64]

In one process, every figure a median, on one local hubconf, with a warm worker (forked by the
zygote) under every sandbox layer this machine offers:

(a) the round trip of a tiny forward: ``nn.Linear(8, 2)`` on a ``[1, 8]`` input, remote against
    the same module called here (both under ``torch.inference_mode()``), over ``--calls`` calls.
    Target (issue 11): at most 100 µs more than in-process.
(b) a forward with a ``--mib`` MiB float32 input and a fresh output of the same size (``x * 2``):
    remote against in-process, against ``clone()`` of twice that many bytes into fresh memory,
    and against the same forward in a child process over a ``multiprocessing`` Pipe; "+ read"
    also reads every byte of the result once. Target (issue 18 item 2): at most 0.8x the clone,
    and faster than the Pipe.
(c) the first call after ``load`` against the later ones (``--loads`` fresh handles).
    Target: the first costs no more than any later call.

Where the time of (a) goes is printed too: the parent's packing and unpacking, measured in this
process, and the rest (the frames, the two wake-ups, the worker's side).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import safehub  # noqa: E402
from safehub._worker import values  # noqa: E402

HUBCONF = '''
    dependencies = ["torch"]
    import torch
    from torch import nn


    class Double(nn.Module):
        def forward(self, x):
            return x * 2


    def linear():
        torch.manual_seed(0)
        return nn.Linear(8, 2)


    def double():
        return Double()
'''


def median_us(call, runs: int, warmup: int = 100) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def load(repo: Path, name: str) -> safehub.RemoteModule:
    return safehub.load(str(repo), name, source="local", isolate=True, returns="remote")


def tiny(repo: Path, calls: int) -> dict[str, float]:
    torch.manual_seed(0)
    local = torch.nn.Linear(8, 2)
    x = torch.rand(1, 8)

    def here() -> torch.Tensor:
        with torch.inference_mode():
            return local(x)

    with load(repo, "linear") as remote:
        assert torch.equal(remote(x), here())
        figures = {"in-process": median_us(here, calls), "remote": median_us(lambda: remote(x), calls)}
    packed = values.pack_call((x,), {})
    result = values.pack(here())
    figures["pack arguments + unpack result (parent)"] = median_us(
        lambda: (values.pack_call((x,), {}), values.unpack(result.tree, [bytes(result.buffers[0])])), calls)
    figures["unpack arguments + pack result (worker)"] = median_us(
        lambda: (values.unpack_call(packed.tree, [bytes(packed.buffers[0])]), values.pack(here())), calls)
    return figures


def _pipe_server(conn) -> None:
    with torch.inference_mode():
        while (x := conn.recv()) is not None:
            conn.send(x * 2)


def large(repo: Path, mib: int, runs: int) -> dict[str, float]:
    x = torch.rand(mib * 2**20 // 4)
    big = torch.rand(2 * mib * 2**20 // 4)

    def here() -> torch.Tensor:
        with torch.inference_mode():
            return x * 2

    figures = {"clone() of twice the bytes": median_us(big.clone, runs, warmup=2),
               "in-process forward": median_us(here, runs, warmup=2)}
    with load(repo, "double") as remote:
        assert torch.equal(remote(x), here())
        figures["remote"] = median_us(lambda: remote(x), runs, warmup=2)
        figures["remote + read the result"] = median_us(lambda: float(remote(x).sum()), runs, warmup=2)
    figures["in-process + read the result"] = median_us(lambda: float(here().sum()), runs, warmup=2)
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_pipe_server, args=(child,), daemon=True)
    server.start()

    def piped() -> torch.Tensor:
        parent.send(x)
        return parent.recv()

    figures["multiprocessing Pipe"] = median_us(piped, runs, warmup=2)
    parent.send(None)
    server.join()
    return figures


def first_calls(repo: Path, loads: int) -> dict[str, float]:
    x = torch.rand(1, 8)
    first, later = [], []
    for _ in range(loads):
        with load(repo, "linear") as remote:
            start = time.perf_counter()
            remote(x)
            first.append(time.perf_counter() - start)
            later.append(median_us(lambda: remote(x), 200, warmup=0) / 1e6)
    return {"first call after load": statistics.median(first) * 1e6, "later calls": statistics.median(later) * 1e6}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--mib", type=int, default=64)
    opts = parser.parse_args(argv)
    safehub.warmup()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        (repo / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
        small = tiny(repo, opts.calls)
        big = large(repo, opts.mib, opts.runs)
        firsts = first_calls(repo, opts.loads)

    print(f"(a) tiny forward, nn.Linear(8, 2) on [1, 8], median of {opts.calls} calls")
    overhead = small["remote"] - small["in-process"]
    print(f"    in-process {small['in-process']:8.1f} us | remote {small['remote']:8.1f} us | "
          f"overhead {overhead:7.1f} us ({small['remote'] / small['in-process']:.1f}x)  target: overhead <= 100 us")
    codec = small["pack arguments + unpack result (parent)"] + small["unpack arguments + pack result (worker)"]
    print(f"    where: value codec {codec:.1f} us (parent {small['pack arguments + unpack result (parent)']:.1f}, "
          f"worker {small['unpack arguments + pack result (worker)']:.1f}); frames, wake-ups and the rest "
          f"{overhead - codec:.1f} us")
    clone = big["clone() of twice the bytes"]
    print(f"(b) {opts.mib} MiB in, {opts.mib} MiB out (x * 2), median of {opts.runs} runs")
    for name in ("clone() of twice the bytes", "in-process forward", "remote", "multiprocessing Pipe",
                 "in-process + read the result", "remote + read the result"):
        print(f"    {name:30s} {big[name] / 1e3:8.1f} ms  {big[name] / clone:5.2f}x the clone")
    met = big["remote"] <= 0.8 * clone and big["remote"] < big["multiprocessing Pipe"]
    print(f"    target: remote <= 0.8x the clone and faster than the Pipe: {'met' if met else 'NOT met'}")
    print(f"(c) first call after load, median of {opts.loads} loads")
    print(f"    first {firsts['first call after load']:8.1f} us | later {firsts['later calls']:8.1f} us | "
          f"{firsts['first call after load'] / firsts['later calls']:.2f}x  target: <= 1x")


if __name__ == "__main__":
    main()
