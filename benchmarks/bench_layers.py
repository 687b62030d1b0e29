"""Start-up cost of each OS sandbox layer, in milliseconds. Run by hand, not in CI:

    .venv/bin/python benchmarks/bench_layers.py [--runs 50]

Each layer is applied alone in a child forked from this process after ``import torch`` (the
zygote's situation, DESIGN section 6), timed inside the child from just before the apply to
just after, and reported as the median over ``--runs`` children. ``fork+exit`` is the cost of
the bare fork and reap around it, measured in the parent. The last rows compare a cold
``python -I -c pass`` with and without bubblewrap around it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

WORKER_DIR = Path(__file__).resolve().parents[1] / "safehub" / "_worker"
_KEEP_FD = -1


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_layer_{name}", WORKER_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def in_fork(apply) -> float | None:
    """Milliseconds ``apply()`` took in a forked child; None if it failed."""
    global _KEEP_FD
    r, w = os.pipe()
    _KEEP_FD = w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            t0 = time.perf_counter_ns()
            apply()
            t1 = time.perf_counter_ns()
            os.write(w, str(t1 - t0).encode())
            code = 0
        except BaseException as exc:  # noqa: BLE001
            os.write(w, f"ERR {exc}".encode()[:200])
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 256):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    text = data.decode()
    if not text or text.startswith("ERR"):
        print(f"  failed: {text}", file=sys.stderr)
        return None
    return int(text) / 1e6


def fork_cost() -> float:
    t0 = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return (time.perf_counter_ns() - t0) / 1e6


def median_of(fn, runs: int) -> str:
    values = [v for v in (fn() for _ in range(runs)) if v is not None]
    if not values:
        return "unavailable"
    return f"{statistics.median(values):8.3f}   (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    t0 = time.perf_counter()
    import torch  # noqa: F401 - the zygote's state is what is measured

    print(f"import torch: {time.perf_counter() - t0:.2f} s; torch {torch.__version__}; runs={args.runs}")
    ll, sc, ns, lim = load("landlock"), load("seccomp"), load("namespaces"), load("limits")
    scratch = tempfile.mkdtemp(prefix="safehub-bench-")
    repo = tempfile.mkdtemp(prefix="safehub-bench-repo-")
    read_paths = ll.system_read_paths() + ll.python_read_paths() + [repo]

    def session():
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        os.setsid()
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        # every fd but the result channel (here: the timing pipe)
        os.closerange(3, _KEEP_FD)
        os.closerange(_KEEP_FD + 1, 1024)

    def namespaces():
        ns.enter(user=True, net=True, ipc=True)

    def namespaces_all():
        ns.enter(user=True, net=True, ipc=True, pid=True, mount=True)

    def landlock():
        ll.restrict(read_paths, [scratch])

    def seccomp():
        sc.install()

    def rlimits():
        lim.apply_rlimits(memory_bytes=4 << 30, cpu_seconds=600, max_processes=256,
                          max_open_files=1024, max_file_size=1 << 30)

    def uid_drop():
        lim.drop_privileges(65534)

    def everything():
        session()
        namespaces()
        landlock()
        rlimits()
        seccomp()

    rows = [("fork+exit (parent side)", lambda: median_of(fork_cost, args.runs))]
    layers = [
        ("session", session),
        ("namespaces user+net+ipc", namespaces),
        ("namespaces +pid+mount", namespaces_all),
        ("landlock", landlock),
        ("seccomp", seccomp),
        ("rlimits", rlimits),
    ]
    if os.geteuid() == 0:
        layers.append(("uid_drop", uid_drop))
    layers.append(("all (session..seccomp)", everything))
    for name, apply in layers:
        rows.append((name, lambda apply=apply: median_of(lambda: in_fork(apply), args.runs)))

    print(f"\n{'layer':32s} {'median ms':>9s}")
    print("-" * 90)
    for name, fn in rows:
        print(f"{name:32s} {fn()}")

    # Cold interpreter, with and without bubblewrap.
    python = sys.executable
    cold_runs = max(5, args.runs // 2)

    def timed(argv, **kw):
        t = time.perf_counter_ns()
        subprocess.run(argv, check=True, **kw)
        return (time.perf_counter_ns() - t) / 1e6

    print(f"\n{'cold start (n=' + str(cold_runs) + ')':32s} {'median ms':>9s}")
    print("-" * 90)
    plain = [python, "-I", "-c", "pass"]
    print(f"{'python -I -c pass':32s} {median_of(lambda: timed(plain), cold_runs)}")
    if shutil.which("bwrap"):
        argv = ns.bwrap_argv(repo, scratch, env={"PATH": "/usr/bin:/bin"})
        print(f"{'bwrap + python -I -c pass':32s} {median_of(lambda: timed(argv + plain), cold_runs)}")
        print(f"{'bwrap + /bin/true':32s} {median_of(lambda: timed(argv + ['/bin/true']), cold_runs)}")
        if os.geteuid() == 0 and shutil.which("setpriv"):
            os.chown(scratch, 65534, 65534)  # mkdtemp made it 0700: private to the worker's uid
            argv = ns.bwrap_argv(repo, scratch, uid=65534, env={"PATH": "/usr/bin:/bin"})
            print(f"{'bwrap+setpriv(65534) + python':32s} {median_of(lambda: timed(argv + plain), cold_runs)}")
    else:
        print("bwrap not installed")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
