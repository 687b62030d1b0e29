"""The result layout: the worker's encoders, the parent's strict decoders, and safetensors compatibility."""

from __future__ import annotations

import collections
import fcntl
import json
import os
import pickle
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehub._memfds import map_sealed_memfd
from safehub._results import decode_object, decode_weights
from safehub._worker import objects
from safehub._worker import weights as encoder
from safehub.errors import ResultDecodeError

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def pack(header: dict | bytes, data: bytes = b"") -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def sample_tensors() -> dict[str, torch.Tensor]:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "matrix": base,
        "transposed": base.t(),  # non-contiguous
        "row": base[1],  # a view sharing the matrix's storage
        "scalar": torch.tensor(2.5, dtype=torch.float64),  # 0-dim
        "empty": torch.empty(0, 3),
        "half": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "bhalf": torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "i64": torch.tensor([-(2**40), 7]),
        "i32": torch.tensor([-5], dtype=torch.int32),
        "i16": torch.tensor([300], dtype=torch.int16),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([255], dtype=torch.uint8),
    }


# -- golden bytes: the format in _results.py's docstring, pinned -------------------------------

GOLDEN = (
    b"\xc8\x00\x00\x00\x00\x00\x00\x00"
    b'{"__metadata__":{"format":"pt"},'
    b'"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},'
    b'"n":{"dtype":"I64","shape":[],"data_offsets":[0,8]},'
    b'"b":{"dtype":"BOOL","shape":[1],"data_offsets":[16,17]}}      '
    b"\x07\x00\x00\x00\x00\x00\x00\x00"  # n = 7 (I64 first: the largest item size leads)
    b"\x00\x00\x80?\x00\x00\x00@"  # x = [1.0, 2.0]
    b"\x01"  # b = [True]
)
GOLDEN_TENSORS = {"x": torch.tensor([1.0, 2.0]), "n": torch.tensor(7), "b": torch.tensor([True])}


def test_encoder_golden_bytes():
    assert encoder.encode_bytes(GOLDEN_TENSORS) == GOLDEN


def test_decoder_golden_bytes():
    decoded = decode_weights(GOLDEN)
    assert same(decoded, GOLDEN_TENSORS)
    assert list(decoded) == ["x", "n", "b"]  # the header's order, i.e. the state_dict's


# -- round trips and safetensors compatibility -------------------------------------------------


def test_round_trip_every_dtype_and_layout():
    tensors = sample_tensors()
    decoded = decode_weights(encoder.encode_bytes(tensors))
    assert same(decoded, {k: v.contiguous() for k, v in tensors.items()})
    # Views got their own bytes: writing one leaves the other alone.
    decoded["row"][0] = -1
    assert decoded["matrix"][1, 0] == 4


def test_safetensors_reads_our_encoding():
    tensors = sample_tensors()
    loaded = safetensors.torch.load(encoder.encode_bytes(tensors))
    assert same(dict(loaded), {k: v.contiguous() for k, v in tensors.items()})


def test_we_read_safetensors_encoding():
    tensors = {k: v.clone().contiguous() for k, v in sample_tensors().items()}
    assert same(decode_weights(safetensors.torch.save(tensors, metadata={"a": "b"})), tensors)


def test_module_state_dict_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decoded = decode_weights(encoder.encode_bytes(encoder.collect_tensors(model)))
    assert same(decoded, dict(model.state_dict()))
    model.load_state_dict(decoded)


def test_read_only_buffers_are_copied_and_writable():
    decoded = decode_weights(bytes(encoder.encode_bytes({"x": torch.ones(4)})))
    decoded["x"] += 1  # no warning about a non-writable buffer (warnings are errors here)
    assert torch.equal(decoded["x"], torch.full((4,), 2.0))


