"""The value codec of remote models (``worker/values.py``): data round-trips, nothing else does.

Round trips through the tree and real segments (the inline buffer, sealed memfds mapped as the
parent maps them), the binary layout (golden bytes), the layout the encoder promises (aligned,
disjoint ranges, small blobs inline), refusals of what is not data (with where it is), and the
decoder against hostile trees, built by hand here (``node_*``, not with the encoder): every
malformed node, range and cap is a BadTree, and fuzz tests hold it to that, random trees and
random mutations of valid encodings alike, without allocating for what a tree only announces.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehub._memfds import map_sealed_memfd
from safehub._worker import values

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def round_trip(value, caps: values.Caps = values.Caps(), **pack_options):
    """Pack, take the tree as the frame's bytes, map the memfds as the parent does, unpack."""
    packed = values.pack(value, **pack_options)
    try:
        tree = bytes(packed.tree)
        segments = [bytes(b) for b in packed.buffers] + [map_sealed_memfd(fd) for fd in packed.fds]
        return values.unpack(tree, segments, caps)
    finally:
        packed.close()


def test_scalars_and_containers():
    value = [None, True, False, 0, -(2**80), 1.5, "ünï", b"\x00\x01", (), [], {}, {"a": (1, [2.0, {"b": None}])}]
    assert round_trip(value) == value


def test_floats_json_cannot_carry():
    got = round_trip([math.nan, math.inf, -math.inf])
    assert math.isnan(got[0]) and got[1:] == [math.inf, -math.inf]


# -- hostile trees, by hand --------------------------------------------------------------------


def node_int(value: int) -> bytes:
    return struct.pack("<Bq", values.N_INT, value)


def node_str(text: str | bytes, tag: int | None = values.N_STR) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return (b"" if tag is None else bytes([tag])) + struct.pack("<I", len(data)) + data


def node_list(*items: bytes, tag: int = values.N_LIST, count: int | None = None) -> bytes:
    return struct.pack("<BI", tag, len(items) if count is None else count) + b"".join(items)


def node_dict(*pairs: tuple[str | bytes, bytes], count: int | None = None) -> bytes:
    body = b"".join(node_str(key, None) + item for key, item in pairs)
    return struct.pack("<BI", values.N_DICT, len(pairs) if count is None else count) + body


def node_bytes(segment: int, offset: int, length: int) -> bytes:
    return struct.pack("<BIQQ", values.N_BYTES, segment, offset, length)


def node_tensor(segment: int, offset: int, dtype: str | int, shape: list[int], ndim: int | None = None) -> bytes:
    code = values.DTYPE_CODES.index(dtype) if isinstance(dtype, str) else dtype
    head = struct.pack("<BBBIQ", values.N_TENSOR, code, len(shape) if ndim is None else ndim, segment, offset)
    return head + b"".join(struct.pack("<Q", d) for d in shape)


NONE = bytes([values.N_NONE])


