"""The value codec of remote models (``worker/values.py``): data round-trips, nothing else does.

Round trips through the tree and real segments (the inline buffer, sealed memfds mapped as the
parent maps them), the layout the encoder promises (aligned, disjoint ranges, small blobs
inline), refusals of what is not data (with where it is), and the decoder against hostile trees:
every malformed node, range and cap is a BadTree, and a fuzz test holds it to that.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehub._memfds import map_sealed_memfd
from safehub._worker import values
from safehub._worker.layout import DTYPES
from safehub._worker.protocol import strict_json_loads

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def round_trip(value, caps: values.Caps = values.Caps(), **pack_options):
    """Pack, send the tree through JSON as the frame does, map the memfds as the parent does, unpack."""
    packed = values.pack(value, **pack_options)
    try:
        tree = strict_json_loads(json.dumps(packed.tree, allow_nan=False))
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
        nodes = packed.tree["list"]
        assert [n["tensor"][0] for n in (nodes[0], nodes[2])] == [0, 1] and nodes[1]["bytes"][0] == 0
        offsets = [nodes[0]["tensor"][1], nodes[1]["bytes"][1], nodes[2]["tensor"][1]]
        assert all(offset % values.ALIGN == 0 for offset in offsets)
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
    tree = None
    for _ in range(values.MAX_DEPTH + 1):
        tree = {"list": [tree]}
    with pytest.raises(values.BadTree, match="nested deeper than 32"):
        values.unpack(tree, [])


F32 = bytearray(16)


@pytest.mark.parametrize(
    "tree, segments, match",
    [
        ([1, 2], [], "a node must be a scalar or an object of one key"),
        ({"list": [], "tuple": []}, [], "object of one key"),
        ({"set": [1]}, [], "unknown node 'set'"),
        ({"list": "abc"}, [], "holds a str, not a list"),
        ({"dict": [["a", 1], ["a", 2]]}, [], "appears twice"),
        ({"dict": [[1, 2]]}, [], "str key, node"),
        ({"dict": [["k" * 5000, 1]]}, [], "more than 4096"),
        ({"float": "NaN"}, [], "a float node must be one of"),
        (math.nan, [], "not finite"),
        ({"bytes": [0, 0]}, [F32], "\\[segment, offset, length\\]"),
        ({"bytes": [0, 8, 16]}, [F32], "run past segment 0"),
        ({"bytes": [1, 0, 1]}, [F32], "segment 1 of 1"),
        ({"bytes": [True, 0, 1]}, [F32], "segment True of 1"),
        ({"bytes": [0, -1, 1]}, [F32], "non-negative ints"),
        ({"tensor": [0, 0, "F32"]}, [F32], "\\[segment, offset, dtype, shape\\]"),
        ({"tensor": [0, 0, "C64", [2]]}, [F32], "dtype 'C64'"),
        ({"tensor": [0, 0, "F32", [-1]]}, [F32], "non-negative ints"),
        ({"tensor": [0, 0, "F32", [1] * 65]}, [F32], "at most 64"),
        ({"tensor": [0, 0, "F32", [2**40, 2**40]]}, [F32], "larger than any buffer"),
        ({"tensor": [0, 0, "F32", [0, 2**62, 2**62]]}, [F32], "cannot be built: Stride calculation overflowed"),
        ({"tensor": [0, 4, "F32", [4]]}, [F32], "run past segment 0"),
        ({"tensor": [0, 0, "BOOL", [4]]}, [bytearray([0, 1, 2, 0])], "0 or 1"),
        ({"list": [{"tensor": [0, 0, "F32", [4]]}, {"tensor": [0, 8, "F32", [2]]}]}, [F32], "overlap"),
        ({"list": [{"bytes": [0, 0, 8]}, {"tensor": [0, 4, "F32", [1]]}]}, [F32], "overlap"),
    ],
)
def test_hostile_trees_are_refused(tree, segments, match):
    with pytest.raises(values.BadTree, match=match):
        values.unpack(tree, segments)


def test_caps_hold():
    with pytest.raises(values.BadTree, match="more than 10 nodes"):
        values.unpack({"list": list(range(20))}, [], values.Caps(max_nodes=10))
    three = {"list": [{"tensor": [0, 0, "U8", [1]]}, {"tensor": [0, 1, "U8", [1]]}, {"tensor": [0, 2, "U8", [1]]}]}
    with pytest.raises(values.BadTree, match="more than 2 tensors"):
        values.unpack(three, [F32], values.Caps(max_tensors=2))
    with pytest.raises(values.BadTree, match="more than 2 bytes"):
        values.unpack(three, [F32], values.Caps(max_total_bytes=2))
    assert [t.item() for t in values.unpack(three, [F32])] == [0, 0, 0]


def test_an_unaligned_tensor_is_copied_aligned():
    segment = bytearray(b"\x00" + torch.arange(4, dtype=torch.float64).numpy().tobytes())
    got = values.unpack({"tensor": [0, 1, "F64", [4]]}, [segment])
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0] and got.data_ptr() % 8 == 0


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["list", "tuple", "dict", "bytes", "tensor", "float", "x"]), children, max_size=2),
    max_leaves=30,
)


@FUZZ
@given(JSONISH, st.lists(st.binary(max_size=64), max_size=3))
def test_any_tree_is_a_value_or_bad_tree(tree, segments):
    try:
        values.unpack(tree, [bytearray(s) for s in segments])
    except values.BadTree:
        pass


@FUZZ
@given(st.sampled_from(sorted(DTYPES)), st.lists(st.just(0) | st.integers(1, 4) | st.integers(0, 2**63 - 1), max_size=8))
def test_any_tensor_node_is_a_tensor_or_bad_tree(dtype, shape):
    # torch's own refusals (a zero-size shape whose strides overflow) are BadTree too, never raw.
    try:
        tensor = values.unpack({"tensor": [0, 0, dtype, shape]}, [bytearray(256)])
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
