"""The three holes of issue 12, measured from outside: disk, terminal, processes. Run by hand::

    python benchmarks/bench_holes.py                       # every attack, cold and warm
    python benchmarks/bench_holes.py --attack disk --path warm --disk-budget-mib 1024

Each attack runs a hostile hubconf.py under the Sandbox a user would write,
``Sandbox(timeout=20, memory_limit=1 GiB, network=False)`` (every other setting its default), and
this script measures what the machine saw:

disk
    The hubconf writes 16 MiB files into its working folder (its scratch) until a write fails, its
    budget (``--disk-budget-mib``, 1 GiB) is reached, or the disk has less than 10 GiB free
    (a filesystem of 20 GiB or less, a tmpfs, is written until full). A
    thread here measures the scratch folder on the host while the call runs: its peak is the
    figure "bytes that reached the disk". The worker's own count ("accepted") says how much its
    writes were let through (into a tmpfs in memory once the scratch is one).
terminal
    The hubconf prints escape sequences (clear screen, cursor moves, window title, OSC 52
    clipboard), a carriage-return overwrite, backspaces, C1 controls in UTF-8 and Unicode bidi and
    zero-width controls. The figure: control characters (C0 but newline and tab, DEL, C1, Unicode
    format and line/paragraph separators) in what reached the caller's stdout.
processes
    The hubconf forks children that sleep until it is refused (200 at most). A thread here counts
    the caller's descendants every 2 ms: the figure is the peak, with its make-up at that moment
    (by uid, and the processes of the worker's own machinery).
torch
    torch.set_num_threads(N) and a parallel matmul in the worker, under the default
    max_processes of a machine with N CPUs (``--cpus``, 96): what torch does by itself there.
    With the default memory_limit (8 GiB), since each thread's 8 MiB stack is address space.

The script imports safehub from the tree it sits in, so run from a checkout of main it measures
main. The attacks bound themselves: even with no sandbox they cannot fill a disk with less than
10 GiB free, or fork more than 200 processes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

import safehub  # noqa: E402

GIB = 1024**3
MIB = 1024**2

DISK = '''
import os
budget, floor = {budget}, 10 * 1024**3
accepted = 0
chunk = b"\\0" * (16 << 20)
error = ""
try:
    for i in range(budget // len(chunk)):
        st = os.statvfs(".")
        # On a disk (more than 20 GiB), stop at its last 10 GiB; a smaller tmpfs is written until full.
        if st.f_blocks * st.f_frsize > 20 * 1024**3 and st.f_bavail * st.f_frsize < floor:
            error = "stopped: less than 10 GiB free"
            break
        with open(f"part-{{i:05d}}.bin", "wb") as f:
            f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        accepted += len(chunk)
except OSError as exc:
    error = f"{{type(exc).__name__}}: {{exc}}"
print("RESULT", accepted, error, flush=True)
'''

CONTROLS = (
    "\x1b[2J\x1b[H"  # clear the screen, cursor home
    "\x1b]0;innocent title\x07"  # window title
    "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # OSC 52: write the clipboard
    "\x1b[1A\x1b[2K"  # cursor up, erase the line: hides the line before
    "all tests passed\rFAILURE HIDDEN\n"  # carriage return overwrite
    "rm -rf ~\x08\x08\x08\x08\x08\x08\x08ls    \n"  # backspaces rewrite what was shown
    "\u009b31m C1 CSI\u0085NEL\n"  # C1 controls in UTF-8
    "safe\u202edetalumis\u202c \u200bzero\u200dwidth\u2066\u2069\ufeff\u2028\n"  # bidi, zero-width
)
TERMINAL = f"""
import sys
sys.stdout.write({CONTROLS!r})
sys.stdout.flush()
sys.stderr.write({CONTROLS!r})
print("RESULT sent", flush=True)
"""

FORK_BOMB = """
import os, time
alive, error = 0, ""
try:
    for _ in range(200):
        if os.fork() == 0:
            time.sleep(8)
            os._exit(0)
        alive += 1