def test_golden_tree_bytes():
    packed = values.pack({"x": (1, None, True), "t": torch.tensor([1.5], dtype=torch.float32)})
    assert bytes(packed.tree) == (
        b"\x0b\x02\x00\x00\x00"  # a dict of 2
        b"\x01\x00\x00\x00x"  # key "x"
        b"\x0a\x03\x00\x00\x00"  # a tuple of 3
        b"\x03\x01\x00\x00\x00\x00\x00\x00\x00"  # 1
        b"\x00\x02"  # None, True
        b"\x01\x00\x00\x00t"  # key "t"
        b"\x08\x01\x01"  # a tensor: F32, one dimension
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # segment 0, offset 0
        b"\x01\x00\x00\x00\x00\x00\x00\x00"  # of 1
    )
    assert bytes(packed.buffers[0]) == struct.pack("<f", 1.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
def test_every_dtype_round_trips(dtype):
    sent = (torch.arange(24) % 3).to(dtype).view(2, 3, 4)
    got = round_trip(sent)
    assert got.dtype == dtype and got.shape == sent.shape and torch.equal(got, sent)


def test_odd_tensors():
    sent = {"scalar": torch.tensor(2.5), "empty": torch.empty(0, 3), "view": torch.arange(10.0)[2:8:2],
            "t": torch.arange(6).view(2, 3).t(), "grad": torch.ones(2, requires_grad=True)}
    got = round_trip(sent)
    for key, tensor in sent.items():
        assert got[key].shape == tensor.shape and torch.equal(got[key], tensor.detach()), key


Pair = collections.namedtuple("Pair", "a b")


@dataclasses.dataclass
class Output:
    logits: object
    extra: object = None


def test_other_containers_become_plain():
    got = round_trip([Pair(1, 2), torch.Size([2, 3]), collections.OrderedDict(z=1, a=2), Output(3)])
    assert got == [(1, 2), (2, 3), {"z": 1, "a": 2}, {"logits": 3, "extra": None}]
    assert [type(g) for g in got] == [tuple, tuple, dict, dict]


def test_small_blobs_ride_inline_and_large_ones_in_sealed_memfds():
    small, large = torch.ones(16), torch.ones(100_000)
    packed = values.pack([small, b"abc", large])
    try:
        (inline,) = packed.buffers
        assert len(packed.fds) == 1 and len(inline) < values.INLINE_TOTAL_BYTES
        tree = bytes(packed.tree)
        # The list's header (5 bytes), a tensor of one dimension (23), a bytes node (21), a tensor.
        _, _, _, seg0, off0 = struct.unpack_from("<BBBIQ", tree, 5)
        _, seg1, off1, _ = struct.unpack_from("<BIQQ", tree, 28)
        _, _, _, seg2, off2 = struct.unpack_from("<BBBIQ", tree, 49)
        assert [seg0, seg1, seg2] == [0, 0, 1]
        assert all(offset % values.ALIGN == 0 for offset in (off0, off1, off2))
        map_sealed_memfd(packed.fds[0])  # sealed: the parent's own check passes
    finally:
        packed.close()


def test_without_memfds_everything_rides_inline():
    packed = values.pack([torch.ones(100_000)], memfds=False)
    assert len(packed.buffers) == 1 and not packed.fds
    assert torch.equal(values.unpack(packed.tree, packed.buffers)[0], torch.ones(100_000))


def test_results_are_views_on_their_segment():
    packed = values.pack(torch.arange(4.0))
    segment = bytearray(packed.buffers[0])
    got = values.unpack(packed.tree, [segment])
    got[0] = 42.0
    assert torch.frombuffer(segment, dtype=torch.float32, count=1)[0] == 42.0


def test_calls_pack_args_and_kwargs():
    packed = values.pack_call((1, torch.ones(2)), {"k": "v"})
    args, kwargs = values.unpack_call(packed.tree, packed.buffers)
    assert args[0] == 1 and torch.equal(args[1], torch.ones(2)) and kwargs == {"k": "v"}
    with pytest.raises(values.BadTree, match="tuple \\(args, kwargs\\)"):
        values.unpack_call(values.pack([1, 2]).tree, [])


@pytest.mark.parametrize(
    "value, where",
    [
        ({1, 2}, "value: a set is not data"),
        ({"a": [1, object()]}, "value['a'][1]: an object is not data"),
        ({1: "x"}, "value: dict keys must be str, not int"),
        (torch.zeros(2, dtype=torch.complex64), "value: a tensor that is complex"),
        (torch.zeros(2, dtype=torch.uint16), "value: a tensor that has dtype uint16"),
        (torch.zeros(2, device="meta"), "value: a tensor that is on the meta device"),
        (torch.zeros(2).to_sparse(), "value: a tensor that is not a dense tensor"),
    ],
)
def test_what_is_not_data_is_refused_with_where(value, where):
    with pytest.raises(values.NotData) as info:
        values.pack(value)
    assert str(info.value).startswith(where)


def test_argument_paths_name_the_argument():
    with pytest.raises(values.NotData, match=r"^argument 1\[0\]: a set is not data"):
        values.pack_call((1, [{2}]), {})
    with pytest.raises(values.NotData, match=r"^argument 'mask': a set is not data"):
        values.pack_call((), {"mask": {2}})


def test_depth_is_bounded_both_ways():
    deep: list = []
    for _ in range(values.MAX_DEPTH):
        deep = [deep]
    with pytest.raises(values.NotData, match="nested deeper than 32"):
        values.pack(deep)
    tree = NONE
    for _ in range(values.MAX_DEPTH + 1):
        tree = node_list(tree)
    with pytest.raises(values.BadTree, match="nested deeper than 32"):
        values.unpack(tree, [])


F32 = bytearray(16)


@pytest.mark.parametrize(
    "tree, segments, match",
    [
        (b"", [], "ends inside a node"),
        (b"\x0c", [], "unknown node tag 12"),
        (b"\xff", [], "unknown node tag 255"),
        (NONE + NONE, [], "1 bytes after the tree's root"),
        (b"\x03\x01", [], "ends inside a node"),
        (node_list(NONE, count=2), [], "a container of 2 items in 1 bytes"),
        (node_list(count=2**32 - 1), [], "a container of 4294967295 items"),
        (node_dict(("a", NONE), count=2), [], "a container of 2 items"),
        (node_list(NONE, NONE, count=1), [], "1 bytes after the tree's root"),
        (node_dict(("a", node_int(1)), ("a", node_int(2))), [], "appears twice"),
        (node_dict(("k" * 5000, NONE)), [], "more than 4096"),
        (node_dict(("k" * 20000, NONE)), [], "a dict key of 20000 bytes"),
        (node_dict((b"\xff", NONE)), [], "not UTF-8"),
        (node_str(b"\xed\xa0\x80"), [], "not UTF-8"),  # a surrogate
        (node_str(b"ab")[:-1], [], "runs past the tree"),
        (struct.pack("<BH", values.N_BIGINT, 2000) + bytes(2000), [], "an int of 2000 bytes"),
        (struct.pack("<BH", values.N_BIGINT, 9) + bytes(3), [], "an int of 9 bytes"),
        (node_bytes(0, 0, 0)[:-1], [F32], "ends inside a node"),
        (node_bytes(0, 8, 16), [F32], "run past segment 0"),
        (node_bytes(1, 0, 1), [F32], "segment 1 of 1"),
        (node_bytes(0, 2**63, 1), [F32], "non-negative ints"),
        (node_tensor(0, 0, "F32", [2])[:-3], [F32], "ends inside a node"),
        (node_tensor(0, 0, len(values.DTYPE_CODES), [2]), [F32], "dtype code 10"),
        (node_tensor(0, 0, "F32", [2**63]), [F32], "non-negative ints"),
        (node_tensor(0, 0, "F32", [1] * 65), [F32], "at most 64"),
        (node_tensor(0, 0, "F32", [1], ndim=3), [F32], "ends inside a node"),
        (node_tensor(0, 0, "F32", [2**40, 2**40]), [F32], "larger than any buffer"),
        (node_tensor(0, 0, "F32", [0, 2**62, 2**62]), [F32], "cannot be built: Stride calculation overflowed"),
        (node_tensor(0, 4, "F32", [4]), [F32], "run past segment 0"),
        (node_tensor(0, 0, "BOOL", [4]), [bytearray([0, 1, 2, 0])], "0 or 1"),
        (node_list(node_tensor(0, 0, "F32", [4]), node_tensor(0, 8, "F32", [2])), [F32], "overlap"),
        (node_list(node_bytes(0, 0, 8), node_tensor(0, 4, "F32", [1])), [F32], "overlap"),
        ({"list": []}, [], "a tree is bytes, not a dict"),  # the JSON trees of version 3: refused
    ],
)
def test_hostile_trees_are_refused(tree, segments, match):
    with pytest.raises(values.BadTree, match=match):
        values.unpack(tree, segments)


def test_announced_counts_allocate_nothing():
    # 16 MiB of tree announcing 2**32 - 1 items per container, a thousand deep: refused before any list is made.
    tree = node_list(count=2**32 - 1) * 30 + bytes(16 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(values.BadTree, match="more than 10 nodes|container"):
            values.unpack(tree, [], values.Caps(max_nodes=10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(tree) + (1 << 20)  # the tree's own copy, and nothing for what it announced


def test_caps_hold():
    with pytest.raises(values.BadTree, match="more than 10 nodes"):
        values.unpack(node_list(*[node_int(i) for i in range(20)]), [], values.Caps(max_nodes=10))
    three = node_list(node_tensor(0, 0, "U8", [1]), node_tensor(0, 1, "U8", [1]), node_tensor(0, 2, "U8", [1]))
    with pytest.raises(values.BadTree, match="more than 2 tensors"):
        values.unpack(three, [F32], values.Caps(max_tensors=2))
    with pytest.raises(values.BadTree, match="more than 2 bytes"):
        values.unpack(three, [F32], values.Caps(max_total_bytes=2))
    with pytest.raises(values.BadTree, match="at most 2 non-negative"):
        values.unpack(node_tensor(0, 0, "U8", [1, 1, 1]), [F32], values.Caps(max_ndim=2))
    with pytest.raises(values.BadTree, match="a dict key of 4 characters, more than 3"):
        values.unpack(node_dict(("four", NONE)), [], values.Caps(max_key_chars=3))
    assert [t.item() for t in values.unpack(three, [F32])] == [0, 0, 0]


def test_an_unaligned_tensor_is_copied_aligned():
    segment = bytearray(b"\x00" + torch.arange(4, dtype=torch.float64).numpy().tobytes())
    got = values.unpack(node_tensor(0, 1, "F64", [4]), [segment])
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0] and got.data_ptr() % 8 == 0


@FUZZ
@given(st.binary(max_size=200), st.lists(st.binary(max_size=64), max_size=3))
def test_any_bytes_are_a_value_or_bad_tree(tree, segments):
    try:
        values.unpack(tree, [bytearray(s) for s in segments])
    except values.BadTree:
        pass


@FUZZ
@given(st.sampled_from(values.DTYPE_CODES), st.lists(st.just(0) | st.integers(1, 4) | st.integers(0, 2**63 - 1), max_size=8))
def test_any_tensor_node_is_a_tensor_or_bad_tree(dtype, shape):
    # torch's own refusals (a zero-size shape whose strides overflow) are BadTree too, never raw.
    try:
        tensor = values.unpack(node_tensor(0, 0, dtype, shape), [bytearray(256)])
    except values.BadTree:
        return
    assert list(tensor.shape) == shape


DATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=16)
    | st.builds(lambda n, d: torch.arange(n, dtype=d), st.integers(0, 40),
                st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.float16])),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=25,
)