def test_unaligned_offsets_are_copied():
    data = struct.pack("<2f", 1.0, 2.0)
    blob = pack({"pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "x": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}, b"\x00" + data)
    decoded = decode_weights(blob)
    assert torch.equal(decoded["x"], torch.tensor([1.0, 2.0]))


# -- the sealed memfd --------------------------------------------------------------------------


def sealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    encoder.seal(fd)
    return fd


def test_sealed_memfd_maps_copy_on_write():
    [(fd, size)] = encoder.parts_to_memfds(encoder.weights_parts({"x": torch.arange(4.0)}), encoder.WEIGHTS_METADATA)
    try:
        assert size == os.fstat(fd).st_size
        mapped = map_sealed_memfd(fd)
        decoded = decode_weights(mapped)
        del mapped  # the tensors keep the mapping alive
        decoded["x"] += 10
        again = decode_weights(map_sealed_memfd(fd))
        assert torch.equal(again["x"], torch.arange(4.0))  # the parent's write stayed private
        assert torch.equal(decoded["x"], torch.arange(4.0) + 10)
    finally:
        os.close(fd)


def test_memfds_are_sealed_against_every_change():
    [(fd, size)] = encoder.parts_to_memfds(encoder.weights_parts({"x": torch.ones(4)}), encoder.WEIGHTS_METADATA)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        wanted = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        assert seals & wanted == wanted
        for change in (lambda: os.pwrite(fd, b"x", 0), lambda: os.ftruncate(fd, 1), lambda: os.ftruncate(fd, size + 1)):
            with pytest.raises(PermissionError):
                change()
    finally:
        os.close(fd)


def test_unsealed_memfd_is_refused():
    fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, encoder.encode_bytes({"x": torch.ones(1)}))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)  # writes still allowed
        with pytest.raises(ResultDecodeError, match="not sealed"):
            map_sealed_memfd(fd)
    finally:
        os.close(fd)


def test_a_pipe_is_not_a_memfd():
    r, w = os.pipe()
    try:
        with pytest.raises(ResultDecodeError, match="not a sealed memfd"):
            map_sealed_memfd(r)
    finally:
        os.close(r)
        os.close(w)


def test_empty_or_oversized_memfd_is_refused():
    fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    try:
        encoder.seal(fd)
        with pytest.raises(ResultDecodeError, match="size"):
            map_sealed_memfd(fd)
    finally:
        os.close(fd)
    fd = sealed_memfd(b"x" * 100)
    try:
        with pytest.raises(ResultDecodeError, match="size"):
            map_sealed_memfd(fd, max_bytes=99)
    finally:
        os.close(fd)


# -- the encoder's refusals (they become a clear error, suggesting returns="object") ----------


@pytest.mark.parametrize(
    "result, match",
    [
        (3, "holds no tensors|returned int"),
        ({}, "holds no tensors"),
        (torch.nn.ReLU(), "holds no tensors"),
        ({"x": 1.0}, "not a tensor"),
        ({"x": {"y": torch.ones(1)}}, "no nesting"),
        ({1: torch.ones(1)}, "names must be str"),
        ({"c": torch.ones(2, dtype=torch.complex64)}, "complex"),
        ({"u": torch.ones(2, dtype=torch.uint16)}, "dtype uint16"),
        ({"s": torch.ones(2).to_sparse()}, "not a dense tensor"),
        ({"m": torch.ones(2, device="meta")}, "meta device"),
    ],
)
def test_encoder_refusals(result, match):
    with pytest.raises(encoder.NotWeights, match=match) as info:
        encoder.plan(encoder.collect_tensors(result))
    assert 'returns="object"' in str(info.value) or "meta" in match


def test_bool_storage_bytes_are_canonicalised():
    odd = torch.tensor([2, 0], dtype=torch.uint8).view(torch.bool)
    assert decode_weights(encoder.encode_bytes({"b": odd}))["b"].view(torch.uint8).tolist() == [1, 0]


