"""Landlock: confine the filesystem, TCP, signals and abstract sockets of this process.

Standard library only (ctypes). Linux only: on another system, or a kernel without Landlock, :func:`abi_version`
returns 0 and :func:`restrict` applies nothing and says so.

A Landlock domain is inherited by every child and can never be lifted, only narrowed. It
binds root too (capabilities do not bypass it), and it is unprivileged: no root, no user
namespace needed. It applies to the *calling thread* only (ABI 7 has no thread sync), so call
:func:`restrict` in a single-threaded process: a forked child, or the worker before it starts
any thread. The result reports the thread count it saw.

What is handled, by ABI (the running kernel's, read with ``landlock_create_ruleset(NULL, 0,
LANDLOCK_CREATE_RULESET_VERSION)``):

- ABI 1: the base file rights (execute, read, write, readdir, remove, make_*),
- ABI 2: ``REFER`` (rename and link across folders),
- ABI 3: ``TRUNCATE``,
- ABI 4: TCP ``bind`` and ``connect`` (handled with no allowing rule: all TCP denied),
- ABI 5: ``IOCTL_DEV`` (ioctl on device files),
- ABI 6: scopes: signals and abstract unix sockets cannot cross out of the domain,
- ABI 7: audit logging control only; nothing more to handle.

UDP, raw sockets and unix sockets by path are not Landlock's (up to ABI 7): the seccomp layer
and the network namespace cover UDP and raw sockets.
"""

from __future__ import annotations

import ctypes
import os
import platform
import stat
import sys
from collections.abc import Iterable
from typing import Any

from .libc import check, libc

__all__ = [
    "abi_version",
    "errata",
    "handled_fs_rights",
    "restrict",
]

# Syscall numbers: 444-446 on both x86_64 and aarch64 (the unified numbering from 5.1 on).
_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446), "arm64": (444, 445, 446)}

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_CREATE_RULESET_ERRATA = 1 << 1  # ABI 7
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2

ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13  # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5

ACCESS_NET_BIND_TCP = 1 << 0  # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_FS_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_BY_ABI = {1: _FS_V1, 2: ACCESS_FS_REFER, 3: ACCESS_FS_TRUNCATE, 5: ACCESS_FS_IOCTL_DEV}

# Rights that make sense on a regular file; a rule on a non-directory with any other right
# fails with EINVAL.
_FILE_RIGHTS = (
    ACCESS_FS_EXECUTE
    | ACCESS_FS_WRITE_FILE
    | ACCESS_FS_READ_FILE
    | ACCESS_FS_TRUNCATE
    | ACCESS_FS_IOCTL_DEV
)
_READ_RIGHTS = ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR

PR_SET_NO_NEW_PRIVS = 38
O_PATH = getattr(os, "O_PATH", 0o10000000)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the UAPI header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _numbers() -> tuple[int, int, int] | None:
    return _SYSCALLS.get(platform.machine())


def abi_version() -> int:
    """The Landlock ABI version of the running kernel; 0 when Landlock is unavailable.

    0 covers: not Linux, an architecture without known syscall numbers, a kernel older than
    5.13 (ENOSYS), and Landlock built but not enabled at boot (EOPNOTSUPP).
    """
    if not sys.platform.startswith("linux"):
        return 0
    nums = _numbers()
    if nums is None:
        return 0
    try:
        lib = libc()
    except OSError:
        return 0
    res = lib.syscall(
        ctypes.c_long(nums[0]), None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION)
    )
    return int(res) if res > 0 else 0


def errata() -> int:
    """The errata bitmask of the running kernel (ABI >= 7), else 0."""
    nums = _numbers()
    if nums is None or abi_version() < 7:
        return 0
    res = libc().syscall(
        ctypes.c_long(nums[0]), None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_ERRATA)
    )
    return int(res) if res >= 0 else 0


