"""The C library, loaded once for every sandbox layer: the system calls Python does not wrap."""

from __future__ import annotations

import ctypes
import os

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        for name in ("prctl", "unshare", "mount"):
            getattr(lib, name).restype = ctypes.c_int
        _libc = lib
    return _libc


def check(result: int, what: str) -> int:
    """``result`` of a call that returns -1 and sets errno on failure, or OSError naming ``what``."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, value: int = 0) -> None:
    ulong = ctypes.c_ulong
    check(libc().prctl(option, ulong(value), ulong(0), ulong(0), ulong(0)), f"prctl({option})")
