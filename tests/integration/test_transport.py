"""How results cross from a real worker: tensors in sealed memfds, mapped here without a copy.

Every call runs under the full default sandbox, and requires the layers this machine offers, so
memfds are shown to work where seccomp and Landlock are on. Hostile replies are forged by a
hubconf.py that writes to the result channel itself.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from pathlib import Path

import psutil
import pytest
import torch

import safehub
from tests.local_repos import imported_in_process, write_repo
from safehub._run import reaper, run_isolated
from safehub._sandbox import Sandbox
from safehub._worker import hubconf as in_process
from safehub._worker.sandbox import probe as layers
from safehub.errors import ProtocolError, ResultDecodeError, SafeHubError

MIB = 1024 * 1024
# The layers that make memfds interesting to test (seccomp could forbid memfd_create; Landlock
# and rlimits bound what the worker writes), required wherever the machine has them.
_WANTED = ("landlock", "seccomp", "rlimits")
REQUIRED = tuple(name for name, report in layers.probe(_WANTED).items() if report["available"])
# No memory_limit: with one and no memory cgroup the worker may create no memfds (results then
# travel inline; SECURITY.md, "One memory bound"), and these tests are about memfds.
SANDBOX = Sandbox(timeout=120, require=REQUIRED, memory_limit=None)

HUBCONF = '''
    dependencies = ["torch"]

    import torch
    from models.net import Net, Big


    def net():
        return Net()


    def big(mib=128, parts=8):
        return Big(mib, parts)
'''

MODELS_NET = '''
    import torch
    from torch import nn


    class Net(nn.Module):
        """Everything an object result must keep: sharing, layouts, dtypes, Parameters and buffers."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.encoder = nn.Linear(6, 4)
            self.decoder = nn.Linear(4, 6)
            self.tied = nn.Linear(6, 4, bias=False)
            self.tied.weight = self.encoder.weight  # tied weights: one Parameter, twice
            self.frozen = nn.Parameter(torch.randn(3, 2), requires_grad=False)
            self.register_buffer("steps", torch.tensor(0))
            self.register_buffer("mask", torch.tensor([True, False, True]))
            self.register_buffer("brain", torch.randn(5, dtype=torch.bfloat16))
            self.register_buffer("ints", torch.arange(-3, 3, dtype=torch.int32))
            self.register_buffer("nothing", torch.empty(0, 4))
            self.row = self.encoder.weight.data[1]  # a view on the encoder's storage
            self.columns = torch.arange(12.0).reshape(3, 4).t()  # not contiguous

        def forward(self, x):
            self.steps += 1
            return self.decoder(self.encoder(x)) * self.frozen.sum()


    class Big(nn.Module):
        def __init__(self, mib, parts):
            super().__init__()
            n = mib * 1024 * 1024 // 4 // parts
            self.chunks = nn.ParameterList([nn.Parameter(torch.full((n,), float(i))) for i in range(parts)])
'''

FORGER = '''
    """Replies forged behind the worker's back: object results with bad storage references."""
    import collections
    import fcntl
    import io
    import json
    import os
    import pickle
    import socket
    import struct
    import sys

    import torch

    F32 = struct.pack("<4f", 1, 2, 3, 4)
    SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


    def _channel():
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink("/proc/self/fd/" + name).startswith("socket:"):
                    return int(name)
            except OSError:
                pass
        raise RuntimeError("no channel")


    class _Ref:
        def __init__(self, pid):
            self.pid = pid


    class _TensorOn:
        def __init__(self, pid, size):
            self.args = (_Ref(pid), 0, (size,), (1,), False, collections.OrderedDict())

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args)


    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, _Ref) else None


    def _pickled(pid, size=4):
        out = io.BytesIO()
        _Pickler(out, protocol=5).dump([_TensorOn(pid, size)])
        return out.getvalue()


    def _layout(entries, data, pickled):
        header = {"__metadata__": {"format": "safehub-object"}, **entries}
        header["pickle"] = {"dtype": "U8", "shape": [len(pickled)], "data_offsets": [len(data), len(data) + len(pickled)]}
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        return struct.pack("<Q", len(body)) + body + data + pickled


    def _memfd(payload, seal=True):
        fd = os.memfd_create("forged", os.MFD_ALLOW_SEALING)
        os.write(fd, payload)
        if seal:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return fd


    def _reply(payloads, sizes=None, seal=True):
        fds = [_memfd(p, seal) for p in payloads]
        fields = {"action": "load", "returns": "object", "transport": "memfd",
                  "sizes": [len(p) for p in payloads] if sizes is None else sizes}
        # the worker's own encoder: a frame of this protocol version, whatever it claims
        frame = sys.modules["_safehub_worker.protocol"].encode_head("result", fields, [], len(fds))
        sock = socket.socket(fileno=_channel())
        sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        os._exit(0)


    ONE = {"0": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}


    def forged(case):
        good = _layout(ONE, F32, _pickled(("storage", "0", "F32")))
        if case == "valid":
            _reply([good])
        if case == "unknown_storage":
            _reply([_layout(ONE, F32, _pickled(("storage", "7", "F32")))])
        if case == "bad_dtype":
            _reply([_layout(ONE, F32, _pickled(("storage", "0", "object")))])
        if case == "view_out_of_range":
            _reply([_layout(ONE, F32, _pickled(("storage", "0", "F32"), size=1000))])
        if case == "overlapping":
            two = {**ONE, "1": {"dtype": "U8", "shape": [16], "data_offsets": [8, 24]}}
            _reply([_layout(two, F32 + F32[:8], _pickled(("storage", "1", "F32")))])
        if case == "absurd_size":
            huge = {"0": {"dtype": "U8", "shape": [2**60], "data_offsets": [0, 2**60]}}
            _reply([_layout(huge, F32, _pickled(("storage", "0", "F32")))])
        if case == "unsealed":
            _reply([good], seal=False)
        if case == "wrong_size":
            _reply([good], sizes=[len(good) + 8])
        if case == "fds_and_sizes_disagree":
            _reply([good, good], sizes=[len(good)])
        if case == "too_many_fds":
            _reply([good] * 9)
        if case == "same_storage_in_two_shards":
            _reply([good, good])
        raise ValueError(case)