# -- the decoder's refusals --------------------------------------------------------------------

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"", "too short"),
        (b"\x01\x00\x00", "too short"),
        (struct.pack("<Q", 2**63), "more than the cap"),
        (struct.pack("<Q", 50) + b"{}", "runs past"),
        (pack(b"\xff\xfe{}"), "malformed"),
        (pack(b"{"), "malformed"),
        (pack(b"[]"), "not a JSON object"),
        (pack(b'{"x": 1, "x": 2}'), "malformed"),
        (pack(b'{"x": NaN}'), "malformed"),
        (pack({"__metadata__": {"a": 1}}), "__metadata__"),
        (pack({"__metadata__": []}), "__metadata__"),
        (pack({"x": []}), "exactly dtype"),
        (pack({"x": {**F32_2, "extra": 1}}, b"\0" * 8), "exactly dtype"),
        (pack({"x": {**F32_2, "dtype": "C64"}}, b"\0" * 8), "dtype 'C64'"),
        (pack({"x": {**F32_2, "dtype": "f32"}}, b"\0" * 8), "dtype 'f32'"),
        (pack({"x": {**F32_2, "dtype": ["F32"]}}, b"\0" * 8), "dtype"),
        (pack({"x": {**F32_2, "shape": [-2]}}, b"\0" * 8), "shape"),
        (pack({"x": {**F32_2, "shape": [2.0]}}, b"\0" * 8), "shape"),
        (pack({"x": {**F32_2, "shape": [True, 2]}}, b"\0" * 8), "shape"),
        (pack({"x": {**F32_2, "shape": "2"}}, b"\0" * 8), "shape"),
        (pack({"x": {**F32_2, "shape": [1] * 65}}, b"\0" * 8), "shape"),
        (pack({"x": {**F32_2, "shape": [3]}}, b"\0" * 8), "does not fit"),
        (pack({"x": {**F32_2, "data_offsets": [8, 0]}}, b"\0" * 8), "does not fit"),
        (pack({"x": {**F32_2, "data_offsets": [0]}}, b"\0" * 8), "data_offsets"),
        (pack({"x": {**F32_2, "data_offsets": [0, "8"]}}, b"\0" * 8), "data_offsets"),
        (pack({"x": {**F32_2, "data_offsets": [-8, 0]}}, b"\0" * 8), "data_offsets"),
        (pack({"x": F32_2}, b"\0" * 7), "cover 8 bytes of the 7"),
        (pack({"x": F32_2}, b"\0" * 9), "cover 8 bytes of the 9"),
        (pack({"x": {**F32_2, "data_offsets": [4, 12]}}, b"\0" * 12), "gap"),
        (pack({"x": F32_2, "y": F32_2}, b"\0" * 16), "overlaps"),
        (pack({"x": F32_2, "y": {**F32_2, "data_offsets": [4, 12]}}, b"\0" * 12), "overlaps"),
        (pack({"x" * 5000: F32_2}, b"\0" * 8), "name"),
        (pack({"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"), "0 or 1"),
        (pack({"e": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}), "could not be built"),
    ],
)
def test_decoder_refusals(blob, match):
    with pytest.raises(ResultDecodeError, match=match):
        decode_weights(blob)


def test_decoder_caps():
    blob = encoder.encode_bytes({"a": torch.ones(4), "b": torch.ones(4)})
    with pytest.raises(ResultDecodeError, match="tensors, more than"):
        decode_weights(blob, max_tensors=1)
    with pytest.raises(ResultDecodeError, match="more than the cap"):
        decode_weights(blob, max_total_bytes=31)
    with pytest.raises(ResultDecodeError, match="header of"):
        decode_weights(blob, max_header_bytes=16)


def test_a_pickle_is_never_unpickled_as_weights(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    import pickle

    with pytest.raises(ResultDecodeError):
        decode_weights(pickle.dumps(Evil()))
    assert not canary.exists()


# -- shards: one result in several memfds, written in parallel ---------------------------------


def test_split_keeps_order_and_balances_bytes():
    parts = encoder.weights_parts({f"t{i}": torch.ones(n) for i, n in enumerate([10, 10, 10, 10, 40])})
    shards = encoder.split(parts, 3)
    assert [p[0] for shard in shards for p in shard] == ["t0", "t1", "t2", "t3", "t4"]
    assert 2 <= len(shards) <= 3 and all(shards)
    assert encoder.split(parts, 1) == [parts]


def test_sharded_weights_decode_like_one_shard():
    tensors = sample_tensors()
    shards = encoder.split(encoder.weights_parts(tensors), 4)
    assert len(shards) > 1
    blobs = [bytes(encoder.parts_to_bytes(shard, encoder.WEIGHTS_METADATA)) for shard in shards]
    decoded = decode_weights(blobs)
    assert list(decoded) == list(tensors)  # the shards in order keep the result's order
    assert same(decoded, {k: v.contiguous() for k, v in tensors.items()})
    for blob in blobs:  # each shard is a safetensors file of its own
        safetensors.torch.load(blob)


def test_sharded_memfds_round_trip():
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(8)}
    written = encoder.parts_to_memfds(encoder.weights_parts(tensors), encoder.WEIGHTS_METADATA, count=4)
    try:
        assert len(written) == 4 and all(os.fstat(fd).st_size == size for fd, size in written)
        assert same(decode_weights([map_sealed_memfd(fd) for fd, _ in written]), tensors)
    finally:
        for fd, _ in written:
            os.close(fd)


