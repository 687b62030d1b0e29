"""One memory cgroup per worker: ``memory_limit`` counted for everything the sandbox holds.

A process's ``RLIMIT_AS`` bounds that process only; a memory cgroup counts every page its
processes allocate, forked children, memfds (mapped or not), tmpfs files and pipe buffers
included, against one limit, and the kernel's OOM killer ends the sandbox at it.

Where one can be had: in the caller's own memory cgroup, when the caller may create a child
there (root, or a cgroup delegated to the caller's user). cgroup v1 (a ``memory`` hierarchy, as
in containers that run v1 for memory): ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``
where swap is accounted, so swap does not add to it). cgroup v2: ``memory.max`` and
``memory.swap.max`` = 0, where the ``memory`` controller is enabled for the caller's cgroup's
children. Elsewhere the worker falls back to the address-space bound
(``WorkerSettings.memory_shares``); :func:`probe` says which and why.

The worker joins its cgroup before any repository code runs: a cold one through
:func:`join_argv` (the launch command writes its own pid into ``cgroup.procs`` and then execs,
so bubblewrap and everything under it start inside), a warm one through its supervisor
(``confine.prepare``), which a spare worker does before its call: the warm path makes the next
spare's cgroup with each call (``warm.py``) and sets its limit when a call takes it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from pathlib import Path

__all__ = ["MemoryCgroup", "join_argv", "probe"]

_counter = itertools.count()


def _own_cgroups() -> dict[str, str]:
    """{"v1": path in the memory hierarchy, "v2": path in the unified one} of this process."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                found["v1"] = path
            elif controllers == "":
                found["v2"] = path
    return found


def _mount_points() -> dict[str, str]:
    """{"v1": the memory hierarchy's mount point, "v2": the unified hierarchy's}."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 4:
                continue
            if parts[2] == "cgroup" and "memory" in parts[3].split(","):
                found.setdefault("v1", parts[1])
            elif parts[2] == "cgroup2":
                found.setdefault("v2", parts[1])
    return found


def _parent_folder() -> tuple[str, Path] | tuple[None, str]:
    """(version, the folder a worker's cgroup is made in), or (None, why there is none)."""
    own, mounts = _own_cgroups(), _mount_points()
    reasons = []
    if "v1" in own and "v1" in mounts:
        folder = Path(mounts["v1"] + own["v1"])
        if os.access(folder, os.W_OK | os.X_OK):
            return "v1", folder
        reasons.append(f"cgroup v1 memory: {folder} is not writable by uid {os.geteuid()} (not root, not delegated)")
    else:
        reasons.append("no cgroup v1 memory hierarchy")
    if "v2" in own and "v2" in mounts:
        folder = Path(mounts["v2"] + own["v2"])
        try:
            enabled = (folder / "cgroup.subtree_control").read_text().split()
        except OSError:
            enabled = []
        if "memory" not in enabled:
            reasons.append(f"cgroup v2: the memory controller is not enabled for the children of {folder}")
        elif not os.access(folder, os.W_OK | os.X_OK):
            reasons.append(f"cgroup v2: {folder} is not writable by uid {os.geteuid()} (not delegated)")
        else:
            return "v2", folder
    else:
        reasons.append("no cgroup v2 hierarchy")
    return None, "; ".join(reasons)


def probe() -> dict[str, str | bool]:
    """Which memory bound an isolated call gets here: ``available``, ``kind``, ``detail``."""
    version, where = _parent_folder()
    if version is None:
        return {
            "available": False,
            "kind": "address space",
            "detail": f"no memory cgroup ({where}): one address space (no fork, no memfds) plus a scratch "
            "tmpfs of a quarter of memory_limit, within memory_limit",
        }
    return {
        "available": True,
        "kind": f"cgroup {version}",
        "detail": f"a memory cgroup per worker under {where}: every process, memfd, tmpfs page and pipe counted",
    }


class MemoryCgroup:
    """A worker's own memory cgroup, limited to ``limit`` bytes; :meth:`remove` when it is over."""

    def __init__(self, version: str, path: Path, limit: int | None) -> None:
        self.version = version
        self.path = path
        self.limit = limit

    @classmethod
    def create(cls, limit: int | None) -> MemoryCgroup | None:
        """A new cgroup limited to ``limit`` bytes, or None where none can be had (see :func:`probe`).

        ``limit`` None: no limit yet (a spare worker's, set by :meth:`set_limit` when a call takes it).
        Raises OSError when the cgroup was made but its limit could not be set (it is removed).
        """
        version, parent = _parent_folder()
        if version is None:
            return None
        assert isinstance(parent, Path)
        path = parent / f"safehub-{os.getpid()}-{next(_counter)}"
        try:
            path.mkdir(mode=0o755)
        except OSError:
            return None  # a race with a permission change, or too many cgroups: the fallback holds
        group = cls(version, path, limit)
        if limit is not None:
            try:
                group.set_limit(limit)
            except OSError:
                group.remove()
                raise
        return group

    def set_limit(self, limit: int) -> None:
        """Hold everything in the cgroup to ``limit`` bytes (swap not counted on top). Raises OSError."""
        path = self.path
        if self.version == "v1":
            (path / "memory.limit_in_bytes").write_text(str(limit))
            memsw = path / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # swap accounted: swap must not add to the limit
                memsw.write_text(str(limit))
        else:
            (path / "memory.max").write_text(str(limit))
            swap = path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        self.limit = limit

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    def oom_kills(self) -> int:
        """How many processes the kernel killed for this cgroup's limit (0 where it cannot tell)."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def limit_reached(self) -> bool:
        """Whether the sandbox ever hit the limit (an allocation failed or something was killed)."""
        if self.oom_kills():
            return True
        name = "memory.failcnt" if self.version == "v1" else "memory.events"
        with contextlib.suppress(OSError, ValueError):
            text = (self.path / name).read_text()
            if self.version == "v1":
                return int(text) > 0
            return any(line.split()[0] in ("max", "oom") and int(line.split()[1]) > 0 for line in text.splitlines())
        return False

    def remove(self) -> None:
        """Remove the cgroup once its processes are gone (they are killed before; a zombie may lag)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


def join_argv(procs: str) -> list[str]:
    """A prefix for a launch command: enter the cgroup whose ``cgroup.procs`` is ``procs``, then exec."""
    return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs]
