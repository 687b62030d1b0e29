"""Values that cross between the caller and a remote model: data, never pickles. Both sides use it.

A remote model's arguments and results (``returns="remote"``; the messages are INVOKE and
RETURNED in ``protocol.py``) are trees of data: None, bool, int, float, str, bytes, tensors of a
dtype the weights format carries (``layout.DTYPES``: dense, on the CPU), and lists, tuples and
dicts with str keys of them, at most :data:`MAX_DEPTH` containers deep. Other tuples (namedtuple,
``torch.Size``) travel as tuples, other mappings (OrderedDict, a ``ModelOutput``) as dicts,
dataclass instances as dicts of their fields; anything else is refused (:class:`NotData`).

On the wire the tree is bytes (INVOKE's "call", RETURNED's "value"), struct-packed, all integers
little-endian; the bytes of its tensors and bytes objects are in segments: the frame's buffer
(small blobs, at most :data:`INLINE_BLOB_BYTES` each and :data:`INLINE_TOTAL_BYTES` in all: a copy
of a few KiB costs less than a mapping), then either a pool (the rest, copied into shared memory
the receiver already has mapped: ``pools.py`` and ``safehub/_run/pools.py``) or sealed memfds (the
rest, written in parallel as the weights are, where there is no pool or it is too small).
Segments are numbered: the frame's buffer first, then its memfds in order, then the pool
(``Packed.pooled`` bytes of it). A node is a one-byte tag and what it says, depth first::

    0 None, 1 False, 2 True                          itself
    3 int  "<q"; 4 a larger int: "<H" n, n bytes      signed, little-endian (n <= MAX_INT_BYTES)
    5 float "<d"                                     any double: nan and the infinities too
    6 str  "<I" n, n bytes of UTF-8                  strict UTF-8 (no surrogates)
    7 bytes "<IQQ" segment, offset, length
    8 tensor "<BBIQ" dtype, ndim, segment, offset,   dtype: its place in DTYPE_CODES;
           then ndim dimensions "<Q"                 C order, little-endian
    9 list, 10 tuple "<I" n, then n nodes
    11 dict "<I" n, then n pairs: a key as a str     str keys, unique, in order
           (without its tag), then a node

Byte ranges lie inside their segment and never overlap; the encoder aligns each to 64 bytes.
:func:`unpack` reads a tree as hostile (the parent reads every reply with it): every node's shape
and types checked, every count and length checked against the bytes left before anything is
made for it (a forged count allocates nothing), no bytes after the root, caps on depth, nodes,
tensors, bytes and dimensions (:class:`Caps`), bool bytes 0 or 1, tensors built as views on the
segments (a private mapping of a memfd: no copy). Standard library only, and torch where a tensor
is met (imported lazily).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import weights, with_article
from .layout import DTYPES

MAX_DEPTH = 32
ALIGN = 64
INLINE_BLOB_BYTES = 64 * 1024
INLINE_TOTAL_BYTES = 1024 * 1024
MAX_INT_BYTES = 1024  # an int of more bytes than this is not data (JSON readers cap digits too)
# A tensor's dtype on the wire: its place here (append only: a code never changes meaning).
DTYPE_CODES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
_DTYPE_CODE = {name: code for code, name in enumerate(DTYPE_CODES)}
N_NONE, N_FALSE, N_TRUE, N_INT, N_BIGINT, N_FLOAT, N_STR, N_BYTES, N_TENSOR, N_LIST, N_TUPLE, N_DICT = range(12)
_TAG_INT = struct.Struct("<Bq")
_TAG_FLOAT = struct.Struct("<Bd")
_TAG_COUNT = struct.Struct("<BI")
_TAG_BIGINT = struct.Struct("<BH")
_TAG_BYTES = struct.Struct("<BIQQ")
_TAG_TENSOR = struct.Struct("<BBBIQ")
_COUNT = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_D64 = struct.Struct("<d")
_H16 = struct.Struct("<H")
_PLACE = struct.Struct("<IQ")  # a blob's segment and offset, written once it is placed
_BYTES_BODY = struct.Struct("<IQQ")
_TENSOR_BODY = struct.Struct("<BBIQ")
Pool = Callable[[int], "memoryview | None"]  # bytes needed -> a writable view of at least that many, or None


class NotData(ValueError):
    """A value that cannot cross: not data, nested too deep, or a tensor the format cannot carry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.root = "value"  # what the path starts from: "result", "argument 0"
        self.path: list[str] = []  # where in it, outermost first: [0], ['logits']

    def __str__(self) -> str:
        return f"{self.root}{''.join(self.path)}: {self.reason}"