def test_a_name_in_two_shards_is_refused():
    blob = encoder.encode_bytes({"x": torch.ones(2)})
    with pytest.raises(ResultDecodeError, match="two shards"):
        decode_weights([blob, blob])
    with pytest.raises(ResultDecodeError, match="no shards"):
        decode_weights([])


def test_caps_hold_across_shards():
    blobs = [encoder.encode_bytes({"a": torch.ones(4)}), encoder.encode_bytes({"b": torch.ones(4)})]
    with pytest.raises(ResultDecodeError, match="cap of 1 tensors"):
        decode_weights(blobs, max_tensors=1)
    with pytest.raises(ResultDecodeError, match="16 bytes"):
        decode_weights(blobs, max_total_bytes=16)


# -- objects: the structure pickled, the storages beside it ------------------------------------


class Net(torch.nn.Module):
    """Everything an object result must keep: sharing, layouts, dtypes, Parameters and buffers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(6, 4)
        self.decoder = torch.nn.Linear(4, 6)
        self.tied = torch.nn.Linear(6, 4, bias=False)
        self.tied.weight = self.encoder.weight  # tied weights: one Parameter, twice
        self.frozen = torch.nn.Parameter(torch.randn(3, 2), requires_grad=False)
        self.register_buffer("steps", torch.tensor(0))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("brain", torch.randn(5, dtype=torch.bfloat16))
        self.register_buffer("ints", torch.arange(-3, 3, dtype=torch.int32))
        self.register_buffer("nothing", torch.empty(0, 4))
        self.row = self.encoder.weight.data[1]  # a view sharing the encoder's storage
        self.columns = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
        self.offset = torch.arange(10.0)[3:7]  # a storage offset

    def forward(self, x):
        self.steps += 1
        return self.decoder(self.encoder(x))


def round_trip(value, count=None):
    parts = objects.dumps(value, encoder.DTYPE_NAMES)
    if count == "inline":  # where memfds fail, the worker sends one shard as bytes: copied once here
        return decode_object(bytes(encoder.parts_to_bytes(parts, objects.OBJECT_METADATA)))
    written = encoder.parts_to_memfds(parts, objects.OBJECT_METADATA, count)
    try:
        return decode_object([map_sealed_memfd(fd) for fd, _ in written])
    finally:
        for fd, _ in written:
            os.close(fd)


def shares_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("count", [1, 3, "inline"])
def test_object_round_trip_keeps_values_layouts_and_sharing(count):
    net = Net()
    got = round_trip(net, count)
    assert type(got) is Net
    for (name, a), (_, b) in zip(net.state_dict(keep_vars=True).items(), got.state_dict(keep_vars=True).items()):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
        assert a.requires_grad == b.requires_grad, name
    x = torch.randn(2, 6)
    assert torch.equal(got(x), net(x))
    assert got.tied.weight is got.encoder.weight
    assert shares_storage(got.row, got.encoder.weight) and got.row.storage_offset() == 6
    got.encoder.weight.data[1, 0] = 42.0
    assert got.row[0] == 42.0 and net.row[0] != 42.0
    assert got.columns.stride() == net.columns.stride() and torch.equal(got.columns, net.columns)
    assert got.offset.storage_offset() == 3 and torch.equal(got.offset, net.offset)


def test_storages_travel_once_however_often_they_are_shared():
    base = torch.zeros(1000)
    parts = objects.dumps({"a": base, "b": base[10:], "c": base.view(10, 100), "d": [base] * 3}, encoder.DTYPE_NAMES)
    assert [p[0] for p in parts] == ["0", "pickle"] and parts[0][2] == [4000]
    assert parts[1][2][0] < 2000  # the pickle holds structure only


def test_object_without_tensors_needs_no_torch_storage():
    assert round_trip({"a": [1, "two", 3.0]}) == {"a": [1, "two", 3.0]}


def test_object_golden_bytes():
    blob = bytes(encoder.parts_to_bytes(objects.dumps({"a": 1}, encoder.DTYPE_NAMES), objects.OBJECT_METADATA))
    pickled = pickle.dumps({"a": 1}, protocol=5)
    n = len(pickled)
    header = b'{"__metadata__":{"format":"safehub-object"},"pickle":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (n, n)
    header += b" " * (-len(header) % 8)
    assert blob == struct.pack("<Q", len(header)) + header + pickled
    assert decode_object(blob) == {"a": 1}


def test_other_dtypes_and_devices_fall_back_to_pickle():
    value = {
        "complex": torch.tensor([1 + 2j]),
        "u16": torch.tensor([7], dtype=torch.uint16),  # pickled with an untyped storage: U8
        "meta": torch.empty(3, device="meta"),
        "sparse": torch.eye(3).to_sparse(),
        "odd_bool": torch.tensor([2, 0], dtype=torch.uint8).view(torch.bool),
    }
    got = round_trip(value)
    for name in ("complex", "u16", "sparse"):
        assert got[name].dtype == value[name].dtype and torch.equal(got[name].to_dense(), value[name].to_dense()), name
    assert got["meta"].device.type == "meta" and got["meta"].shape == (3,)
    assert got["odd_bool"].view(torch.uint8).tolist() == [2, 0]


def test_returned_tensors_are_private_writable_and_outlive_the_fd():
    net = Net()
    written = encoder.parts_to_memfds(objects.dumps(net, encoder.DTYPE_NAMES), objects.OBJECT_METADATA)
    [(fd, _)] = written
    got = decode_object([map_sealed_memfd(fd)])
    os.close(fd)
    with torch.no_grad():
        for p in got.parameters():
            p.add_(1.0)  # copy-on-write: no warning, no fault
    assert torch.equal(got.decoder.bias, net.decoder.bias + 1)
    optimizer = torch.optim.SGD(got.parameters(), lr=0.1)
    got(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    assert got.encoder.weight.grad is not None


def test_torch_save_of_a_decoded_state_dict(tmp_path):
    got = round_trip(Net())
    torch.save(got.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert same(dict(loaded), {k: v.detach() for k, v in got.state_dict().items()})


# TorchScript: torch.jit's own archive as a part of its own, loaded back with torch.jit.load.


@torch.jit.script
def swish(x):
    return x.mul(torch.sigmoid(x))


class SwishNet(torch.nn.Module):
    """An eager module whose forward calls a module-level scripted function (gen-efficientnet's pattern)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.linear = torch.nn.Linear(4, 4)
        self.block = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))

    def forward(self, x):
        return self.block(swish(self.linear(x)))


