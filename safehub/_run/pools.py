"""A remote model's pools: pre-faulted shared memory both ways, reused call after call (DESIGN 4).

Big tensors cross at the speed of a copy into memory already faulted in, not of fresh pages:
each :class:`~safehub._run.session.RemoteSession` owns one :class:`SessionPools`, made and
owned by the parent (so a worker held to one address space, where seccomp refuses it
``memfd_create``, gets the same path). The worker's side is ``worker/pools.py``.

- **Inputs** (:class:`InputPool`): a memfd the parent maps shared and writes a call's large
  arguments into, then passes as the INVOKE's last memfd segment. Before the worker ever sees it
  it is sealed with ``F_SEAL_FUTURE_WRITE``, ``F_SEAL_SHRINK``, ``F_SEAL_GROW`` and
  ``F_SEAL_SEAL``: the parent's mapping, made before the seal, stays writable; for the worker
  every ``write``, writable shared ``mmap`` (and ``mprotect`` of a read-only one: the kernel
  clears its ``VM_MAYWRITE``), hole punched, resize and new seal is refused by the kernel, on any
  descriptor of the file, a reopened ``/proc/self/fd`` one included: seals belong to the file,
  not to a descriptor (a descriptor opened read-only would not hold: ``/proc/self/fd/N`` reopens
  the memfd writable). The worker maps it privately (copy-on-write) and may write its inputs
  there, in pages of its own.
- **Results** (:class:`ResultPool`): a memfd of no pages (the worker maps it and faults them in:
  they are the worker's memory, charged to its memory cgroup, inside its address space), sealed
  against resizing only, passed with the INVOKE (``result_pool``); the worker copies a result's
  large blobs into it and says how many bytes (RETURNED's ``pooled``). The parent never maps it:
  it checks that those bytes are all allocated (``SEEK_HOLE``: no sparse claim, as
  ``safehub/_memfds.py`` refuses sparse memfds), then reads them (``preadv``: a hole reads as
  zeros and allocates nothing) into a region of its own private memory before it looks at one of
  them: the worker can write the pool at any time, never the caller's tensors, and every check of
  ``values.unpack`` (bool bytes, ranges) runs on the copy. A region is anonymous memory
  (``MADV_HUGEPAGE``, pre-faulted with ``MADV_POPULATE_WRITE``) that goes back to the pool when
  the last tensor on it is collected, and is reused by a later result.

Bounds. The result pool grows only to fit a result the worker already returned another way (in
memfds it held, or inline), and never past ``result_cap`` (the sandbox's ``memory_limit``); a
reply costs the caller one region of its ``pooled`` bytes, at most the pool's size, so at most
``memory_limit``: what a result coming any other way may cost. The input pool grows to the
caller's largest arguments. At most :data:`FREE_REGIONS` regions wait for reuse; everything is
unmapped when the session ends, and a region the caller still holds when its last tensor goes.
The worker keeps the result pool mapped between calls: its pages, up to the largest result's
size, stay the worker's memory, counted against ``memory_limit`` (a pre-faulted pool's price).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import threading
import weakref
from typing import Any

from ..errors import ResultDecodeError

ROUND = 2 * 1024 * 1024  # pools and regions in whole huge pages
FREE_REGIONS = 2  # result regions kept for reuse
MADV_POPULATE_WRITE = 23  # Linux 5.14: fault every page in now, one call instead of a fault per 4 KiB
F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not in Python's fcntl before 3.13
INPUT_SEALS = F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
RESULT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _rounded(nbytes: int) -> int:
    return -(-max(nbytes, 1) // ROUND) * ROUND


def _populate(mapping: mmap.mmap, advice: int) -> None:
    with contextlib.suppress(OSError):  # older kernels: the pages fault in on first use instead
        mapping.madvise(advice)


def _sealed_memfd(name: str, size: int, seals: int, mapped: bool) -> tuple[int, mmap.mmap | None]:
    """A memfd of ``size`` bytes sealed with ``seals``; with ``mapped``, the parent's writable shared
    mapping of it, made (and pre-faulted) before the seals, so it keeps its rights."""
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mapping = None
        if mapped:
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            _populate(mapping, MADV_POPULATE_WRITE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping


class _SharedMemfd:
    """The input pool's memfd and the parent's shared, writable mapping of it."""

    def __init__(self, size: int) -> None:
        self.fd, mapping = _sealed_memfd("safehub-inputs", size, INPUT_SEALS, mapped=True)
        assert mapping is not None
        self.mapping = mapping
        self.size = size
        self.view = memoryview(mapping)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self.mapping.close()
        os.close(self.fd)


class InputPool:
    """The caller's large arguments, written here for the worker to read (module docstring)."""

    def __init__(self) -> None:
        self.memfd: _SharedMemfd | None = None

    def reserve(self, nbytes: int) -> memoryview:
        """``values.pack``'s pool: a writable view of at least ``nbytes``, grown when needed."""
        if self.memfd is None or self.memfd.size < nbytes:
            self.close()
            self.memfd = _SharedMemfd(_rounded(nbytes))
        return self.memfd.view

    @property
    def fd(self) -> int:
        assert self.memfd is not None
        return self.memfd.fd

    def close(self) -> None:
        memfd, self.memfd = self.memfd, None
        if memfd is not None:
            memfd.close()


