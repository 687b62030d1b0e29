"""Capabilities: the worker keeps none, in any user namespace.

A process that enters a new user namespace holds every capability *of that namespace* until it
execs, and the worker never execs: after ``unshare(CLONE_NEWUSER)`` (the unprivileged path, and
the process-count namespace after root's uid drop) its CapEff is full. Those capabilities reach
only what the namespace owns (its mount, network and pid namespaces, files of the ids mapped into
it), and seccomp and Landlock refuse most of what they would allow, but the repository's code has
no use for any of them: :func:`drop_all` clears the bounding, ambient, inheritable, permitted and
effective sets once every layer that needs one (mounts, id maps) is in place, before seccomp.

Standard library only.
"""

from __future__ import annotations

import ctypes
import os

from .libc import check, libc

__all__ = ["drop_all", "effective"]

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63  # every bit a 64-bit set can hold; dropping an unknown one fails harmlessly


def effective() -> int:
    """This process's CapEff, from /proc (0 when it cannot be read: nothing to drop then)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def drop_all() -> dict[str, int]:
    """Clear every capability set of this process for good; return what was held before.

    The bounding set goes first (dropping from it needs CAP_SETPCAP, which the permitted set
    still holds), so no later execve of a file with capabilities can bring one back.

    Raises:
        OSError: capset refused.
        RuntimeError: a capability is still in force afterwards.
    """
    before = effective()
    lib = libc()
    if before:
        for cap in range(_last_cap() + 1):
            lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the kernel's last: ignored
    lib.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before Linux 4.3
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    check(lib.capset(ctypes.byref(header), data), "capset")
    after = effective()
    if after:
        raise RuntimeError(f"capabilities left after dropping them all: CapEff={after:#x}")
    return {"cap_eff_before": before, "pid": os.getpid()}