@pytest.mark.parametrize("count", [1, "inline"])
def test_torchscript_round_trip_gives_the_same_outputs(count):
    net = SwishNet()
    traced = torch.jit.trace(torch.nn.Linear(4, 2), torch.ones(1, 4))
    value = {"net": net, "fn": swish, "again": swish, "traced": traced}
    parts = objects.dumps(value, encoder.DTYPE_NAMES)
    # linear's two storages, then the archives of swish and of the scripted block, then traced's.
    assert [p[0] for p in parts] == ["0", "1", "2", "3", "4", "pickle"]
    got = round_trip(value, count)
    x = torch.randn(3, 4)
    assert torch.equal(got["net"](x), net(x)) and torch.equal(got["traced"](x), traced(x))
    assert torch.equal(got["fn"](x), swish(x))
    assert got["again"] is got["fn"]  # one archive, one loaded script, however often referenced
    assert isinstance(got["net"].block, torch.jit.ScriptModule) and got["net"].block is not net.block
    # The scripted block's weights came through jit's archive, as copies the caller owns.
    assert all(torch.equal(a, b) for a, b in zip(got["net"].block.parameters(), net.block.parameters()))
    got["net"](x).sum().backward()
    assert all(p.grad is not None for p in got["net"].block.parameters())


@pytest.mark.parametrize(
    "archive, pid, match",
    [
        (b"not a zip archive", ("torchscript", "0"), "TorchScript archive '0' could not be loaded"),
        (b"PK\x03\x04" + b"\0" * 60, ("torchscript", "0"), "TorchScript archive '0' could not be loaded"),
        (None, ("torchscript", "0"), "TorchScript archive '0' could not be loaded"),  # a truncated real one
        (b"", ("torchscript", "7"), "TorchScript archive '7', which the result does not hold"),
        (b"", ("torchscript", 0), "TorchScript archive 0, which"),
        (b"", ("torchscript", "0", "F32"), "unknown reference"),
    ],
)
def test_malformed_torchscript_archives_are_refused(archive, pid, match):
    if archive is None:
        archive = swish.save_to_buffer()[:-100]
    with pytest.raises(ResultDecodeError, match=match):
        decode_object(forge([Ref(pid)], {"0": archive}))


