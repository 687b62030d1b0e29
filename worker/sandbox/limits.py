"""Resource limits and the uid drop for the worker.

Standard library only.

Facts this layer rests on (checked on Linux 6.18 by tests/security/test_layers.py):

- RLIMIT_NPROC counts every process *and thread* of the real uid, machine-wide, and the kernel
  skips the check for uid 0 (``INIT_USER``) whatever the capabilities, even inside a user
  namespace whose ids map to 0 (``bwrap --uid 65534`` run by root is still uid 0 to the
  kernel). So a root parent must drop the worker to an unprivileged uid for the limit to bind,
  and the limit must leave room for torch's threads and for any other process of that uid.
- RLIMIT_AS caps virtual memory, mappings of every kind included; RLIMIT_DATA (Linux >= 4.7)
  caps only private writable memory, so a shared anonymous or memfd mapping escapes it.
  tmpfs and /dev/shm pages escape both: cap those filesystems' size instead.
- RLIMIT_FSIZE: CPython ignores SIGXFSZ, so an oversized write fails with EFBIG
  (``OSError``) instead of killing the process.
- RLIMIT_CPU: SIGXCPU at the soft limit (fatal by default), SIGKILL at the hard limit.
- Limits are set soft = hard (CPU: hard = soft + 1 s), and never above the current hard
  limit, so the workload cannot raise them again.

The uid drop (:func:`drop_privileges`) and the interpreter under /root: here the venv's Python
lives in ``/root/.pyenv/versions/3.11.7`` and ``/root`` is mode 0700, so uid 65534 cannot even
start it, and a worker that drops after starting cannot import any module it has not loaded
yet, nor read a repository cached under ``/root/.cache``. The installation's own modes are
fine (0755 folders, 0644/0755 files throughout), only ``/root`` blocks. What works:

- bubblewrap run by root with the drop done inside the sandbox (``safehub/_bwrap.py``,
  ``bwrap_argv(uid=...)``, through ``setpriv``): bwrap's root is a fresh tmpfs, /root there
  holds only the bound interpreter, and the folders leading to it are made 0755;
- without bubblewrap: in the forked child, as root, ``namespaces.enter(user=False, mount=True,
  ...)``, then ``namespaces.hide_and_rebind("/root", [python prefix, repo, ...])`` (an empty
  tmpfs over /root with those paths bound back), then :func:`drop_privileges`.
"""

from __future__ import annotations

import os
import resource
import stat
from collections.abc import Callable
from typing import Any

from . import capabilities
from .libc import prctl

__all__ = ["apply_rlimits", "drop_privileges", "fit_torch_threads", "tasks_of_uid", "untraversable_ancestor"]

PR_SET_NO_NEW_PRIVS = 38
PR_GET_DUMPABLE = 3


def _set(which: int, soft: int, hard: int | None = None) -> tuple[int, int]:
    cur_soft, cur_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))
    return resource.getrlimit(which)


def apply_rlimits(
    memory_bytes: int | None = None,
    cpu_seconds: int | None = None,
    max_processes: int | None = None,
    max_open_files: int | None = None,
    max_file_size: int | None = None,
    *,
    memory_kind: str = "as",
    core: bool = False,
) -> dict[str, Any]:
    """Lower this process's resource limits (inherited by every child). None leaves one as is.

    Args:
        memory_bytes: RLIMIT_AS (``memory_kind="as"``, default) or RLIMIT_DATA (``"data"``).
            A CPU torch import maps about 0.5 GiB of address space; leave headroom.
        cpu_seconds: RLIMIT_CPU soft limit (SIGXCPU), hard limit one second later (SIGKILL).
        max_processes: RLIMIT_NPROC: processes and threads of the real uid, machine-wide; does
            nothing for uid 0 (see the module docstring).
        max_open_files: RLIMIT_NOFILE.
        max_file_size: RLIMIT_FSIZE, bytes per file written.
        memory_kind: "as" or "data".
        core: keep core dumps allowed (default: RLIMIT_CORE = 0, no dump of the workload's
            memory lands on disk).

    Returns:
        A dict of the limits now in force: name -> (soft, hard), plus ``nproc_binds`` (False
        when running as uid 0).

    Raises:
        ValueError: an unknown ``memory_kind`` or a negative value.
        OSError: setrlimit refused.
    """
    if memory_kind not in ("as", "data"):
        raise ValueError(f"memory_kind must be 'as' or 'data', not {memory_kind!r}")
    out: dict[str, Any] = {}
    for name, value in (
        ("memory", memory_bytes),
        ("cpu", cpu_seconds),
        ("nproc", max_processes),
        ("nofile", max_open_files),
        ("fsize", max_file_size),
    ):
        if value is not None and value < 0:
            raise ValueError(f"{name} limit must be >= 0, not {value!r}")
    if memory_bytes is not None:
        which = resource.RLIMIT_AS if memory_kind == "as" else resource.RLIMIT_DATA
        out["RLIMIT_AS" if memory_kind == "as" else "RLIMIT_DATA"] = _set(which, int(memory_bytes))
    if cpu_seconds is not None:
        out["RLIMIT_CPU"] = _set(resource.RLIMIT_CPU, int(cpu_seconds), int(cpu_seconds) + 1)
    if max_processes is not None:
        out["RLIMIT_NPROC"] = _set(resource.RLIMIT_NPROC, int(max_processes))
    if max_open_files is not None:
        out["RLIMIT_NOFILE"] = _set(resource.RLIMIT_NOFILE, int(max_open_files))
    if max_file_size is not None:
        out["RLIMIT_FSIZE"] = _set(resource.RLIMIT_FSIZE, int(max_file_size))
    if not core:
        out["RLIMIT_CORE"] = _set(resource.RLIMIT_CORE, 0)
    out["nproc_binds"] = os.getuid() != 0
    return out


