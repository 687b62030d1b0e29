"""The pools of a remote model (``safehub/_run/pools.py``, ``worker/pools.py``), without a worker:
the seals the worker meets, the bounds of a claim, regions reused only once their tensors are gone."""

from __future__ import annotations

import gc
import mmap
import os

import pytest
import torch

from safehub._run import pools
from safehub._worker import pools as worker_pools
from safehub._worker import values
from safehub.errors import ResultDecodeError

MIB = 1024 * 1024


def test_the_input_pool_is_writable_by_the_parent_alone():
    pool = pools.InputPool()
    view = pool.reserve(3 * MIB)
    assert len(view) == 4 * MIB  # whole huge pages
    view[:4] = b"safe"
    fd = pool.fd
    # What a worker holding the fd (or reopening it through /proc) meets: every write refused.
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"evil", 0)
    with pytest.raises(PermissionError):
        mmap.mmap(fd, len(view), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        with pytest.raises(PermissionError):
            os.pwrite(reopened, b"evil", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(reopened, 0)
    finally:
        os.close(reopened)
    # A private mapping may be written: its pages become the writer's own.
    private = mmap.mmap(fd, len(view), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    private[:4] = b"evil"
    assert bytes(view[:4]) == b"safe"
    private.close()
    view[:4] = b"next"  # the parent's mapping, made before the seals, still writes
    assert os.pread(fd, 4, 0) == b"next"
    pool.close()


def test_the_input_pool_grows_to_the_largest_arguments():
    pool = pools.InputPool()
    assert len(pool.reserve(1)) == 2 * MIB
    first = pool.fd
    assert len(pool.reserve(2 * MIB)) == 2 * MIB and pool.fd == first
    assert len(pool.reserve(2 * MIB + 1)) == 4 * MIB
    pool.close()


def _result_pool(cap: int = 64 * MIB, size: int = 4 * MIB) -> pools.ResultPool:
    pool = pools.ResultPool(cap)
    pool.fit(size)
    return pool


def _worker_writes(pool: pools.ResultPool, data: bytes, populate: bool = True) -> None:
    """What the worker does: map the pool shared (faulting every page in) and write into it."""
    mapping = mmap.mmap(pool.fd, pool.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if populate:
        mapping.madvise(worker_pools.MADV_POPULATE_WRITE)
    mapping[: len(data)] = data
    mapping.close()


def test_the_result_pool_cannot_be_resized_by_the_worker():
    pool = _result_pool()
    for size in (0, 8 * MIB):
        with pytest.raises(PermissionError):
            os.ftruncate(pool.fd, size)
    pool.close()


def test_the_result_pool_is_made_only_for_a_result_that_came_another_way_and_capped():
    pool = pools.ResultPool(cap=8 * MIB)
    pool.fit(0)
    assert pool.fd is None
    pool.fit(9 * MIB)  # more than the worker could hold: no pool
    assert pool.fd is None
    pool.fit(3 * MIB)
    assert pool.size == 4 * MIB
    pool.fit(2 * MIB)  # already fits
    assert pool.size == 4 * MIB
    pool.fit(7 * MIB)
    assert pool.size == 8 * MIB  # never past the cap
    # No page is the parent's: the worker faults them in as it writes.
    assert os.fstat(pool.fd).st_blocks == 0
    pool.close()


@pytest.mark.parametrize("claim", [0, -1, 4 * MIB + 1, True, 1.5, "64"])
def test_a_claim_outside_the_pool_is_refused(claim):
    pool = _result_pool()
    _worker_writes(pool, b"x" * 4 * MIB)
    with pytest.raises(ResultDecodeError, match="claims .* bytes of a result pool of 4194304"):
        pool.copy_out(claim)
    pool.close()


def test_a_claim_without_a_pool_is_refused():
    with pytest.raises(ResultDecodeError, match="a result pool it was not given"):
        pools.ResultPool(cap=64 * MIB).copy_out(64)


def test_a_sparse_claim_is_refused():
    pool = _result_pool()
    _worker_writes(pool, b"x" * MIB, populate=False)  # the rest of the pool is holes
    assert len(pool.copy_out(MIB)) == MIB
    with pytest.raises(ResultDecodeError, match=r"result pool is sparse \(a hole at byte 1048576 of the 1048577 claimed\)"):
        pool.copy_out(MIB + 1)
    pool.close()


def test_a_copied_result_does_not_change_with_the_pool():
    pool = _result_pool()
    _worker_writes(pool, b"\x01" * MIB)
    region = pool.copy_out(MIB)
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    _worker_writes(pool, b"\xff" * MIB)  # the worker writes on after the reply
    assert int(tensor.max()) == 1 and int(tensor.min()) == 1
    pool.close()


def test_a_region_is_reused_only_once_its_tensors_are_gone():
    pool = _result_pool()
    _worker_writes(pool, b"\x01" * MIB)
    kept = torch.frombuffer(pool.copy_out(MIB), dtype=torch.uint8)[10:]  # a view keeps the region
    other = torch.frombuffer(pool.copy_out(MIB), dtype=torch.uint8)
    assert other.data_ptr() != kept.data_ptr() - 10
    address = other.data_ptr()
    del other
    gc.collect()
    again = torch.frombuffer(pool.copy_out(MIB), dtype=torch.uint8)
    assert again.data_ptr() == address  # reused, pre-faulted
    assert int(kept.min()) == 1 and int(again.min()) == 1
    pool.close()
    assert int(kept.sum()) == MIB - 10  # a closed pool's regions live as long as their tensors


def test_at_most_a_few_regions_wait_for_reuse():
    pool = _result_pool()
    _worker_writes(pool, b"\x01" * MIB)
    held = [pool.copy_out(MIB) for _ in range(pools.FREE_REGIONS + 3)]
    del held
    gc.collect()
    assert len(pool.free) == pools.FREE_REGIONS
    pool.close()
    assert pool.free == []


def test_an_input_the_model_keeps_is_made_its_own_before_the_reply():
    parent = pools.InputPool()
    view = parent.reserve(MIB)
    view[:MIB] = b"\x01" * MIB
    inputs = worker_pools.Inputs()
    kept = torch.frombuffer(inputs.map(os.dup(parent.fd)), dtype=torch.uint8)
    dropped = worker_pools.Inputs()
    torch.frombuffer(dropped.map(os.dup(parent.fd)), dtype=torch.uint8)  # not kept
    inputs.settle()
    dropped.settle()
    inputs.release()
    dropped.release()
    assert dropped.maps == [] and inputs.maps == []
    view[:MIB] = b"\x02" * MIB  # the next call's arguments
    assert int(kept.max()) == 1  # the kept input is the model's own
    parent.close()


def test_values_take_the_pool_only_when_everything_fits():
    big = torch.arange(100_000, dtype=torch.float32)
    small = torch.ones(4)
    given: list[bytearray] = []

    def pool(nbytes: int) -> memoryview | None:
        if nbytes >= 500_000:
            return None
        given.append(bytearray(nbytes))
        return memoryview(given[-1])

    packed = values.pack({"big": big, "small": small}, pool=pool)
    assert packed.pooled == 400_000 and packed.fds == [] and len(given) == 1
    # The pool is the segment after the frame's buffer and memfds.
    out = values.unpack(packed.tree, [*packed.buffers, given[0]])
    assert torch.equal(out["big"], big) and torch.equal(out["small"], small)
    with pytest.raises(values.BadTree, match="segment 1 of 1"):
        values.unpack(packed.tree, [*packed.buffers])
    packed = values.pack({"big": torch.cat([big, big])}, pool=pool)  # no room: memfds, as before
    assert packed.pooled == 0 and len(packed.fds) >= 1
    packed.close()