'''


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    return {
        "models": write_repo(root / "models", {"hubconf.py": HUBCONF, "models/__init__.py": "", "models/net.py": MODELS_NET}),
        "forger": write_repo(root / "forger", {"hubconf.py": FORGER}),
    }


@pytest.fixture(params=["cold", "warm"])
def start(request, monkeypatch):
    monkeypatch.setenv("SAFEHUB_WARM", "1" if request.param == "warm" else "0")
    if request.param == "warm" and not safehub.warmup():
        pytest.skip("the warm zygote cannot start on this machine")
    return request.param


def mapped_regions() -> list[tuple[int, int]]:
    """The address ranges of this process's mappings of the worker's result memfds."""
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:safehub-result" in line:
                low, high = line.split()[0].split("-")
                regions.append((int(low, 16), int(high, 16)))
    return regions


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# -- objects and weights: what comes back is what the repository built ------------------------


def test_object_round_trip_matches_in_process(repos, start, tmp_path):
    model = run_isolated(repos["models"], "load", model="net", sandbox=SANDBOX)
    with imported_in_process(repos["models"]) as module:
        expected = in_process.get_entrypoint(module, "net")()
    assert type(model).__name__ == "Net" and "models.net" not in sys.modules

    got, want = model.state_dict(keep_vars=True), expected.state_dict(keep_vars=True)
    assert list(got) == list(want)
    for name in want:
        a, b = got[name], want[name]
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
        assert a.requires_grad == b.requires_grad and a.stride() == b.stride(), name
    assert model.tied.weight is model.encoder.weight
    assert model.row.untyped_storage().data_ptr() == model.encoder.weight.untyped_storage().data_ptr()
    assert model.columns.stride() == (1, 4) and torch.equal(model.columns, expected.columns)

    x = torch.randn(2, 6)
    assert torch.equal(model(x), expected(x))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.encoder.weight.detach().clone()
    model(x).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(model.encoder.weight, before)
    assert torch.equal(model.row, model.encoder.weight[1])  # the view followed the step
    assert int(model.steps) == 2

    torch.save(model.state_dict(), tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_weights_of_the_same_model(repos):
    weights = run_isolated(repos["models"], "load", model="net", returns="weights", sandbox=SANDBOX)
    with imported_in_process(repos["models"]) as module:
        expected = in_process.get_entrypoint(module, "net")()
        expected.load_state_dict(weights)
    assert list(weights) == list(expected.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in expected.state_dict().items())


# -- zero copy, shards and memory --------------------------------------------------------------


@pytest.mark.parametrize("returns", ["object", "weights"])
def test_tensors_are_views_on_the_mapped_memfds(repos, returns):
    result = run_isolated(repos["models"], "load", model="big", kwargs={"mib": 128}, returns=returns, sandbox=SANDBOX)
    tensors = list(result.parameters()) if returns == "object" else list(result.values())
    regions = mapped_regions()
    # No copy: every tensor's bytes lie in a private mapping of one of the worker's memfds.
    for tensor in tensors:
        start = tensor.data_ptr()
        assert any(low <= start and start + tensor.nbytes <= high for low, high in regions)
    if len(os.sched_getaffinity(0)) > 1:
        assert len(regions) > 1  # 128 MiB in eight tensors: written as shards, in parallel
    assert [float(t.detach()[0]) for t in tensors] == [float(i) for i in range(8)]


def test_parent_memory_grows_by_the_result_once(repos):
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    model = run_isolated(repos["models"], "load", model="big", kwargs={"mib": 256}, sandbox=SANDBOX)
    total = sum(float(p.detach().sum()) for p in model.parameters())  # every page read at least once
    grown = process.memory_info().rss - before
    assert total == sum(float(i) * 256 * MIB // 4 // 8 for i in range(8))
    assert 0.9 * 256 * MIB < grown < 1.3 * 256 * MIB


def test_results_outlive_the_call_and_go_with_their_tensors(repos):
    reaper.drain()  # earlier calls' ends run in the background: their descriptors and thread are not this call's
    fds, threads = open_fds(), psutil.Process().num_threads()
    model = run_isolated(repos["models"], "load", model="big", kwargs={"mib": 16, "parts": 2}, sandbox=SANDBOX)
    reaper.settle()  # the call returned with its answer; its processes end in the background
    # The worker is gone (a warm zygote may stay), and its memory with it; the result is still here.
    children = psutil.Process().children(recursive=True)
    assert all("--zygote" in " ".join(p.cmdline()) for p in children)
    assert mapped_regions()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1)  # the caller's to change: copy-on-write pages
    assert [float(p.detach()[0]) for p in model.parameters()] == [1.0, 2.0]
    again = run_isolated(repos["models"], "load", model="big", kwargs={"mib": 16, "parts": 2}, sandbox=SANDBOX)
    assert [float(p.detach()[0]) for p in again.parameters()] == [0.0, 1.0]  # nothing else saw the change
    del model, again, parameter
    gc.collect()
    reaper.drain()
    assert not mapped_regions() and open_fds() == fds
    assert psutil.Process().num_threads() == threads


@pytest.mark.skipif("rlimits" not in REQUIRED, reason="needs the rlimits layer")
@pytest.mark.parametrize("returns", ["object", "weights"])
def test_where_memfds_fail_the_result_comes_inline(repos, returns):
    regions = mapped_regions()
    # RLIMIT_FSIZE binds memfds too: the worker's writes fail, and it sends the bytes in the frame.
    sandbox = Sandbox(timeout=120, require=REQUIRED, max_file_size=MIB, memory_limit=None)
    result = run_isolated(repos["models"], "load", model="big", kwargs={"mib": 4, "parts": 2}, returns=returns, sandbox=sandbox)
    tensors = list(result.parameters()) if returns == "object" else list(result.values())
    assert [float(t.detach()[0]) for t in tensors] == [0.0, 1.0] and mapped_regions() == regions


# -- forged replies ----------------------------------------------------------------------------


def refusal(repo: Path, case: str) -> tuple[type, str] | None:
    """Run one forged reply; the error it raised (then dropped, so nothing it held lingers)."""
    try:
        run_isolated(repo, "load", model="forged", args=(case,), sandbox=SANDBOX)
    except SafeHubError as exc:
        return type(exc), str(exc)
    return None


def test_a_forged_valid_reply_decodes(repos):
    # The forger speaks the protocol: each refusal below is about the fault it plants, nothing else.
    [tensor] = run_isolated(repos["forger"], "load", model="forged", args=("valid",), sandbox=SANDBOX)
    assert tensor.tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("unknown_storage", ResultDecodeError, "storage '7', which the result does not hold"),
        ("bad_dtype", ResultDecodeError, "dtype 'object' is not one of"),
        ("view_out_of_range", ResultDecodeError, "could not unpickle"),
        ("overlapping", ResultDecodeError, "overlaps"),
        ("absurd_size", ResultDecodeError, "overlaps|cover|does not fit"),
        ("unsealed", ResultDecodeError, "not sealed"),
        ("wrong_size", ResultDecodeError, "not the .* announced"),
        ("fds_and_sizes_disagree", ProtocolError, "does not match"),
        ("too_many_fds", ProtocolError, "file descriptors"),
        ("same_storage_in_two_shards", ResultDecodeError, "two shards"),
    ],
)
def test_forged_replies_are_refused(repos, case, error, match):
    reaper.drain()  # earlier calls' ends run in the background: their descriptors are not this call's
    fds = open_fds()
    found = refusal(repos["forger"], case)
    assert found is not None, "the forged reply was accepted"
    assert issubclass(found[0], error), found
    assert re.search(match, found[1]), found
    gc.collect()
    reaper.drain()
    assert open_fds() == fds and not mapped_regions()