def tasks_of_uid(uid: int) -> int:
    """Live processes and threads of real uid ``uid`` that this process's /proc shows: what
    RLIMIT_NPROC counts for it in the initial user namespace, but zombies (the kernel counts
    them until they are reaped, which is soon: counted, they would leave room once gone)."""
    count = 0
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return 0
    for name in names:
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        real_uid = threads = None
        zombie = False
        for line in status.splitlines():
            if line.startswith(b"Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
            elif line.startswith(b"State:"):
                zombie = line.split()[1:2] in ([b"Z"], [b"X"])
        if real_uid == uid and threads and not zombie:
            count += threads
    return count


# torch's pools are left this many tasks of max_processes for everything else.
THREAD_HEADROOM = 16


def fit_torch_threads(max_processes: int | None, cpus: int | None = None) -> int | None:
    """Keep torch's default thread pools inside ``max_processes``; return the count set, or None.

    torch starts an intra-op pool of one thread per core on its first parallel op, and an
    inter-op pool as large when asked; RLIMIT_NPROC counts each thread, and libgomp ends the
    process when it cannot start one. Where ``cpus`` (default: this machine's) of each would
    not fit, both pools are lowered to ``(max_processes - THREAD_HEADROOM) // 2``: through
    torch itself once imported (the warm path), else through OMP_NUM_THREADS, which torch reads
    at import. An OMP_NUM_THREADS the caller passed is left as it is.
    """
    if not max_processes or "OMP_NUM_THREADS" in os.environ:
        return None
    fit = max(1, (max_processes - THREAD_HEADROOM) // 2)
    if (cpus or os.cpu_count() or 1) <= fit:
        return None
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(fit)
        return fit
    torch.set_num_threads(min(fit, torch.get_num_threads()))
    try:
        torch.set_num_interop_threads(fit)
    except RuntimeError:
        pass  # the inter-op pool started already (not in a fresh worker)
    return fit


def drop_privileges(uid: int = 65534, gid: int | None = None, *, no_new_privs: bool = True) -> dict[str, Any]:
    """Switch a root process to ``uid``/``gid`` for good, and prove there is no way back.

    Order matters: supplementary groups first (``setgroups([])``; otherwise root's group 0
    stays), then the gid (which needs root), then the uid (real, effective and saved, so no
    saved id lets the process switch back). Changing uid from 0 clears every capability and
    makes the process non-dumpable (other processes of ``uid`` cannot ptrace it; to write id
    maps later, ``namespaces.enter`` sets it dumpable for that moment).

    Args:
        uid: the target uid (not 0).
        gid: the target gid; default ``uid``.
        no_new_privs: also set PR_SET_NO_NEW_PRIVS (no setuid binary can raise it again).

    Returns:
        A dict: ``uid``, ``gid``, ``groups``, ``cap_eff``, ``no_new_privs``, ``regain_blocked``.

    Raises:
        PermissionError: not root (or lacking CAP_SETUID/CAP_SETGID).
        ValueError: uid 0 requested.
        RuntimeError: the drop did not hold (ids not all changed, a capability left, or
            setuid(0) succeeded).
    """
    if uid == 0:
        raise ValueError("drop_privileges needs a non-zero uid")
    gid = uid if gid is None else gid
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if no_new_privs:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    # Verify: every id changed, no capability left, and the way back is closed.
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise RuntimeError(f"uid drop incomplete: {os.getresuid()} {os.getresgid()} {os.getgroups()}")
    cap_eff = capabilities.effective()
    if cap_eff:
        raise RuntimeError(f"uid drop left capabilities: CapEff={cap_eff:#x}")
    attempts: tuple[Callable[[], None], ...] = (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.setgroups([0]))
    for attempt in attempts:
        try:
            attempt()
        except PermissionError:
            continue
        raise RuntimeError("uid drop did not hold: regained a root id")
    return {
        "uid": uid,
        "gid": gid,
        "groups": [],
        "cap_eff": cap_eff,
        "no_new_privs": no_new_privs,
        "regain_blocked": True,
    }


def untraversable_ancestor(path: str, uid: int, gid: int | None = None) -> str | None:
    """The outermost folder above ``path`` that ``uid`` cannot traverse, by its mode bits, or None.

    What a uid drop must cover: root reaches everything, ``uid`` stops at the first folder
    without its execute bit (``/root`` is 0700 here). A missing folder blocks nothing.
    """
    gid = uid if gid is None else gid
    parts = os.path.realpath(path).split("/")
    for i in range(2, len(parts)):
        folder = "/".join(parts[:i])
        try:
            st = os.stat(folder)
        except OSError:
            return None
        bit = stat.S_IXUSR if st.st_uid == uid else (stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH)
        if not st.st_mode & bit:
            return folder
    return None
