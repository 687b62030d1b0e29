"""What a worker may read: the system, the interpreter, this folder, the repository.

Both sides use it, so bubblewrap's binds (``safehub/_bwrap.py``, in the parent) and Landlock's
rules (``sandbox/confine.py``, in the worker) grant the same paths. Standard library only. The
worker's code is granted as this folder alone: never its parent, a checkout's root, ``.git`` or
the rest of safehub.
"""

from __future__ import annotations

import os
import site
import sys

WORKER_DIR = os.path.dirname(os.path.abspath(__file__))

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
# Loader, time zone and name-service files of /etc that a Python process reads.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "hosts", "host.conf")
# Only with Sandbox(network=True): name resolution and CA certificates.
ETC_NETWORK = ("resolv.conf", "gai.conf", "ssl", "ca-certificates", "ca-certificates.conf", "pki")


def system_read_paths() -> list[str]:
    """System folders and files a Python process reads: libraries, loader cache, devices.

    ``/proc`` is included (Python and torch read ``/proc/self/*`` and ``/proc/cpuinfo``); the
    pid namespace, not Landlock, is what hides other processes' entries.
    """
    candidates = [
        *SYSTEM_DIRS,
        *(f"/etc/{name}" for name in ETC_FILES),
        "/etc/passwd", "/etc/group",
        "/proc", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/shm",
        "/sys/devices/system/cpu", "/sys/fs/cgroup",
    ]
    return [p for p in candidates if os.path.lexists(p)]


def python_read_paths() -> list[str]:
    """The running interpreter's installation, as real folders: prefixes, site-packages, the executable's home."""
    paths = [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix]
    try:
        paths += site.getsitepackages()
    except AttributeError:  # pragma: no cover - virtualenv's old site.py
        pass
    if sys.executable:
        paths.append(os.path.dirname(os.path.realpath(sys.executable)))
    out: list[str] = []
    for path in paths:
        real = os.path.realpath(path) if path else ""
        if real and os.path.isdir(real) and real not in out:
            out.append(real)
    return out


def worker_read_paths(repo_dir: str, extra_read_paths: tuple[str, ...] | list[str] = (), view_dir: str | None = None) -> list[str]:
    """Everything beyond the system a worker reads: the interpreter, this folder, the repository,
    the call's view of the cache (what the parent fetched for it), extras."""
    paths = python_read_paths() + [WORKER_DIR, repo_dir, *([view_dir] if view_dir else []), *extra_read_paths]
    return [os.path.realpath(p) for p in paths]