# Forged object results: what a hostile worker could send, each refused with a decode error.


class Ref:
    def __init__(self, pid):
        self.pid = pid


class TensorOn:
    """Pickles as a tensor rebuilt on a storage reference, the way torch pickles one."""

    def __init__(self, pid, offset=0, size=(1,), stride=(1,)):
        self.args = (Ref(pid), offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class RefPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Ref) else None


def forge(value, storages: dict[str, bytes], metadata=objects.OBJECT_METADATA, pickle_name="pickle") -> bytes:
    stream = __import__("io").BytesIO()
    RefPickler(stream, protocol=5).dump(value)
    parts = [(name, "U8", [len(data)], 8, data) for name, data in storages.items()]
    return bytes(encoder.parts_to_bytes(parts + [(pickle_name, "U8", [len(stream.getvalue())], 1, stream.getvalue())], metadata))


F32_4 = struct.pack("<4f", 1, 2, 3, 4)


def test_a_forged_reference_is_resolved_like_a_real_one():
    got = decode_object(forge([TensorOn(("storage", "0", "F32"), 1, (2,), (1,))], {"0": F32_4}))
    assert got[0].tolist() == [2.0, 3.0]


@pytest.mark.parametrize(
    "value, storages, match",
    [
        (TensorOn(("storage", "9", "F32")), {"0": F32_4}, "refers to storage '9'"),
        (TensorOn(("storage", 0, "F32")), {"0": F32_4}, "refers to storage 0"),
        (TensorOn(("storage", "pickle", "U8")), {"0": F32_4}, "refers to storage 'pickle'"),
        (TensorOn(("storage", "0", "C64")), {"0": F32_4}, "dtype 'C64'"),
        (TensorOn(("storage", "0", None)), {"0": F32_4}, "dtype a NoneType"),
        (TensorOn(("module", "0", "F32")), {"0": F32_4}, "unknown reference"),
        (TensorOn(["storage", "0", "F32"]), {"0": F32_4}, "unknown reference \\(a list\\)"),
        (TensorOn(("storage", "0", "F32", 4)), {"0": F32_4}, "unknown reference"),
        (TensorOn(("storage", "0", "F64")), {"0": F32_4[:12]}, "not sized and aligned"),
        (TensorOn(("storage", "0", "BOOL")), {"0": b"\x01\x02"}, "0 or 1"),
        (TensorOn(("storage", "0", "F32"), 0, (1000,), (1,)), {"0": F32_4}, "could not unpickle"),
        (TensorOn(("storage", "0", "F32"), 3, (2,), (1,)), {"0": F32_4}, "could not unpickle"),
        (TensorOn(("storage", "0", "F32"), 0, (2, 2), (2**40, 1)), {"0": F32_4}, "could not unpickle"),
    ],
)
def test_forged_storage_references_are_refused(value, storages, match):
    with pytest.raises(ResultDecodeError, match=match):
        decode_object(forge(value, storages))


def test_misaligned_storages_are_refused():
    stream = __import__("io").BytesIO()
    RefPickler(stream, protocol=5).dump(TensorOn(("storage", "b", "F32")))
    pickled = stream.getvalue()
    header = {
        "__metadata__": objects.OBJECT_METADATA,
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "U8", "shape": [16], "data_offsets": [1, 17]},  # at an odd address
        "pickle": {"dtype": "U8", "shape": [len(pickled)], "data_offsets": [17, 17 + len(pickled)]},
    }
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with pytest.raises(ResultDecodeError, match="aligned"):
        decode_object(struct.pack("<Q", len(body)) + body + b"\0" * 17 + pickled)


