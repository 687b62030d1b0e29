"""safehub._memfds: which memfds a result may come in, and how they are mapped (no fd kept)."""

from __future__ import annotations

import fcntl
import gc
import os

import pytest

from safehub._memfds import map_sealed_memfds
from safehub.errors import ResultDecodeError

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MIB = 1024 * 1024


def sealed(data: bytes = b"", *, size: int | None = None, flags: int = 0) -> int:
    fd = os.memfd_create("test-memfds", os.MFD_ALLOW_SEALING | flags)
    if data:
        os.write(fd, data)
    if size is not None:
        os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def mappings(name: str = "memfd:test-memfds") -> int:
    with open("/proc/self/maps") as maps:
        return sum(name in line for line in maps)


def test_a_reply_is_mapped_whole_and_keeps_no_descriptor():
    before = open_fds()
    fds = [sealed(b"a" * 5000), sealed(b"b" * 3), sealed(b"c" * 3 * MIB)]
    views = map_sealed_memfds(fds, max_bytes=4 * MIB)
    for fd in fds:
        os.close(fd)
    assert open_fds() == before  # Python's mmap before 3.13 would keep a dup of each
    assert [len(v) for v in views] == [5000, 3, 3 * MIB]
    assert [bytes(v[:2]) for v in views] == [b"aa", b"bb", b"cc"]
    assert len({v.obj for v in views}) == 1  # one mapping for the reply
    views[0][0] = ord("z")  # private: the caller may write, the memfd is unchanged
    assert bytes(views[0][:2]) == b"za"
    assert mappings() == 3
    del views
    gc.collect()
    assert mappings() == 0  # the last view gone, everything is unmapped


def test_a_thousand_kept_replies_hold_no_descriptor():
    before = open_fds()
    kept = []
    for _ in range(1000):
        fd = sealed(b"x" * 100)
        kept.extend(map_sealed_memfds([fd], max_bytes=MIB))
        os.close(fd)
    assert open_fds() == before and len(kept) == 1000


def test_a_sparse_memfd_is_refused():
    fd = sealed(b"head", size=64 * MIB)  # one page written, 64 MiB announced
    try:
        with pytest.raises(ResultDecodeError, match=r"sparse \(4096 of its 67108864 bytes allocated\)"):
            map_sealed_memfds([fd], max_bytes=128 * MIB)
    finally:
        os.close(fd)


def test_a_hugetlb_memfd_is_refused():
    try:
        fd = sealed(size=2 * MIB, flags=os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"this kernel makes no hugetlb memfd: {exc}")
    try:
        with pytest.raises(ResultDecodeError, match=r"hugetlb memfd \(MFD_HUGETLB\)"):
            map_sealed_memfds([fd], max_bytes=4 * MIB)
    finally:
        os.close(fd)


def test_the_memfds_of_a_reply_are_bounded_together():
    fds = [sealed(b"x" * MIB), sealed(b"y" * MIB)]
    try:
        with pytest.raises(ResultDecodeError, match="more than the cap of 1572864"):
            map_sealed_memfds(fds, max_bytes=MIB + MIB // 2)
    finally:
        for fd in fds:
            os.close(fd)