except OSError as exc:
    error = f"{type(exc).__name__}: {exc}"
print("RESULT", alive, error, flush=True)
time.sleep(1.5)  # let the count settle before the tree is killed
"""

TORCH_THREADS = """
import time
import torch
torch.set_num_threads({threads})
a = torch.randn(512, 512)
start = time.monotonic()
for _ in range(20):
    a @ a
print("RESULT", torch.get_num_threads(), "ok", flush=True)
"""


def control_chars(text: str) -> collections.Counter[str]:
    """Control characters in ``text`` (newline and tab excepted), by category."""
    found: collections.Counter[str] = collections.Counter()
    for ch in text:
        if ch in "\n\t":
            continue
        cat = unicodedata.category(ch)
        if cat == "Cc":
            found["ESC" if ch == "\x1b" else "CR" if ch == "\r" else "C1" if "\x80" <= ch <= "\x9f" else "other C0/DEL"] += 1
        elif cat in ("Cf", "Zl", "Zp"):
            found["Unicode format/separator"] += 1
    return found


def run(hubconf: str, sandbox: safehub.Sandbox, watch=None) -> dict[str, Any]:
    """Run ``hubconf`` under ``sandbox``; ``watch(stop_event)`` runs in a thread meanwhile."""
    root = Path(tempfile.mkdtemp(prefix="safehub-holes-"))
    os.chmod(root, 0o755)  # a dropped worker must read the repository
    try:
        (root / "hubconf.py").write_text(hubconf)
        os.chmod(root / "hubconf.py", 0o644)
        stop = threading.Event()
        facts: dict[str, Any] = {}
        thread = threading.Thread(target=watch, args=(stop, facts), daemon=True) if watch else None
        out, err = io.StringIO(), io.StringIO()
        start = time.monotonic()
        if thread:
            thread.start()
        error = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                safehub.list(str(root), source="local", isolate=sandbox)
            except Exception as exc:
                error = f"{type(exc).__name__}: {str(exc)[:200]}"
        stop.set()
        if thread:
            thread.join()
        result = next((line for line in out.getvalue().splitlines() if "RESULT" in line), "")
        return {"result": result.split("RESULT", 1)[-1].strip(), "error": error, "stdout": out.getvalue(),
                "stderr": err.getvalue(), "seconds": round(time.monotonic() - start, 2), **facts}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def scratch_bytes() -> int:
    """Bytes on disk under this process's worker scratch folders."""
    total = 0
    top = tempfile.gettempdir()
    for name in os.listdir(top):
        if not name.startswith(f"safehub-worker-{os.getpid()}-"):
            continue
        for dirpath, _, files in os.walk(os.path.join(top, name)):
            for file in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, file)).st_blocks * 512
    return total


def watch_disk(stop: threading.Event, facts: dict[str, Any]) -> None:
    peak = 0
    while not stop.wait(0.05):
        peak = max(peak, scratch_bytes())
    facts["peak_scratch_on_disk"] = peak


def watch_processes(stop: threading.Event, facts: dict[str, Any]) -> None:
    me = psutil.Process()
    peak, makeup = 0, {}
    while not stop.wait(0.002):
        try:
            procs = me.children(recursive=True)
        except psutil.Error:
            continue
        if len(procs) > peak:
            peak = len(procs)
            kinds: collections.Counter[str] = collections.Counter()
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    uid = p.uids().real
                    cmd = " ".join(p.cmdline())
                    kind = "zygote" if "--zygote" in cmd else "bwrap" if p.name() == "bwrap" else "python"
                    kinds[f"uid {uid} {kind}"] += 1
            makeup = dict(kinds)
    facts["peak_processes"] = peak
    facts["makeup_at_peak"] = makeup