def handled_fs_rights(abi: int) -> int:
    """Every filesystem right the given ABI knows."""
    mask = 0
    for version, bits in _FS_BY_ABI.items():
        if abi >= version:
            mask |= bits
    return mask


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _dedupe(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in paths or ():
        p = os.fspath(p)
        if p and p not in out:
            out.append(p)
    return out


def _open_path(path: str) -> int | None:
    try:
        return os.open(path, O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None


def restrict(
    read_paths: Iterable[str],
    write_paths: Iterable[str],
    exec_paths: Iterable[str] | None = None,
    *,
    allow_tcp: bool = False,
    scope_signals: bool = True,
    scope_abstract_unix: bool = True,
) -> dict[str, Any]:
    """Enforce a Landlock domain on the calling thread (and every future child).

    Args:
        read_paths: files and folders that may be read (and listed); with ``exec_paths`` None
            they may also be executed (the seccomp layer denies execve anyway).
        write_paths: folders (or files) with every right: read, write, create, remove, rename,
            truncate, device ioctl.
        exec_paths: when given, EXECUTE is granted beneath these only (plus write paths).
        allow_tcp: False (default) handles TCP bind and connect with no allowing rule, so every
            TCP bind/connect fails with EACCES. True leaves TCP to the other layers.
        scope_signals: deny signals to processes outside this domain (ABI >= 6).
        scope_abstract_unix: deny connecting to abstract unix sockets created outside this
            domain (ABI >= 6). Sockets by path and inherited socket fds are unaffected, so the
            result channel keeps working.

    Returns:
        A dict: ``applied`` (bool), ``abi``, ``handled_access_fs``, ``handled_access_net``,
        ``scoped`` (ints), ``read``, ``write``, ``exec`` (the paths given rules), ``skipped``
        (paths that do not exist), ``threads`` (threads seen in this process), ``reason``
        (only when nothing was applied).

    Raises:
        OSError: a Landlock call failed on a kernel that supports it (nothing half-applied:
            the domain is either enforced whole or not at all).

    Paths that do not exist are skipped. Symlinks are followed when the rule is added, so a
    rule on ``/lib`` -> ``usr/lib`` covers ``/usr/lib``.
    """
    abi = abi_version()
    if abi <= 0:
        return {"applied": False, "abi": 0, "reason": "Landlock is not supported by this kernel"}
    numbers = _numbers()
    if numbers is None:
        return {"applied": False, "abi": abi, "reason": f"no Landlock syscall numbers for {platform.machine()}"}
    create_nr, add_rule_nr, restrict_nr = numbers
    lib = libc()

    fs = handled_fs_rights(abi)
    net = 0
    if abi >= 4 and not allow_tcp:
        net = ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP
    scoped = 0
    if abi >= 6:
        if scope_abstract_unix:
            scoped |= SCOPE_ABSTRACT_UNIX_SOCKET
        if scope_signals:
            scoped |= SCOPE_SIGNAL

    attr = _RulesetAttr(fs, net, scoped)
    # Older ABIs reject unknown trailing fields only when non-zero, but pass the size of what
    # the kernel knows so an ABI < 4 kernel never sees the newer words at all.
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset_fd = check(
        lib.syscall(ctypes.c_long(create_nr), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    applied: dict[str, list[str]] = {"read": [], "write": [], "exec": [], "skipped": []}
    try:
        exec_bits = ACCESS_FS_EXECUTE if exec_paths is None else 0
        rules: list[tuple[str, int, str]] = []
        rules += [(p, _READ_RIGHTS | exec_bits, "read") for p in _dedupe(read_paths)]
        rules += [(p, fs, "write") for p in _dedupe(write_paths)]
        if exec_paths is not None:
            rules += [(p, ACCESS_FS_EXECUTE | _READ_RIGHTS, "exec") for p in _dedupe(exec_paths)]
        for path, rights, kind in rules:
            fd = _open_path(path)
            if fd is None:
                applied["skipped"].append(path)
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= _FILE_RIGHTS
                rights &= fs
                rule = _PathBeneathAttr(rights, fd)
                check(
                    lib.syscall(
                        ctypes.c_long(add_rule_nr),
                        ctypes.c_int(ruleset_fd),
                        ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                        ctypes.byref(rule),
                        ctypes.c_uint32(0),
                    ),
                    f"landlock_add_rule({path!r})",
                )
            finally:
                os.close(fd)
            applied[kind].append(path)
        # Without no_new_privs, landlock_restrict_self needs CAP_SYS_ADMIN; with it, a setuid
        # program can never run outside the domain with raised privileges.
        check(lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        check(
            lib.syscall(ctypes.c_long(restrict_nr), ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)),
            "landlock_restrict_self",
        )
    finally:
        os.close(ruleset_fd)
    return {
        "applied": True,
        "abi": abi,
        "handled_access_fs": fs,
        "handled_access_net": net,
        "scoped": scoped,
        "threads": _thread_count(),
        **applied,
    }