OBJ = {"__metadata__": objects.OBJECT_METADATA}


def u8(offsets, shape=None):
    return {"dtype": "U8", "shape": shape or [offsets[1] - offsets[0]], "data_offsets": offsets}


@pytest.mark.parametrize(
    "blob, match",
    [
        (forge(1, {}, metadata={"format": "pt"}), "not marked"),
        (forge(1, {}, pickle_name="not-the-pickle"), "no 'pickle' entry"),
        (encoder.encode_bytes({"x": torch.ones(2)}, objects.OBJECT_METADATA), "must be U8"),
        (pack({**OBJ, "pickle": u8([0, 2], shape=[2, 1])}, b"\x80\x05"), "one dimension"),
        (pack({**OBJ, "pickle": u8([0, 2])}, b"no"), "could not unpickle"),
        (pack({**OBJ, "0": u8([0, 8]), "pickle": u8([0, 8])}, b"\0" * 8), "overlaps"),
        (pack({**OBJ, "0": u8([0, 2**62])}, b"\0" * 8), "cover"),
        (pickle.dumps({"a": 1}), "runs past|more than|malformed"),
    ],
)
def test_malformed_object_results_are_refused(blob, match):
    with pytest.raises(ResultDecodeError, match=match):
        decode_object(blob)


def test_an_object_result_read_as_weights_is_only_bytes(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    decoded = decode_weights(forge(Evil(), {"0": F32_4}))
    assert set(decoded) == {"0", "pickle"} and decoded["pickle"].dtype == torch.uint8
    assert not canary.exists()


# -- fuzz: never anything but ResultDecodeError, never a hang ----------------------------------


def _decode_or_refuse(blob: bytes) -> None:
    try:
        result = decode_weights(blob)
    except ResultDecodeError:
        return
    assert isinstance(result, dict) and all(isinstance(t, torch.Tensor) for t in result.values())


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(blob):
    _decode_or_refuse(blob)


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_headers(body):
    _decode_or_refuse(struct.pack("<Q", len(body)) + body + b"\0" * 16)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    name=st.sampled_from(["matrix", "scalar", "empty", "flags", "i8", "__metadata__"]),
    key=st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]),
    value=json_values | st.sampled_from(["F32", "BOOL", "BF16", "C64"]) | st.lists(st.integers(-4, 80), max_size=3),
    cut=st.integers(0, 64),
)
def test_fuzz_mutated_valid_headers(name, key, value, cut):
    valid = encoder.encode_bytes(sample_tensors())
    header_len = struct.unpack("<Q", valid[:8])[0]
    header = json.loads(valid[8 : 8 + header_len])
    data = valid[8 + header_len :]
    if key is None:
        header[name] = value
    elif isinstance(header.get(name), dict):
        header[name][key] = value
    blob = pack(header, data)
    _decode_or_refuse(blob)
    _decode_or_refuse(blob[: len(blob) - cut])


@FUZZ
@given(
    name=st.sampled_from(["0", "1", "pickle", "__metadata__"]),
    key=st.sampled_from(["dtype", "shape", "data_offsets", "format", None]),
    value=json_values | st.sampled_from(["U8", "F32", "safehub-object", "pt"]) | st.lists(st.integers(-4, 400), max_size=3),
    cut=st.integers(0, 64),
)
def test_fuzz_mutated_object_headers(name, key, value, cut):
    valid = forge([TensorOn(("storage", "0", "F32")), TensorOn(("storage", "1", "I64"))], {"0": F32_4, "1": F32_4})
    header_len = struct.unpack("<Q", valid[:8])[0]
    header = json.loads(valid[8 : 8 + header_len])
    if key is None:
        header[name] = value
    elif isinstance(header.get(name), dict):
        header[name][key] = value
    blob = pack(header, valid[8 + header_len :])
    for candidate in (blob, blob[: len(blob) - cut]):
        try:
            decode_object(candidate)
        except ResultDecodeError:
            pass
