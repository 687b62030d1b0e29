"""The weights format: the worker's encoder, the parent's strict decoder, and safetensors compatibility."""

from __future__ import annotations

import fcntl
import json
import os
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehub._results import decode_object, decode_weights, map_sealed_memfd
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


def test_sealed_memfd_maps_copy_on_write():
    fd, size = encoder.encode_to_memfd({"x": torch.arange(4.0)})
    try:
        mapped = map_sealed_memfd(fd)
        decoded = decode_weights(mapped)
        del mapped  # the tensors keep the mapping alive
        decoded["x"] += 10
        again = decode_weights(map_sealed_memfd(fd))
        assert torch.equal(again["x"], torch.arange(4.0))  # the parent's write stayed private
        assert torch.equal(decoded["x"], torch.arange(4.0) + 10)
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
    fd = encoder.bytes_to_memfd(b"x" * 100)
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


def test_decode_object_wraps_failures():
    with pytest.raises(ResultDecodeError, match="unpickle"):
        decode_object(b"not a pickle")
    assert decode_object(__import__("cloudpickle").dumps({"a": [1]})) == {"a": [1]}


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