def attack_disk(sandbox: safehub.Sandbox, budget: int) -> dict[str, Any]:
    got = run(DISK.format(budget=budget), sandbox, watch_disk)
    accepted = int(got["result"].split()[0]) if got["result"] else 0
    return {"figure": f"{got.get('peak_scratch_on_disk', 0) / MIB:.0f} MiB reached the disk",
            "accepted_MiB": accepted // MIB, "worker said": got["result"][:160], "error": got["error"]}


def attack_terminal(sandbox: safehub.Sandbox) -> dict[str, Any]:
    got = run(TERMINAL, sandbox)
    out, err = control_chars(got["stdout"]), control_chars(got["stderr"])
    sent = control_chars(CONTROLS)
    return {"figure": f"{sum(out.values()) + sum(err.values())} control characters reached the caller "
                      f"(of {2 * sum(sent.values())} sent)",
            "stdout": dict(out), "stderr": dict(err), "error": got["error"],
            "stdout_shown": got["stdout"][:600]}


def attack_processes(sandbox: safehub.Sandbox) -> dict[str, Any]:
    got = run(FORK_BOMB, sandbox, watch_processes)
    return {"figure": f"peak {got.get('peak_processes')} processes under the caller",
            "worker said": got["result"][:160], "makeup_at_peak": got.get("makeup_at_peak"), "error": got["error"]}


def torch_threads(sandbox: safehub.Sandbox, cpus: int) -> dict[str, Any]:
    """torch's thread pool of a machine with ``cpus`` cores, under that machine's default max_processes."""
    import dataclasses

    from safehub import _sandbox

    default = getattr(_sandbox, "default_max_processes", lambda cpus: 64)(cpus)  # main: 64 everywhere
    # The default memory_limit too: each thread's 8 MiB stack counts against the address space.
    got = run(TORCH_THREADS.format(threads=cpus), dataclasses.replace(sandbox, max_processes=default, memory_limit=8 * GIB))
    return {"figure": f"torch.set_num_threads({cpus}) and a matmul under max_processes={default} "
                      f"(the default for {cpus} CPUs): " + ("ran" if "ok" in got["result"] else "FAILED"),
            "error": got["error"], "stderr": got["stderr"][-300:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", action="append", choices=["disk", "terminal", "processes", "torch"])
    parser.add_argument("--path", action="append", choices=["cold", "warm"])
    parser.add_argument("--layers", default=None, help="comma-separated Sandbox(layers=...); default every layer")
    parser.add_argument("--disk-budget-mib", type=int, default=1024)
    parser.add_argument("--cpus", type=int, default=96, help="the machine the torch check stands for")
    parser.add_argument("--scratch-mib", type=int, default=None, help="Sandbox(max_scratch_size=...) in MiB")
    parser.add_argument("--json", action="store_true", help="print every fact, not only the figures")
    opts = parser.parse_args(argv)
    settings: dict[str, Any] = {"timeout": 20, "memory_limit": GIB, "network": False}
    if opts.layers is not None:
        settings["layers"] = tuple(n for n in opts.layers.split(",") if n)
    if opts.scratch_mib is not None:
        settings["max_scratch_size"] = opts.scratch_mib * MIB
    sandbox = safehub.Sandbox(**settings)
    print(f"safehub from {Path(safehub.__file__).parent}, uid {os.getuid()}, {os.cpu_count()} CPUs")
    print(f"{sandbox}")
    for path in opts.path or ["cold", "warm"]:
        os.environ["SAFEHUB_WARM"] = "1" if path == "warm" else "0"
        for attack in opts.attack or ["disk", "terminal", "processes", "torch"]:
            if attack == "disk":
                facts = attack_disk(sandbox, opts.disk_budget_mib * MIB)
            elif attack == "terminal":
                facts = attack_terminal(sandbox)
            elif attack == "processes":
                facts = attack_processes(sandbox)
            else:
                facts = torch_threads(sandbox, opts.cpus)
            print(f"[{path}] {attack:<9} {facts['figure']}")
            if opts.json:
                print(json.dumps({k: v for k, v in facts.items() if k != "figure"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
