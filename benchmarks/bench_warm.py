"""Warm isolated ``list`` against plain in-process ``torch.hub.list`` and a cold isolated ``list``.

Run by hand (not in CI)::

    .venv/bin/python benchmarks/bench_warm.py [--runs 15]

One repository is put in a private hub cache (torch.hub's folder names, so both read the same
folder) and listed three ways, each the median of ``--runs`` calls in this one process (the
three interleaved):

- in-process: ``torch.hub.list("bench/repo:main", skip_validation=True)``, which reads the cached
  folder (torch.hub.list takes no ``source``; with a ref and the folder there it asks nothing of
  the network). The repository's modules are forgotten after each call, as a fresh call in a
  long-lived process would find them.
- warm: ``safehub.list(..., isolate=True)``, every sandbox layer this machine offers, the
  worker forked from the zygote (started beforehand by ``safehub.warmup()``).
- cold: the same with ``SAFEHUB_WARM=0``: a fresh interpreter per call (bubblewrap where it works).
- floor: one fork of this process (which imported torch, as the zygote has) that applies every
  layer a warm worker gets (its memory cgroup, namespaces with their init, scratch tmpfs, uid
  drop, Landlock, rlimits, seccomp) and exits, reaped: what a fresh confined process costs,
  without a call.

safehub runs with ``SAFEHUB_OFFLINE=1``, so every call is served from the cache. The targets:
a warm list within 30 ms of in-process (DESIGN 6), at most 15 ms, and at most 1.5x the floor
(issue 18): the warm path's spare worker has its processes, cgroup and namespaces before the
call, and the call returns before its worker is reaped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import safehub  # noqa: E402
from safehub import _cache, _extract, _refs  # noqa: E402
from safehub._run import warm as _zygote  # noqa: E402
from _common import forgetting_modules  # noqa: E402 - this folder is on sys.path


TARGET_MS = 30.0  # a warm list within this of in-process
WARM_MAX_MS = 15.0  # a warm list at most this
FLOOR_RATIO = 1.5  # a warm list at most this times the floor
REPOS = {
    "hubconf imports torch": {
        "hubconf.py": '''
            dependencies = ["torch"]
            import torch
            from nets.small import small


            def big():
                """A bigger net."""
                return torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
        ''',
        "nets/__init__.py": "",
        "nets/small.py": '''
            import torch


            def small():
                """A small net."""
                return torch.nn.Linear(8, 2)
        ''',
    },
    "pure-Python hubconf": {
        "hubconf.py": '''
            dependencies = []


            def answer():
                """No torch at all."""
                return 42
        ''',
    },
}


def timed_ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


@contextlib.contextmanager
def environ(**values: str):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def floor_ms(repo_dir: Path) -> float:
    """One fork that applies every layer of a warm worker of ``Sandbox()`` and exits, reaped (ms)."""
    from safehub._run import memory_cgroup
    from safehub._run.scratch import make_scratch
    from safehub._sandbox import Sandbox
    from safehub._worker.sandbox import confine

    sandbox = Sandbox()
    scratch = make_scratch(for_dropped_uid=os.geteuid() == 0)
    cgroup = memory_cgroup.MemoryCgroup.create(sandbox.memory_limit)
    settings = sandbox.worker_settings(str(repo_dir), str(scratch))
    if cgroup is not None:
        settings = settings.replace(memory_cgroup=str(cgroup.path))
    try:
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                prepared = confine.prepare(confine.shape_of(settings))
                if prepared.pid_ns:
                    confine.fork_into_pid_namespace(confine.Report())  # goes on in the work, pid 2
                report = confine.apply_sandbox(settings, keep_fds=(0, 1, 2), prepared=prepared)
                code = 0 if "seccomp" in report.applied else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        elapsed = (time.perf_counter() - start) * 1000
        assert os.waitstatus_to_exitcode(status) == 0, f"the floor's process failed: {status}"
        return elapsed
    finally:
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(scratch, ignore_errors=True)


def install(repo: str, files: dict[str, str], tmp: Path) -> Path:
    """Put ``files`` in the hub cache as bench/<repo>:main, the way a download would."""
    archive = tmp / f"{repo}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in files.items():
            zf.writestr(f"bench-{repo}-0123456/{name}", textwrap.dedent(text))

    resolved = _refs.ResolvedRef("bench", repo, "main", "0" * 40, "ref", False)
    folder = _cache.folder_name(resolved.owner, resolved.repo, resolved.ref)
    with _cache.locked(folder), _cache.work_dir(folder) as work_dir:
        tree_dir = _extract.extract_zip(archive, work_dir)
        entry = _cache.install(resolved, tree_dir, archive_sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    return entry.repo_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args(argv).runs
    rows = []
    nowhere = "http://127.0.0.1:9"  # a closed port: any network use would fail at once
    with tempfile.TemporaryDirectory(prefix="safehub-bench-") as tmp, environ(
        TORCH_HOME=tmp, SAFEHUB_OFFLINE="1", SAFEHUB_GITHUB_URL=nowhere, SAFEHUB_GITHUB_API_URL=nowhere
    ):
        os.chmod(tmp, 0o755)  # as root the worker runs as uid 65534, which must reach the cache
        for index, (label, files) in enumerate(REPOS.items()):
            spec = f"bench/repo{index}:main"
            repo_dir = install(f"repo{index}", files, Path(tmp))

            def in_process(spec: str = spec) -> list[str]:
                with forgetting_modules():
                    return torch.hub.list(spec, skip_validation=True, trust_repo=True, verbose=False)

            def isolated(spec: str = spec) -> list[str]:
                return safehub.list(spec, isolate=True, verbose=False)

            assert in_process() == isolated(), "the paths disagree"
            if not safehub.warmup():
                sys.exit("the zygote could not start here: no warm path to measure")
            zygote = _zygote.current_pid()
            # Interleaved, so that a change in the machine's load weighs on the four alike.
            local, warm, cold, floor = [], [], [], []
            for _ in range(runs):
                local.append(timed_ms(in_process))
                with environ(SAFEHUB_WARM="1"):
                    warm.append(timed_ms(isolated))
                with environ(SAFEHUB_WARM="0"):
                    cold.append(timed_ms(isolated))
                floor.append(floor_ms(repo_dir))
            assert _zygote.current_pid() == zygote, "the zygote was restarted while measuring"
            rows.append((label, *(statistics.median(times) for times in (local, warm, cold, floor))))
            print(f"  measured {label}", file=sys.stderr)

    layers = sorted(name for name, layer in safehub.sandbox_report().items() if layer["active"])
    print(f"\nlist, median of {runs} runs, ms; torch {torch.__version__}, Python {sys.version.split()[0]}")
    print(f"warm and cold isolated calls with every layer offered here: {', '.join(layers)}\n")
    header = (
        f"{'repository':24} {'in-process':>10} {'warm':>8} {'cold':>8} {'floor':>8} {'warm-in':>8} {'warm/in':>8}"
        f" {'cold/warm':>10} {'warm/floor':>11}"
    )
    print(header)
    print("-" * len(header))
    for label, local, warm, cold, floor in rows:
        print(
            f"{label:24} {local:10.1f} {warm:8.1f} {cold:8.1f} {floor:8.1f} {warm - local:+8.1f} {warm / local:7.1f}x"
            f" {cold / warm:9.1f}x {warm / floor:10.2f}x"
        )
    print("\nfloor: one fork of a process that imported torch, every layer of a warm worker applied, exit, reaped")
    worst = max(warm - local for _, local, warm, _, _ in rows)
    slowest = max(warm for _, _, warm, _, _ in rows)
    ratio = max(warm / floor for _, _, warm, _, floor in rows)
    for text, value, bound in (
        (f"a warm list within {TARGET_MS:.0f} ms of in-process", worst, TARGET_MS),
        (f"a warm list at most {WARM_MAX_MS:.0f} ms", slowest, WARM_MAX_MS),
        (f"a warm list at most {FLOOR_RATIO:g}x the floor", ratio, FLOOR_RATIO),
    ):
        print(f"target: {text}: {'met' if value <= bound else 'MISSED'} (worst {value:.2f})")


if __name__ == "__main__":
    main()