class BadTree(ValueError):
    """A tree, or the bytes it points at, that breaks the format."""


@dataclass(frozen=True)
class Caps:
    """What :func:`unpack` accepts at most. The parent passes the weights decoder's caps."""

    max_depth: int = MAX_DEPTH
    max_nodes: int = 1_000_000
    max_tensors: int = 1_000_000
    max_total_bytes: int = 1024**4
    max_ndim: int = 64
    max_key_chars: int = 4096


@dataclass
class Packed:
    """A packed value: its tree (bytes), and the segments to send with it (the sender closes the fds)."""

    tree: bytearray
    buffers: list[bytearray] = field(default_factory=list)  # none, or the one inline segment
    fds: list[int] = field(default_factory=list)  # sealed memfds, in segment order
    pooled: int = 0  # bytes written at the start of the pool: its segment comes after the fds

    def close(self) -> None:
        import os

        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def pack(value: Any, *, memfds: bool = True, root: str = "value", pool: Pool | None = None) -> Packed:
    """Describe ``value`` as a tree and lay its bytes out in segments; raise :class:`NotData`.

    ``pool(nbytes)`` gives a writable view of at least ``nbytes`` the receiver has mapped too (or
    None: then it is not used); it takes the large blobs, back to back. Else they go to memfds;
    ``memfds=False`` (or a machine where memfds fail) puts them in the inline segment. ``root``
    names the value in an error's path (``result['logits']: a set is not data``).
    """
    packer = _Packer(sys.modules.get("torch"))
    try:
        packer.node(value, 0)
    except NotData as exc:
        exc.root = root
        raise
    tree = packer.out
    packed = None
    needed = packer.shared_bytes(INLINE_TOTAL_BYTES) if pool is not None else 0
    if needed:
        target = pool(needed) if pool is not None else None
        if target is not None and len(target) >= needed:
            packed = packer.place(tree, inline_limit=INLINE_TOTAL_BYTES, pool=target)
    if packed is None and memfds and packer.blobs:
        try:
            packed = packer.place(tree, inline_limit=INLINE_TOTAL_BYTES)
        except OSError:
            pass  # no memfds here (or a sandbox refuses them): everything rides in the frame
    if packed is None:
        packed = packer.place(tree, inline_limit=None)
    for blob in packer.blobs:  # each blob's place, now that it has one
        _PLACE.pack_into(tree, blob.slot, blob.ref[0], blob.ref[1])
    return packed


def pack_call(args: Sequence[Any], kwargs: Mapping[str, Any], *, memfds: bool = True,
              pool: Pool | None = None) -> Packed:
    """The arguments of one call, packed as the tuple ``(args, kwargs)``."""
    try:
        return pack((tuple(args), dict(kwargs)), memfds=memfds, pool=pool)
    except NotData as exc:
        # [0][i] is the i-th positional argument, [1]['name'] the keyword argument name.
        if len(exc.path) >= 2:
            exc.root, exc.path = f"argument {exc.path[1][1:-1]}", exc.path[2:]
        raise


