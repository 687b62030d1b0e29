"""Linux namespaces for the worker: entered directly (unshare) or through bubblewrap.

Standard library only (ctypes). Parent-only code (bubblewrap's command line) lives in
``safehub/_bwrap.py``.

Two ways in:

- :func:`enter` calls ``unshare(2)`` in the current process. ``CLONE_NEWUSER`` needs a
  single-threaded process (EINVAL otherwise): call it in a child forked from the zygote (a
  fork is single-threaded even when torch started threads in the parent), or in a cold worker
  before anything starts a thread. A user namespace makes the rest unprivileged: network, IPC,
  UTS, mount and pid namespaces then need no root.
- bubblewrap around a cold worker (``safehub/_bwrap.py``): an empty root on a tmpfs with only
  the system, the Python installation, the repository (read-only) and the scratch folder
  (read-write) bound in.

A new pid namespace applies to *children* only; ``confine.py`` forks a small init into it.

What a network namespace gives: only a loopback device, and down: ``connect`` to any address,
loopback included, fails with ENETUNREACH; nothing on the host's loopback is reachable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from .libc import check, libc

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "enter",
    "hide_and_rebind",
    "mount_tmpfs",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
O_PATH = getattr(os, "O_PATH", 0o10000000)

# The mount namespace this process (or the one it was forked from) left through enter(mount=True).
_mount_ns_left: int | None = None


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter(
    user: bool = True,
    net: bool = True,
    ipc: bool = True,
    pid: bool = False,
    mount: bool = False,
    *,
    uts: bool = False,
    cgroup: bool = False,
    map_root: bool = False,
) -> dict[str, Any]:
    """Move this process into new namespaces, all with one ``unshare(2)``.

    Args:
        user: a new user namespace; the current uid/gid are mapped to themselves inside (or to
            0 with ``map_root``). Needed for the others unless the caller is root.
        net: a new network namespace: loopback only, and down.
        ipc: a new System V IPC / POSIX message queue namespace.
        pid: a new pid namespace *for the children* (``confine.py`` forks into it).
        mount: a new mount namespace, made private (nothing propagates back to the host).
        uts, cgroup: host name and cgroup view.
        map_root: map the current ids to 0 inside (the process then holds every capability of
            its own namespace; keep it off unless something inside must mount).

    Returns:
        A dict: ``applied``, ``namespaces`` (names entered), ``uid``/``gid`` inside,
        ``uid_map``.

    Raises:
        OSError: EINVAL (more than one thread and ``user``), EPERM (user namespaces disabled,
            or no privilege without ``user``), ENOSPC (user.max_user_namespaces reached).
    """
    flags = 0
    names = []
    for wanted, flag, name in (
        (user, CLONE_NEWUSER, "user"),
        (net, CLONE_NEWNET, "net"),
        (ipc, CLONE_NEWIPC, "ipc"),
        (pid, CLONE_NEWPID, "pid"),
        (mount, CLONE_NEWNS, "mount"),
        (uts, CLONE_NEWUTS, "uts"),
        (cgroup, CLONE_NEWCGROUP, "cgroup"),
    ):
        if wanted:
            flags |= flag
            names.append(name)
    if not flags:
        return {"applied": False, "namespaces": [], "reason": "nothing requested"}
    lib = libc()
    uid, gid = os.getuid(), os.getgid()
    # After a uid change the kernel marks the process non-dumpable, which makes its /proc
    # files root's: the id maps below could not be written. Dumpable only for the window.
    dumpable = lib.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    if user and dumpable == 0:
        lib.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    global _mount_ns_left
    try:
        if mount and _mount_ns_left is None:
            _mount_ns_left = os.stat("/proc/self/ns/mnt").st_ino
        check(lib.unshare(flags), "unshare(" + "|".join(names) + ")")
        uid_map = ""
        if user:
            inside_uid, inside_gid = (0, 0) if map_root else (uid, gid)
            # setgroups must be denied before an unprivileged gid_map write; it also stops the
            # workload from dropping a supplementary group that denies it access.
            try:
                _write("/proc/self/setgroups", "deny")
            except FileNotFoundError:  # pragma: no cover - kernels before 3.19
                pass
            uid_map = f"{inside_uid} {uid} 1"
            _write("/proc/self/uid_map", uid_map + "\n")
            _write("/proc/self/gid_map", f"{inside_gid} {gid} 1\n")
        if mount:
            # Without this, mounts made inside could propagate back to the host's namespace.
            check(lib.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount(/, MS_PRIVATE)")
    finally:
        if user and dumpable == 0:
            lib.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    return {
        "applied": True,
        "namespaces": names,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "uid_map": uid_map,
    }


def _same_mount_namespace_guard() -> None:
    """Raise unless this process is in a mount namespace of its own (not the one it started in)."""
    try:
        mine = os.stat("/proc/self/ns/mnt").st_ino
        theirs: int | None
        if _mount_ns_left is not None:
            # enter(mount=True) ran here or before a fork: its own record is the surest test,
            # also where the parent shares the new namespace (pid 2 under a namespace's init).
            theirs = _mount_ns_left
        else:
            theirs = os.stat(f"/proc/{os.getppid()}/ns/mnt").st_ino if os.getppid() > 0 else None
    except OSError:
        return  # the parent's namespace is not visible from here: it is not ours
    if theirs is not None and mine == theirs:
        raise RuntimeError("still in the parent's mount namespace: call enter(mount=True) first")


def hide_and_rebind(hide_dir: str, keep_paths: Iterable[str], *, read_only: bool = True) -> dict[str, Any]:
    """In a private mount namespace, cover ``hide_dir`` with an empty tmpfs (mode 0755) and
    bind ``keep_paths`` (each beneath it) back in place.

    For a root parent that drops to an unprivileged uid without bubblewrap: the interpreter
    and the hub cache live under ``/root`` (mode 0700 here), which uid 65534 cannot traverse.
    Call after ``enter(mount=True)`` (or with ``user=False`` as root) and before
    ``limits.drop_privileges``. Needs CAP_SYS_ADMIN over the mount namespace.

    Returns:
        A dict: ``hidden`` and ``kept`` (paths bound back); missing keep paths are skipped.
    """
    lib = libc()
    # A mistake here would cover the host's /root: refuse outside a private mount namespace.
    _same_mount_namespace_guard()
    hide_dir = os.path.realpath(hide_dir)
    fds = []
    try:
        for path in keep_paths:
            real = os.path.realpath(path)
            if real != hide_dir and not real.startswith(hide_dir.rstrip("/") + "/"):
                raise ValueError(f"{path!r} is not beneath {hide_dir!r}")
            try:
                fds.append((real, os.open(real, O_PATH | os.O_CLOEXEC)))
            except FileNotFoundError:
                continue
        check(
            lib.mount(b"tmpfs", hide_dir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m"),
            f"mount(tmpfs, {hide_dir})",
        )
        kept = []
        for real, fd in fds:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(real, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(real), mode=0o755, exist_ok=True)
                os.close(os.open(real, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            src = f"/proc/self/fd/{fd}".encode()
            check(lib.mount(src, real.encode(), None, MS_BIND | MS_REC, None), f"bind {real}")
            if read_only:
                check(
                    lib.mount(None, real.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None),
                    f"remount {real} read-only",
                )
            kept.append(real)
    finally:
        for _, fd in fds:
            os.close(fd)
    return {"hidden": hide_dir, "kept": kept}


def mount_tmpfs(path: str, size: int, *, uid: int, gid: int, mode: int = 0o700, inodes: int | None = None) -> dict[str, Any]:
    """In a private mount namespace, mount a tmpfs of ``size`` bytes over the folder ``path``.

    For the worker's scratch folder: whatever was in the folder is covered (the new one is
    empty), writes past ``size`` bytes or ``inodes`` files fail with ENOSPC, and the pages live
    in memory until the last process of the namespace is gone. Owned by ``uid``/``gid`` with
    ``mode``, so a worker that drops to ``uid`` next can write it. Processes whose working
    folder was ``path`` still stand in the covered folder: they must ``chdir`` again. Needs
    CAP_SYS_ADMIN over the mount namespace (root, or a user namespace's).

    Returns:
        A dict: ``path``, ``size``, ``inodes``.
    """
    lib = libc()
    _same_mount_namespace_guard()  # never over the host's folder
    real = os.path.realpath(path)
    inodes = inodes if inodes is not None else max(4096, size // 4096)
    options = f"size={int(size)},nr_inodes={int(inodes)},mode={mode:o},uid={int(uid)},gid={int(gid)}"
    # No MS_NOEXEC: torch.compile's C++ backend writes shared objects into TMPDIR and loads them.
    check(lib.mount(b"tmpfs", real.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()), f"mount(tmpfs, {real})")
    return {"path": real, "size": int(size), "inodes": int(inodes)}
