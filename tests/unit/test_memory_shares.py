"""How memory_limit is split where no memory cgroup can be had (``WorkerSettings.memory_shares``).

The parts must add up to no more than the limit: the scratch tmpfs, bubblewrap's /tmp and
/dev/shm, each descriptor's kernel buffers and the one address space. With a cgroup the kernel
counts everything, and each process keeps the whole limit.
"""

from __future__ import annotations

import pytest

from safehub._sandbox import Sandbox
from safehub._worker.protocol import BUBBLEWRAP_TMPFS_BYTES, DESCRIPTOR_BUFFER_BYTES, MemoryShares

GIB, MIB = 1024**3, 1024**2


def settings(**kw):
    return Sandbox(**kw).worker_settings("/repo", "/scratch")


def test_a_cgroup_leaves_each_process_the_whole_limit():
    s = settings(memory_limit=2 * GIB, max_scratch_size=1 * GIB).replace(memory_cgroup="/sys/fs/cgroup/memory/x")
    assert s.memory_shares() == MemoryShares(2 * GIB, 1 * GIB, one_address_space=False)


@pytest.mark.parametrize("bwrap", [False, True])
@pytest.mark.parametrize("limit,scratch,files", [(8 * GIB, 4 * GIB, 256), (1 * GIB, 16 * MIB, 64), (1 * GIB, None, 1024)])
def test_without_a_cgroup_the_parts_add_up_to_the_limit(limit, scratch, files, bwrap):
    shares = settings(memory_limit=limit, max_scratch_size=scratch, max_open_files=files).memory_shares(in_bubblewrap=bwrap)
    assert shares.one_address_space
    if scratch is None:
        assert shares.scratch is None  # the disk, not memory
    else:
        assert shares.scratch == min(scratch, limit // 4)
    tmpfs = (shares.scratch or 0) + (2 * min(BUBBLEWRAP_TMPFS_BYTES, shares.scratch or BUBBLEWRAP_TMPFS_BYTES) if bwrap else 0)
    assert shares.address_space is not None
    assert shares.address_space + tmpfs + files * DESCRIPTOR_BUFFER_BYTES == limit


def test_no_limit_bounds_nothing():
    shares = settings(memory_limit=None).memory_shares()
    assert shares.address_space is None and not shares.one_address_space