class ResultPool:
    """Where the worker writes a result's large blobs, and the caller's regions they are copied to."""

    def __init__(self, cap: int) -> None:
        self.cap = cap  # result_cap: the most the worker could hold
        self.fd: int | None = None
        self.size = 0
        self.lock = threading.Lock()  # the free regions: returned by the collector, from any thread
        self.free: list[mmap.mmap] = []
        self.closed = False

    def fit(self, nbytes: int) -> None:
        """After a result of ``nbytes`` that came another way: a pool it fits in, for the next one."""
        if nbytes <= self.size or nbytes > self.cap:
            return
        self._drop()
        size = min(_rounded(nbytes), self.cap)
        self.fd, _ = _sealed_memfd("safehub-results", size, RESULT_SEALS, mapped=False)
        self.size = size

    def copy_out(self, nbytes: Any) -> Any:
        """The first ``nbytes`` of the pool (RETURNED's ``pooled``), copied into a region of the
        caller's own: a writable buffer for ``values.unpack``, back in the pool once collected."""
        if self.fd is None:
            raise ResultDecodeError("the worker's result uses a result pool it was not given")
        if type(nbytes) is not int or not 0 < nbytes <= self.size:
            raise ResultDecodeError(f"the worker's result claims {str(nbytes)[:40]} bytes of a result pool of {self.size}")
        hole = os.lseek(self.fd, 0, os.SEEK_HOLE)
        if hole < nbytes:
            raise ResultDecodeError(
                f"the worker's result pool is sparse (a hole at byte {hole} of the {nbytes} claimed): "
                "the caller would pay for memory the worker never held")
        region = self._region(nbytes)
        with memoryview(region) as into:
            _read_into(self.fd, into[:nbytes])  # one copy; the worker may write the pool meanwhile
        exported = (ctypes.c_char * nbytes).from_buffer(region)
        weakref.finalize(exported, self._returned, region)
        return exported

    def _region(self, nbytes: int) -> mmap.mmap:
        """A free region of at least ``nbytes`` (and not much more), or a new one, pre-faulted."""
        with self.lock:
            for index, region in enumerate(self.free):
                if nbytes <= len(region) <= 2 * _rounded(nbytes):
                    return self.free.pop(index)
        region = mmap.mmap(-1, _rounded(nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(OSError):
            region.madvise(mmap.MADV_HUGEPAGE)  # fewer faults, and freed in 2 MiB pieces
        _populate(region, MADV_POPULATE_WRITE)
        return region

    def _returned(self, region: mmap.mmap) -> None:
        """The last tensor on ``region`` was collected: keep it for the next result, or let it go."""
        with self.lock:
            if not self.closed and len(self.free) < FREE_REGIONS:
                self.free.append(region)
                return
        # Unmapped when its last reference (the export being torn down) goes.

    def _drop(self) -> None:
        fd, self.fd, self.size = self.fd, None, 0
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.free.clear()
        self._drop()


def _read_into(fd: int, view: memoryview) -> None:
    """Read ``len(view)`` bytes of ``fd`` from its start: a hole reads as zeros and costs no page."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], done)
        if got <= 0:
            raise ResultDecodeError(f"the worker's result pool ended at byte {done}")
        done += got


class SessionPools:
    """Both pools of one remote model; the session's call lock serialises their use."""

    def __init__(self, result_cap: int) -> None:
        self.inputs = InputPool()
        self.results = ResultPool(result_cap)

    def close(self) -> None:
        self.inputs.close()
        self.results.close()
