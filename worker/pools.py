"""The worker's side of a remote model's pools: shared memory the parent made, mapped here.

The parent (``safehub/_run/pools.py``) owns two memfds per remote model and passes them with
an INVOKE; the worker never creates one (where no memory cgroup can be had, seccomp refuses
``memfd_create`` here, and the pools give that sandbox the same fast path):

- the input pool, holding the call's large arguments: the last of the INVOKE's memfd segments,
  sealed by the parent against every write but through its own mapping (``F_SEAL_FUTURE_WRITE``
  with the size seals). :class:`Inputs` maps each memfd segment privately for one call: the model
  may write its inputs (copy-on-write pages of its own). The pool is written again for the next
  call, and a private mapping shows the file's pages until they are written, so a view the model
  kept past the reply is made private first (:meth:`Inputs.settle`), and the rest is unmapped
  after the reply is sent, not before.
- the result pool, when the INVOKE says ``result_pool``: its last fd, shared and writable, mapped
  once and kept (:func:`result_pool`); ``values.pack`` copies a result's large blobs into it.
  The parent copies them out into memory of its own before it reads them, so nothing written
  here later reaches the caller's tensors.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from typing import Any

MADV_POPULATE_WRITE = 23  # Linux 5.14: fault pages in writable now (and break copy-on-write)
_REFS_WHEN_FREE = 3  # sys.getrefcount of a mapping only Inputs holds: its list, the loop name, the argument
# A tensor on a mapping holds a reference to it, not a buffer export (torch.frombuffer), so the
# mapping's close() would not refuse: the reference count alone says whether one is left.

_result_pool: list[Any] = []  # [(device, inode, size), mmap, memoryview] of the parent's result pool


def result_pool(fd: int) -> memoryview | None:
    """A writable view of the parent's result pool ``fd`` (mapped once, kept until the parent
    sends another); None when it cannot be mapped (the result then goes the old way)."""
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino, info.st_size)
    if _result_pool and _result_pool[0] == key:
        return _result_pool[2]
    drop_result_pool()
    try:
        mapping = mmap.mmap(fd, info.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        mapping.madvise(MADV_POPULATE_WRITE)  # every page now, not one fault per 4 KiB in each copy
    _result_pool[:] = [key, mapping, memoryview(mapping)]
    return _result_pool[2]


def drop_result_pool() -> None:
    """Unmap the result pool (the parent sent a larger one)."""
    if _result_pool:
        _, mapping, view = _result_pool
        _result_pool.clear()
        view.release()
        with contextlib.suppress(BufferError):
            mapping.close()


class Inputs:
    """One call's memfd segments, mapped privately; unmapped after its reply (:meth:`release`)."""

    def __init__(self) -> None:
        self.maps: list[mmap.mmap] = []
        self.held: Any = None  # the call's result, freed after the reply too

    def map(self, fd: int) -> Any:
        """The parent's memfd ``fd``, mapped privately: the model may write its inputs; nobody else sees it."""
        size = os.fstat(fd).st_size
        if size == 0:
            return b""
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.maps.append(mapping)
        return mapping

    def settle(self) -> None:
        """Before the reply: make every page of a mapping the model still holds (an input it kept,
        or returned: the result, held until after the reply, may be a view on it) its own, so the
        parent's next call, written into the same pool, cannot change it."""
        for mapping in self.maps:
            if sys.getrefcount(mapping) > _REFS_WHEN_FREE:
                with contextlib.suppress(OSError):
                    mapping.madvise(MADV_POPULATE_WRITE)

    def release(self) -> None:
        """After the reply: free the result, unmap what nothing holds (a kept mapping goes with its
        last tensor)."""
        self.held = None
        for mapping in self.maps:
            if sys.getrefcount(mapping) <= _REFS_WHEN_FREE:
                with contextlib.suppress(BufferError):
                    mapping.close()
        self.maps = []