def unpack(tree: Any, segments: Sequence[Any], caps: Caps = Caps()) -> Any:
    """Rebuild a value from its tree (bytes) and segments (buffers: bytearray, mmap, bytes), read as hostile.

    Tensors are views on writable segments (a read-only one is copied first). Raises
    :class:`BadTree` for anything that is not a valid tree over these segments.
    """
    if not isinstance(tree, (bytes, bytearray, memoryview)):
        raise BadTree(f"a tree is bytes, not {with_article(type(tree).__name__)}")
    writable = []
    for segment in segments:
        with memoryview(segment) as view:
            writable.append(bytearray(view) if view.readonly else segment)
    unpacker = _Unpacker(bytes(tree), writable, caps)
    try:
        value = unpacker.node(0)
    except (struct.error, IndexError):
        raise BadTree("the tree ends inside a node") from None
    except UnicodeDecodeError:
        raise BadTree("a str or key that is not UTF-8") from None
    if unpacker.at != len(unpacker.tree):
        raise BadTree(f"{len(unpacker.tree) - unpacker.at} bytes after the tree's root")
    unpacker.check_ranges()
    return value


def unpack_call(tree: Any, segments: Sequence[Any], caps: Caps = Caps()) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of one call, as :func:`pack_call` packed them."""
    call = unpack(tree, segments, caps)
    if type(call) is not tuple or len(call) != 2 or type(call[0]) is not tuple or type(call[1]) is not dict:
        raise BadTree("a call's tree must be the tuple (args, kwargs)")
    return call


class _Blob:
    __slots__ = ("ref", "slot", "source", "nbytes")

    def __init__(self, slot: int, source: Any, nbytes: int) -> None:
        self.ref: list[Any] = [None, None]  # its segment and offset, filled in once placed
        self.slot = slot  # where in the tree they are written (``_PLACE``)
        self.source = source
        self.nbytes = nbytes


class _Packer:
    def __init__(self, torch: Any) -> None:
        self.torch = torch  # None: torch was never imported, so no value can hold a tensor
        self.blobs: list[_Blob] = []
        self.out = bytearray()

    def node(self, value: Any, depth: int) -> None:
        out = self.out
        kind = type(value)
        if value is None:
            out.append(N_NONE)
        elif kind is bool:
            out.append(N_TRUE if value else N_FALSE)
        elif kind is int:
            self.integer(value)
        elif kind is float:
            out += _TAG_FLOAT.pack(N_FLOAT, value)
        elif kind is str:
            self.text(value, N_STR)
        elif (kind is tuple or kind is list or kind is dict) and depth < MAX_DEPTH:  # before the ABC checks
            if kind is dict:
                self.pairs(list(value.items()), depth)
            else:
                self.items(value, N_TUPLE if kind is tuple else N_LIST, depth)
        elif self.torch is not None and isinstance(value, self.torch.Tensor):
            self.tensor(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            view = memoryview(value).cast("B")
            out += _TAG_BYTES.pack(N_BYTES, 0, 0, view.nbytes)
            self.blobs.append(_Blob(len(out) - _PLACE.size - 8, bytes(view), view.nbytes))
        elif isinstance(value, str):
            self.text(str.__str__(value), N_STR)  # a str subclass (an enum) as the plain str it holds
        elif isinstance(value, numbers.Integral):  # int subclasses, numpy integers (bool came first)
            self.integer(operator.index(value))
        elif isinstance(value, numbers.Real):  # numpy floats
            out += _TAG_FLOAT.pack(N_FLOAT, float(value))
        elif depth >= MAX_DEPTH:
            raise NotData(f"nested deeper than {MAX_DEPTH} containers")
        elif isinstance(value, tuple):  # namedtuple, torch.Size
            self.items(value, N_TUPLE, depth)
        elif isinstance(value, list):
            self.items(value, N_LIST, depth)
        elif isinstance(value, Mapping):
            self.pairs(list(value.items()), depth)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            self.pairs([(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)], depth)
        else:
            raise NotData(f"{with_article(type(value).__name__)} is not data (tensors, numbers, bool, None, str, bytes, "
                          "and lists, tuples and str-keyed dicts of them)")

    def integer(self, value: int) -> None:
        if -(2**63) <= value < 2**63:
            self.out += _TAG_INT.pack(N_INT, value)
            return
        data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        if len(data) > MAX_INT_BYTES:
            raise NotData(f"an int of more than {MAX_INT_BYTES} bytes")
        self.out += _TAG_BIGINT.pack(N_BIGINT, len(data)) + data

    def text(self, value: str, tag: int | None) -> None:
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError:
            raise NotData("a str that is not valid Unicode (a lone surrogate)") from None
        if tag is None:
            self.out += _COUNT.pack(len(data)) + data
        else:
            self.out += _TAG_COUNT.pack(tag, len(data)) + data

    def items(self, values: Any, tag: int, depth: int) -> None:
        self.out += _TAG_COUNT.pack(tag, len(values))
        for index, item in enumerate(values):
            try:
                self.node(item, depth + 1)
            except NotData as exc:
                exc.path.insert(0, f"[{index}]")
                raise

    def pairs(self, items: list[tuple[Any, Any]], depth: int) -> None:
        self.out += _TAG_COUNT.pack(N_DICT, len(items))
        for key, item in items:
            if not isinstance(key, str):
                raise NotData(f"dict keys must be str, not {type(key).__name__}")
            try:
                self.text(str.__str__(key), None)
                self.node(item, depth + 1)
            except NotData as exc:
                exc.path.insert(0, f"[{key[:60]!r}]")
                raise

    def tensor(self, value: Any) -> None:
        try:
            tensor, dtype_name = weights.prepare_tensor(value)
        except weights.Unsendable as exc:
            raise NotData(f"a tensor that {exc}") from None
        shape = tensor.shape
        out = self.out
        slot = len(out) + 3
        out += _TAG_TENSOR.pack(N_TENSOR, _DTYPE_CODE[dtype_name], len(shape), 0, 0)
        for dim in shape:
            out += _U64.pack(dim)
        self.blobs.append(_Blob(slot, tensor, tensor.numel() * tensor.element_size()))

    def shared_bytes(self, inline_limit: int | None) -> int:
        """The bytes the blobs that do not ride inline take, laid out back to back (aligned)."""
        end = inline_end = 0
        for blob in self.blobs:
            size = _aligned(inline_end) + blob.nbytes
            if blob.nbytes == 0 or inline_limit is None or (blob.nbytes <= INLINE_BLOB_BYTES and size <= inline_limit):
                inline_end = size
            else:
                end = _aligned(end) + blob.nbytes
        return end

    def place(self, tree: Any, inline_limit: int | None, pool: memoryview | None = None) -> Packed:
        """Give every blob its segment and offset, write the segments, return the packed value.
        The large blobs go to ``pool`` when given (it has room for them: :meth:`shared_bytes`)."""
        inline: list[_Blob] = []
        shared: list[_Blob] = []
        inline_end = 0
        for blob in self.blobs:
            size = _aligned(inline_end) + blob.nbytes
            if blob.nbytes == 0 or inline_limit is None or (blob.nbytes <= INLINE_BLOB_BYTES and size <= inline_limit):
                blob.ref[:2] = [0, _aligned(inline_end)]
                inline_end = size
                inline.append(blob)
            else:
                shared.append(blob)
        packed = Packed(tree)
        first_shard = 0
        if inline:
            buffer = bytearray(inline_end)
            with memoryview(buffer) as view:
                for blob in inline:
                    with weights.raw_view(blob.source) as raw:
                        view[blob.ref[1] : blob.ref[1] + blob.nbytes] = raw
            packed.buffers.append(buffer)
            first_shard = 1
        if shared and pool is not None:
            packed.pooled = self.into_pool(shared, first_shard, pool)
        elif shared:
            packed.fds = [fd for fd, _ in weights.write_memfds(self.shards(shared, first_shard), name="safehub-values")]
        return packed

    @staticmethod
    def into_pool(blobs: list[_Blob], segment: int, pool: memoryview) -> int:
        """Copy the blobs into the pool, back to back from its start (aligned); the bytes used."""
        end = 0
        for blob in blobs:
            blob.ref[:2] = [segment, _aligned(end)]
            end = blob.ref[1] + blob.nbytes
            with weights.raw_view(blob.source) as raw:
                pool[blob.ref[1] : end] = raw
        return end

    def shards(self, blobs: list[_Blob], first: int) -> list[tuple[bytes, list[tuple[Any, int]], int]]:
        """The large blobs cut into memfd shards, one per core (``weights.split``), each laid out."""
        parts = [(str(i), "U8", [b.nbytes], ALIGN, b.source) for i, b in enumerate(blobs)]
        layouts = []
        for number, shard in enumerate(weights.split(parts, weights.shard_count(parts))):
            placed, end = [], 0
            for name, _, _, _, source in shard:
                blob = blobs[int(name)]
                blob.ref[:2] = [first + number, _aligned(end)]
                placed.append((source, blob.ref[1]))
                end = blob.ref[1] + blob.nbytes
            layouts.append((b"", placed, end))
        return layouts


def _aligned(offset: int) -> int:
    return offset + (-offset % ALIGN)


class _Unpacker:
    def __init__(self, tree: bytes, segments: list[Any], caps: Caps) -> None:
        self.tree = tree
        self.at = 0  # the next node's first byte
        self.segments = segments
        self.caps = caps
        self.nodes = 0
        self.tensors = 0
        self.total = 0
        self.ranges: list[tuple[int, int, int]] = []

    def node(self, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > self.caps.max_nodes:
            raise BadTree(f"more than {self.caps.max_nodes} nodes")
        tree, at = self.tree, self.at
        tag = tree[at]
        self.at = at + 1
        if tag <= N_TRUE:
            return None if tag == N_NONE else tag == N_TRUE
        if tag == N_INT:
            self.at = at + 9
            return _I64.unpack_from(tree, at + 1)[0]
        if tag == N_FLOAT:
            self.at = at + 9
            return _D64.unpack_from(tree, at + 1)[0]
        if tag == N_STR:
            return self.text(None)
        if tag == N_TENSOR:
            return self.tensor()
        if tag in (N_LIST, N_TUPLE, N_DICT):
            if depth >= self.caps.max_depth:
                raise BadTree(f"nested deeper than {self.caps.max_depth} containers")
            (count,) = _COUNT.unpack_from(tree, at + 1)
            self.at = at + 5
            # Every node takes a byte at least, a dict's pair five: a forged count allocates nothing.
            if count * (5 if tag == N_DICT else 1) > len(tree) - self.at:
                raise BadTree(f"a container of {count} items in {len(tree) - self.at} bytes of tree")
            if tag == N_DICT:
                return self.dict(count, depth)
            items = [self.node(depth + 1) for _ in range(count)]
            return items if tag == N_LIST else tuple(items)
        if tag == N_BYTES:
            segment_index, offset, length = _BYTES_BODY.unpack_from(tree, at + 1)
            self.at = at + 1 + _BYTES_BODY.size
            segment, offset = self.take(segment_index, offset, length)
            with memoryview(segment) as view:
                return bytes(view[offset : offset + length])
        if tag == N_BIGINT:
            (n,) = _H16.unpack_from(tree, at + 1)
            if n > MAX_INT_BYTES or at + 3 + n > len(tree):
                raise BadTree(f"an int of {n} bytes (at most {MAX_INT_BYTES}, inside the tree)")
            self.at = at + 3 + n
            return int.from_bytes(tree[at + 3 : at + 3 + n], "little", signed=True)
        raise BadTree(f"unknown node tag {tag}")

    def text(self, max_chars: int | None) -> str:
        """A str's length and UTF-8 bytes (a node's body, or a dict key of at most ``max_chars``)."""
        tree, at = self.tree, self.at
        (n,) = _COUNT.unpack_from(tree, at)
        at += 4
        if at + n > len(tree):
            raise BadTree(f"a str of {n} bytes runs past the tree")
        if max_chars is not None and n > 4 * max_chars:
            raise BadTree(f"a dict key of {n} bytes, more than {max_chars} characters")
        self.at = at + n
        return str(tree[at : at + n], "utf-8")

    def dict(self, count: int, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        max_chars = self.caps.max_key_chars
        for _ in range(count):
            key = self.text(max_chars)
            if len(key) > max_chars:
                raise BadTree(f"a dict key of {len(key)} characters, more than {max_chars}")
            if key in out:
                raise BadTree(f"the dict key {key[:60]!r} appears twice")
            out[key] = self.node(depth + 1)
        return out

    def tensor(self) -> Any:
        torch = sys.modules.get("torch")
        if torch is None:
            import torch

        tree, at = self.tree, self.at
        code, ndim, segment_index, offset = _TENSOR_BODY.unpack_from(tree, at)
        at += _TENSOR_BODY.size
        if code >= len(DTYPE_CODES):
            raise BadTree(f"a tensor of dtype code {code}, not one of {len(DTYPE_CODES)}")
        if ndim > self.caps.max_ndim:
            raise BadTree(f"a tensor's shape must be a list of at most {self.caps.max_ndim} non-negative ints")
        shape = list(_dims(ndim).unpack_from(tree, at))
        self.at = at + 8 * ndim
        if not all(d < 2**63 for d in shape):
            raise BadTree(f"a tensor's shape must be a list of at most {self.caps.max_ndim} non-negative ints")
        self.tensors += 1
        if self.tensors > self.caps.max_tensors:
            raise BadTree(f"more than {self.caps.max_tensors} tensors")
        dtype_name = DTYPE_CODES[code]
        torch_name, itemsize = DTYPES[dtype_name]
        numel = math.prod(shape)
        if numel * itemsize >= 2**63:
            raise BadTree(f"a tensor of shape {shape[:8]} is larger than any buffer")
        segment, offset = self.take(segment_index, offset, numel * itemsize)
        try:
            return self.build(torch, getattr(torch, torch_name), segment, offset, numel, itemsize, shape)
        except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
            # torch's own refusals (strides that overflow on a zero-size shape): still only a bad tree.
            raise BadTree(f"a tensor of shape {shape[:8]} cannot be built: {str(exc)[:200]}") from None

    @staticmethod
    def build(torch: Any, dtype: Any, segment: Any, offset: int, numel: int, itemsize: int, shape: list[int]) -> Any:
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        if dtype is torch.bool and int(torch.frombuffer(segment, dtype=torch.uint8, count=numel, offset=offset).max()) > 1:
            # A bool byte other than 0 or 1 is undefined behaviour in torch's kernels.
            raise BadTree("a BOOL tensor's bytes must be 0 or 1")
        tensor = torch.frombuffer(segment, dtype=dtype, count=numel, offset=offset)
        if tensor.data_ptr() % itemsize:
            tensor = tensor.clone()  # unaligned in its segment: a fresh, aligned copy
        return tensor.view(shape) if len(shape) != 1 else tensor  # contiguous: a view, never a copy

    def take(self, segment_index: Any, offset: Any, length: Any) -> tuple[Any, int]:
        """(the segment, the offset) of a byte range, once it is checked to lie inside it."""
        if type(segment_index) is not int or not 0 <= segment_index < len(self.segments):
            raise BadTree(f"segment {str(segment_index)[:20]} of {len(self.segments)}")
        if not _is_count(offset) or not _is_count(length):
            raise BadTree("byte offsets and lengths must be non-negative ints")
        segment = self.segments[segment_index]
        if offset + length > len(segment):
            raise BadTree(f"bytes [{offset}, {offset + length}] run past segment {segment_index} of {len(segment)} bytes")
        self.total += length
        if self.total > self.caps.max_total_bytes:
            raise BadTree(f"more than {self.caps.max_total_bytes} bytes of tensors and bytes")
        if length:
            self.ranges.append((segment_index, offset, offset + length))
        return segment, offset

    def check_ranges(self) -> None:
        """No byte is read by two nodes: a tensor never aliases another one the sender did not share."""
        self.ranges.sort()
        for (seg_a, _, end_a), (seg_b, begin_b, _) in zip(self.ranges, self.ranges[1:], strict=False):
            if seg_a == seg_b and begin_b < end_a:
                raise BadTree(f"two byte ranges overlap in segment {seg_a} at {begin_b}")


@functools.lru_cache(maxsize=None)
def _dims(ndim: int) -> struct.Struct:
    """A tensor's ``ndim`` dimensions on the wire ("<Q" each); at most ``Caps.max_ndim`` are read."""
    return struct.Struct(f"<{ndim}Q")


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63
