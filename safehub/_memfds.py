"""The worker's sealed memfds, checked and mapped: one private mapping per reply, no descriptor kept.

A result's bytes come as sealed memfds (``worker/weights.py`` writes them). Before a byte is
read, each must be:

- sealed against writes, shrinking and growing, seals sealed: otherwise the worker could change
  the bytes after they were checked (a time-of-check/time-of-use race on shared pages);
- a regular file of 1 byte to ``max_bytes``, the most the worker could have held;
- on tmpfs (shmem), not hugetlbfs: an ``MFD_HUGETLB`` memfd's pages come from the machine's
  huge page pool, and mapping one fails (ENOMEM) where there is none;
- fully allocated (its blocks cover its size): a sparse memfd (``ftruncate`` and no page written)
  costs the worker nothing and the caller every page it reads, so the caller never pays for
  memory the worker did not.

Then all the reply's memfds are mapped privately (copy-on-write: the caller may write tensors on
them without touching the worker's pages) into one reserved range, back to back, and the caller
closes the descriptors: Python's ``mmap`` before 3.13 keeps a dup of its file's descriptor for its
whole life, so a caller keeping thousands of results would run out of them. The range is an
anonymous ``mmap.mmap`` whose pages are replaced with ``MAP_FIXED`` mappings of the memfds; it
unmaps all of them when the last view on it (a tensor) is gone.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import stat
from collections.abc import Sequence

from ._results import MAX_TOTAL_BYTES
from .errors import ResultDecodeError

REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
TMPFS_MAGIC = 0x01021994  # where memfd_create puts its files (statfs(2))
HUGETLBFS_MAGIC = 0x958458F6
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value
_STATFS_SIZE = 128  # struct statfs is 120 bytes on 64-bit Linux; f_type comes first, a long

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)


def check_sealed_memfd(fd: int, max_bytes: int) -> int:
    """The size of the worker's memfd ``fd`` once it passed every check (module docstring);
    else :class:`ResultDecodeError`."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        info = os.fstat(fd)
    except OSError as exc:
        raise ResultDecodeError(f"the worker's result is not a sealed memfd: {exc}") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ResultDecodeError(f"the worker's memfd is not sealed against writes (seals {seals:#x})")
    if not stat.S_ISREG(info.st_mode) or not 0 < info.st_size <= max_bytes:
        raise ResultDecodeError(
            f"the worker's memfd has an unacceptable size ({info.st_size} bytes; at most {max_bytes})")
    kind = _filesystem(fd)
    if kind != TMPFS_MAGIC:
        what = "a hugetlb memfd (MFD_HUGETLB)" if kind == HUGETLBFS_MAGIC else f"on a filesystem of type {kind:#x}"
        raise ResultDecodeError(f"the worker's memfd is {what}: results come in plain memfds")
    if info.st_blocks * 512 < info.st_size:
        raise ResultDecodeError(
            f"the worker's memfd is sparse ({info.st_blocks * 512} of its {info.st_size} bytes allocated): "
            "the caller would pay for memory the worker never held")
    return info.st_size


def map_sealed_memfds(fds: Sequence[int], *, max_bytes: int) -> list[memoryview]:
    """The worker's memfds ``fds``, checked, then mapped privately into one range: a writable view
    of each, in order. ``max_bytes`` bounds them together. The caller still owns (and closes) ``fds``:
    the mapping needs none of them."""
    sizes = [check_sealed_memfd(fd, max_bytes) for fd in fds]
    if sum(sizes) > max_bytes:
        raise ResultDecodeError(f"the worker's memfds hold {sum(sizes)} bytes, more than the cap of {max_bytes}")
    if not fds:
        return []
    starts, end = [], 0
    for size in sizes:
        starts.append(end)
        end += -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    region = mmap.mmap(-1, end, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(region)
    base = ctypes.addressof(anchor)
    del anchor  # its export of the region ends here
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED
    for fd, start, size in zip(fds, starts, sizes, strict=True):
        # Over the region's own pages only: MAP_FIXED replaces them, and the region unmaps it with them.
        if _libc.mmap(base + start, size, prot, flags, fd, 0) in (None, _MAP_FAILED):
            error = ctypes.get_errno()
            region.close()
            raise ResultDecodeError(f"the worker's memfd could not be mapped: {os.strerror(error)}")
    whole = memoryview(region)
    return [whole[start : start + size] for start, size in zip(starts, sizes, strict=True)]


def map_sealed_memfd(fd: int, *, max_bytes: int = MAX_TOTAL_BYTES) -> memoryview:
    """One memfd, as :func:`map_sealed_memfds` maps a reply's."""
    return map_sealed_memfds([fd], max_bytes=max_bytes)[0]


def _filesystem(fd: int) -> int:
    """``f_type`` of the filesystem ``fd`` is on (statfs(2))."""
    buffer = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buffer) != 0:
        error = ctypes.get_errno()
        raise ResultDecodeError(f"the worker's memfd cannot be examined: {os.strerror(error)}")
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF
