"""Big tensors of remote calls through the session's pools (``safehub/_run/pools.py``), real workers.

Results equal in-process ones whichever way they came (the first large result in memfds or
inline, the next ones through the result pool); the pools are reused call after call; a model
that keeps or writes its inputs sees its own bytes, never the next call's; the caller's result
regions come back once its tensors are gone. The attacks are in ``tests/security/test_pool_attacks.py``.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import safehub
from safehub._sandbox import Sandbox
from tests.local_repos import write_repo

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("worker_start")]
MIB = 1024 * 1024

HUBCONF = '''
    import torch

    dependencies = ["torch"]


    class Model:
        def __init__(self):
            self.kept = None

        def __call__(self, x):
            return x * 2

        def outputs(self, x, blob):
            """Several tensors, dtypes and bytes at once, small ones inline and large ones pooled."""
            return {"double": x * 2, "half": x.half(), "mask": x > 0.5, "ids": torch.arange(x.numel()),
                    "blob": blob[::-1], "small": x[:4].clone(), "n": x.numel()}

        def keep(self, x):
            """Keep the input (a view on the pool) past the call."""
            self.kept = x
            return float(x.sum())

        def kept_sum(self):
            return float(self.kept.sum())

        def scale_in_place(self, x):
            x.mul_(3)  # the worker's own pages
            return x


    def model():
        return Model()
'''


@pytest.fixture
def repo(tmp_path) -> Path:
    return write_repo(tmp_path / "repo", {"hubconf.py": HUBCONF})


def load(repo: Path, sandbox: Sandbox | None = None):
    return safehub.load(str(repo), "model", source="local", isolate=sandbox or Sandbox(timeout=120), returns="remote")


def test_results_equal_in_process_the_first_time_and_through_the_pool(repo):
    x = torch.rand(1 << 20)  # 4 MiB
    blob = bytes(range(256)) * 4096  # 1 MiB
    expected = {"double": x * 2, "half": x.half(), "mask": x > 0.5, "ids": torch.arange(x.numel()),
                "blob": blob[::-1], "small": x[:4], "n": x.numel()}
    with load(repo) as remote:
        pools = remote._session.pools
        for call in range(3):
            out = remote.outputs(x, blob)
            assert list(out) == list(expected)
            for key, value in expected.items():
                assert (torch.equal(out[key], value) if isinstance(value, torch.Tensor) else out[key] == value), (call, key)
            # The first large result made the result pool; the later ones came through it.
            assert pools.results.size >= 4 * MIB + MIB
        assert pools.inputs.memfd is not None and pools.inputs.memfd.size >= 5 * MIB


def test_the_pools_and_regions_are_reused_call_after_call(repo):
    x = torch.rand(4 * MIB // 4)
    with load(repo) as remote:
        pools = remote._session.pools
        remote(x)  # makes the result pool
        inputs, results = pools.inputs.fd, pools.results.fd
        addresses = set()
        for _ in range(4):
            out = remote(x)
            assert torch.equal(out, x * 2)
            addresses.add(out.data_ptr())
            del out
            gc.collect()
        assert pools.inputs.fd == inputs and pools.results.fd == results
        assert len(addresses) == 1  # one pre-faulted region, back after each result went


def test_small_results_make_no_result_pool(repo):
    # Blobs of at most 64 KiB ride in the frame whatever the pool: a pool would only cost every
    # later call a descriptor passed, checked and closed (a tiny call then passes none).
    with load(repo) as remote:
        for _ in range(3):
            assert torch.equal(remote(torch.ones(1, 8)), torch.full((1, 8), 2.0))
        assert remote._session.pools.results.fd is None
        remote(torch.ones(MIB))  # 4 MiB: the canary, a result in memfds makes the pool
        assert remote._session.pools.results.fd is not None


def test_kept_results_stay_as_they_were(repo):
    with load(repo) as remote:
        remote(torch.zeros(MIB))
        kept = [remote(torch.full((MIB,), float(i))) for i in range(6)]
        assert [float(t[0]) for t in kept] == [2.0 * i for i in range(6)]
        assert len({t.data_ptr() for t in kept}) == 6
    # The handle is gone; its regions live on with the tensors.
    assert [float(t.sum()) for t in kept] == [2.0 * i * MIB for i in range(6)]


def test_an_input_the_model_keeps_is_not_changed_by_the_next_call(repo):
    with load(repo) as remote:
        first = torch.full((MIB,), 1.0)
        assert remote.keep(first) == float(MIB)
        remote(torch.full((MIB,), 7.0))  # written into the same input pool
        assert remote.kept_sum() == float(MIB)


def test_a_model_writing_its_input_changes_neither_the_caller_nor_the_pool(repo):
    with load(repo) as remote:
        x = torch.full((MIB,), 2.0)
        for _ in range(3):
            assert torch.equal(remote.scale_in_place(x), torch.full((MIB,), 6.0))
        assert torch.equal(x, torch.full((MIB,), 2.0))
