"""Replicas (``replicas=N``): throughput and memory of one remote model served by 1 and by 2 workers.

Run by hand (not in CI)::

    .venv/bin/python benchmarks/bench_replicas.py [--rounds 3] [--calls 24] [--width 4096] [--layers 4]

The model is compute-bound: ``--layers`` linear layers of ``--width`` squared float32 weights
(4 x 4096^2: 256 MiB), called on a batch of 32, with ``torch.set_num_threads(1)`` in the worker
(the entrypoint sets it), so one call keeps one core busy. Two handles are loaded once each, every
sandbox layer this machine offers, on the warm path: one plain remote handle (1 worker) and one
with ``replicas=2``. Then, for ``--rounds`` rounds, each handle in turn (interleaved, so the load of
the shared machine falls on both alike) gets ``--calls`` calls from two threads. The figure is
calls per second; the target is checked on the median of the rounds' ratios (each round's two
figures taken back to back), the best round of each is printed too. Beside it, the cores the worker's tree kept busy (its
CPU time over the wall time): on a quiet machine 1 and 2; on a loaded one, whatever share the
scheduler gave, which shows whether a MISSED figure is the machine's or the replicas'.

Memory is the machine's: the proportional set size (``Pss`` of ``/proc/PID/smaps_rollup``: a page
shared by k processes counts 1/k in each) summed over the worker's whole process tree (supervisor,
namespace init, the worker or the template and its replicas) and the warm zygote they were forked
from, measured after the calls, each handle's alone (the other one closed) so that pages shared
with it do not move between the two sums. The weights are one copy in the template, shared
copy-on-write by the replicas, so they count once.

Targets (issue 18, item 4): throughput with 2 replicas at least 1.7x one worker; memory for 2
replicas at most 1.3x one worker. The machine is shared (2 vCPUs, other jobs running): a MISSED
throughput target here may be the neighbours' load; the lead re-measures on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

import safehub  # noqa: E402
from safehub._run import memory_cgroup  # noqa: E402

HUBCONF = '''
import torch

dependencies = ["torch"]


class Tower(torch.nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

    def forward(self, x):
        return self.layers(x)


def tower(width=4096, layers=4):
    """Linear layers, one core per call: compute-bound."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with torch.no_grad():
        return Tower(width, layers).eval()
'''

THROUGHPUT_TARGET = 1.7
MEMORY_TARGET = 1.3


def cpu_seconds(handle: safehub.RemoteModule) -> float:
    """CPU time (user and system) of the worker's tree so far."""
    total = 0.0
    top = psutil.Process(handle.pid)
    for proc in [top, *top.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def calls_per_second(handle: safehub.RemoteModule, x: torch.Tensor, calls: int, threads: int = 2) -> tuple[float, float]:
    """``calls`` calls from ``threads`` threads at once: (calls per second, the cores the worker's tree kept busy)."""
    share = [calls // threads + (1 if i < calls % threads else 0) for i in range(threads)]
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(n):
                handle(x)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in share]
    cpu = cpu_seconds(handle)
    start = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return calls / elapsed, (cpu_seconds(handle) - cpu) / elapsed


def pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def machine_memory(handle: safehub.RemoteModule) -> tuple[int, int]:
    """(PSS of the worker's tree and its zygote, processes counted)."""
    top = psutil.Process(handle.pid)
    pids = [top.pid] + [p.pid for p in top.children(recursive=True)]
    zygote = top.parent()
    if zygote is not None and zygote.pid != os.getpid():
        pids.append(zygote.pid)
    return pss_bytes(pids), len(pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    bound = memory_cgroup.probe()
    sandbox = safehub.Sandbox(timeout=600) if bound["available"] else safehub.Sandbox(timeout=600, memory_limit=None)
    safehub.warmup()
    with tempfile.TemporaryDirectory() as folder:
        repo = Path(folder) / "repo"
        repo.mkdir()
        (repo / "hubconf.py").write_text(HUBCONF)
        os.chmod(folder, 0o755)
        load = lambda n: safehub.load(str(repo), "tower", source="local", isolate=sandbox, returns="remote",  # noqa: E731
                                      replicas=n, width=args.width, layers=args.layers)
        weights = args.layers * (args.width * args.width + args.width) * 4
        print(f"model: {args.layers} x Linear({args.width}, {args.width}), {weights / 2**20:.0f} MiB of weights; "
              f"batch 32; torch threads 1 per worker; memory bound: {bound['kind']}; {os.cpu_count()} CPUs, shared machine")
        x = torch.rand(32, args.width)
        handles = {1: load(1), 2: load(2)}
        for handle in handles.values():
            handle(x)  # first call out of the way
        rates: dict[int, list[float]] = {1: [], 2: []}
        cores: dict[int, list[float]] = {1: [], 2: []}
        for round_ in range(args.rounds):
            for n in ((1, 2) if round_ % 2 == 0 else (2, 1)):  # interleaved, order alternating
                rate, busy = calls_per_second(handles[n], x, args.calls)
                rates[n].append(rate)
                cores[n].append(busy)
            print(f"round {round_ + 1}: 1 worker {rates[1][-1]:.2f} calls/s ({cores[1][-1]:.2f} cores busy), "
                  f"2 replicas {rates[2][-1]:.2f} calls/s ({cores[2][-1]:.2f} cores busy), "
                  f"{rates[2][-1] / rates[1][-1]:.2f}x; load average "
                  f"{os.getloadavg()[0]:.1f}")
        memory: dict[int, tuple[int, int]] = {}
        handles[2].close()
        memory[1] = machine_memory(handles[1])
        handles[1].close()
        handles[2] = load(2)
        handles[2](x)
        calls_per_second(handles[2], x, 4)  # both replicas have run calls
        memory[2] = machine_memory(handles[2])
        handles[2].close()
    best = {n: max(r) for n, r in rates.items()}
    # Each round's two figures were taken back to back: their ratio is the A/B comparison.
    speedup = statistics.median(two / one for one, two in zip(rates[1], rates[2]))
    ratio = memory[2][0] / memory[1][0]
    print(f"throughput: 1 worker {best[1]:.2f} calls/s, 2 replicas {best[2]:.2f} calls/s (best of {args.rounds} "
          f"interleaved rounds of {args.calls} calls from 2 threads)")
    print(f"memory (PSS of the worker tree and its zygote): 1 worker {memory[1][0] / 2**20:.0f} MiB in {memory[1][1]} "
          f"processes, 2 replicas {memory[2][0] / 2**20:.0f} MiB in {memory[2][1]} processes")
    print(f"target: 2 replicas' throughput >= {THROUGHPUT_TARGET}x one worker (median of the rounds' ratios): {speedup:.2f}x "
          f"{'met' if speedup >= THROUGHPUT_TARGET else 'MISSED'}")
    print(f"target: 2 replicas' memory <= {MEMORY_TARGET}x one worker: {ratio:.2f}x "
          f"{'met' if ratio <= MEMORY_TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