def same(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(b, dict):
        return type(a) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in b)
    return type(a) is type(b) and a == b


@FUZZ
@given(DATA)
def test_any_data_round_trips(value):
    assert same(round_trip(value), value)


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "delete"]), st.integers(0, 10**6),
                               st.integers(0, 255)), min_size=1, max_size=4)


def mutate(tree: bytes, mutations) -> bytes:
    data = bytearray(tree)
    for kind, where, byte in mutations:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << (byte % 8)
        elif kind == "set" and at < len(data):
            data[at] = byte
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = bytes([byte])
        elif kind == "delete" and at < len(data):
            del data[at]
    return bytes(data)


@FUZZ
@given(DATA, MUTATIONS)
def test_any_mutation_of_a_valid_tree_is_a_value_or_bad_tree(value, mutations):
    # Random mutations of real encodings reach every field of every node (counts, lengths, tags,
    # segments, offsets, dims): each is decoded as data or refused as BadTree, nothing else escapes,
    # and nothing is allocated for more than the tree and its segments hold.
    packed = values.pack(value, memfds=False)
    segments = [bytearray(b) for b in packed.buffers]
    tree = mutate(bytes(packed.tree), mutations)
    tracemalloc.start()
    try:
        try:
            values.unpack(tree, segments)
        except values.BadTree:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(tree) + sum(len(s) for s in segments) + (64 << 10)
