"""Values that cross between the caller and a remote model: data, never pickles. Both sides use it.

A remote model's arguments and results (``returns="remote"``; the messages are INVOKE and
RETURNED in ``protocol.py``) are trees of data: None, bool, int, float, str, bytes, tensors of a
dtype the weights format carries (``layout.DTYPES``: dense, on the CPU), and lists, tuples and
dicts with str keys of them, at most :data:`MAX_DEPTH` containers deep. Other tuples (namedtuple,
``torch.Size``) travel as tuples, other mappings (OrderedDict, a ``ModelOutput``) as dicts,
dataclass instances as dicts of their fields; anything else is refused (:class:`NotData`).

On the wire the tree is JSON, in the frame's header; the bytes of its tensors and bytes objects
are in segments: the frame's buffer (small blobs, at most :data:`INLINE_BLOB_BYTES` each and
:data:`INLINE_TOTAL_BYTES` in all: a copy of a few KiB costs less than a mapping), then either a
pool (the rest, copied into shared memory the receiver already has mapped: ``pools.py`` and
``safehub/_run/pools.py``) or sealed memfds (the rest, written in parallel as the weights are,
where there is no pool or it is too small). Segments are numbered: the frame's buffer first,
then its memfds in order, then the pool (``Packed.pooled`` bytes of it). A node is::

    null, true, false, 12, 1.5, "text"              itself
    {"float": "nan" | "inf" | "-inf"}                a float JSON cannot carry
    {"list": [node, ...]}, {"tuple": [node, ...]}    a list, a tuple
    {"dict": [[key, node], ...]}                     a dict: str keys, unique, in order
    {"bytes": [segment, offset, length]}             bytes
    {"tensor": [segment, offset, dtype, shape]}      a tensor: C order, little-endian, D of layout.DTYPES

Byte ranges lie inside their segment and never overlap; the encoder aligns each to 64 bytes.
:func:`unpack` reads a tree as hostile (the parent reads every reply with it): every node's shape
and types checked, caps on depth, nodes, tensors, bytes and dimensions (:class:`Caps`), bool bytes
0 or 1, tensors built as views on the segments (a private mapping of a memfd: no copy). Standard
library only, and torch where a tensor is met (imported lazily).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
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
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
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
    """A packed value: its tree, and the segments to send with it (the sender closes the fds)."""

    tree: Any
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
    ``memfds=False`` (or a machine where memfds fail) puts them in the inline segment. ``root`` names the value in an error's path
    (``result['logits']: a set is not data``).
    """
    packer = _Packer(sys.modules.get("torch"))
    try:
        tree = packer.node(value, 0)
    except NotData as exc:
        exc.root = root
        raise
    needed = packer.shared_bytes(INLINE_TOTAL_BYTES) if pool is not None else 0
    if needed:
        target = pool(needed) if pool is not None else None
        if target is not None and len(target) >= needed:
            return packer.place(tree, inline_limit=INLINE_TOTAL_BYTES, pool=target)
    if memfds and packer.blobs:
        try:
            return packer.place(tree, inline_limit=INLINE_TOTAL_BYTES)
        except OSError:
            pass  # no memfds here (or a sandbox refuses them): everything rides in the frame
    return packer.place(tree, inline_limit=None)


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
    """Rebuild a value from its tree and segments (buffers: bytearray, mmap, bytes), read as hostile.

    Tensors are views on writable segments (a read-only one is copied first). Raises
    :class:`BadTree` for anything that is not a valid tree over these segments.
    """
    writable = []
    for segment in segments:
        with memoryview(segment) as view:
            writable.append(bytearray(view) if view.readonly else segment)
    unpacker = _Unpacker(writable, caps)
    value = unpacker.node(tree, 0)
    unpacker.check_ranges()
    return value


def unpack_call(tree: Any, segments: Sequence[Any], caps: Caps = Caps()) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of one call, as :func:`pack_call` packed them."""
    call = unpack(tree, segments, caps)
    if type(call) is not tuple or len(call) != 2 or type(call[0]) is not tuple or type(call[1]) is not dict:
        raise BadTree("a call's tree must be the tuple (args, kwargs)")
    return call


class _Blob:
    __slots__ = ("ref", "source", "nbytes")

    def __init__(self, ref: list[Any], source: Any, nbytes: int) -> None:
        self.ref = ref  # the node's list; its segment and offset are filled in once placed
        self.source = source
        self.nbytes = nbytes


class _Packer:
    def __init__(self, torch: Any) -> None:
        self.torch = torch  # None: torch was never imported, so no value can hold a tensor
        self.blobs: list[_Blob] = []

    def node(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if value is None or kind is bool or kind is str or kind is int:
            return value
        if kind is float:
            return value if math.isfinite(value) else {"float": repr(value)}
        torch = self.torch
        if torch is not None and isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            view = memoryview(value).cast("B")
            return {"bytes": self.blob([None, None, view.nbytes], bytes(view))}
        if isinstance(value, str):
            return str.__str__(value)  # a str subclass (an enum) as the plain str it holds
        if isinstance(value, numbers.Integral):  # int subclasses, numpy integers (bool came first)
            return operator.index(value)
        if isinstance(value, numbers.Real):  # numpy floats
            return self.node(float(value), depth)
        if depth >= MAX_DEPTH:
            raise NotData(f"nested deeper than {MAX_DEPTH} containers")
        if isinstance(value, tuple):  # namedtuple, torch.Size
            return {"tuple": self.items(value, depth)}
        if isinstance(value, list):
            return {"list": self.items(value, depth)}
        if isinstance(value, Mapping):
            return {"dict": self.pairs(value.items(), depth)}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {"dict": self.pairs(((f.name, getattr(value, f.name)) for f in dataclasses.fields(value)), depth)}
        raise NotData(f"{with_article(type(value).__name__)} is not data (tensors, numbers, bool, None, str, bytes, "
                      "and lists, tuples and str-keyed dicts of them)")

    def items(self, values: Any, depth: int) -> list[Any]:
        out = []
        for index, item in enumerate(values):
            try:
                out.append(self.node(item, depth + 1))
            except NotData as exc:
                exc.path.insert(0, f"[{index}]")
                raise
        return out

    def pairs(self, items: Any, depth: int) -> list[list[Any]]:
        out = []
        for key, item in items:
            if not isinstance(key, str):
                raise NotData(f"dict keys must be str, not {type(key).__name__}")
            try:
                out.append([str.__str__(key), self.node(item, depth + 1)])
            except NotData as exc:
                exc.path.insert(0, f"[{key[:60]!r}]")
                raise
        return out

    def tensor(self, value: Any) -> dict[str, Any]:
        try:
            tensor, dtype_name = weights.prepare_tensor(value)
        except weights.Unsendable as exc:
            raise NotData(f"a tensor that {exc}") from None
        nbytes = tensor.numel() * tensor.element_size()
        return {"tensor": self.blob([None, None, dtype_name, list(tensor.shape)], tensor, nbytes)}

    def blob(self, ref: list[Any], source: Any, nbytes: int | None = None) -> list[Any]:
        self.blobs.append(_Blob(ref, source, len(source) if nbytes is None else nbytes))
        return ref

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
    def __init__(self, segments: list[Any], caps: Caps) -> None:
        self.segments = segments
        self.caps = caps
        self.nodes = 0
        self.tensors = 0
        self.total = 0
        self.ranges: list[tuple[int, int, int]] = []

    def node(self, node: Any, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > self.caps.max_nodes:
            raise BadTree(f"more than {self.caps.max_nodes} nodes")
        kind = type(node)
        if node is None or kind is bool or kind is int or kind is str:
            return node
        if kind is float:
            if not math.isfinite(node):
                raise BadTree("a float node that is not finite (those travel as {\"float\": ...})")
            return node
        if kind is not dict or len(node) != 1:
            raise BadTree(f"a node must be a scalar or an object of one key, not a {kind.__name__}")
        ((tag, body),) = node.items()
        if tag in ("list", "tuple", "dict"):
            if depth >= self.caps.max_depth:
                raise BadTree(f"nested deeper than {self.caps.max_depth} containers")
            if type(body) is not list:
                raise BadTree(f"{with_article(str(tag))} node holds {with_article(type(body).__name__)}, not a list")
            if tag == "dict":
                return self.dict(body, depth)
            items = [self.node(item, depth + 1) for item in body]
            return items if tag == "list" else tuple(items)
        if tag == "float":
            if type(body) is not str or body not in _NONFINITE:
                raise BadTree(f"a float node must be one of {sorted(_NONFINITE)}")
            return _NONFINITE[body]
        if tag == "bytes":
            if type(body) is not list or len(body) != 3:
                raise BadTree("a bytes node must be [segment, offset, length]")
            segment, offset = self.take(body[0], body[1], body[2])
            with memoryview(segment) as view:
                return bytes(view[offset : offset + body[2]])
        if tag == "tensor":
            return self.tensor(body)
        raise BadTree(f"unknown node {str(tag)[:40]!r}")

    def dict(self, body: list[Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                raise BadTree("a dict node holds [str key, node] pairs")
            key = pair[0]
            if len(key) > self.caps.max_key_chars:
                raise BadTree(f"a dict key of {len(key)} characters, more than {self.caps.max_key_chars}")
            if key in out:
                raise BadTree(f"the dict key {key[:60]!r} appears twice")
            out[key] = self.node(pair[1], depth + 1)
        return out

    def tensor(self, body: Any) -> Any:
        import torch

        if type(body) is not list or len(body) != 4:
            raise BadTree("a tensor node must be [segment, offset, dtype, shape]")
        segment_index, offset, dtype_name, shape = body
        if type(dtype_name) is not str or dtype_name not in DTYPES:
            raise BadTree(f"a tensor of dtype {str(dtype_name)[:20]!r}, not one of {sorted(DTYPES)}")
        if type(shape) is not list or len(shape) > self.caps.max_ndim or not all(_is_count(d) for d in shape):
            raise BadTree(f"a tensor's shape must be a list of at most {self.caps.max_ndim} non-negative ints")
        self.tensors += 1
        if self.tensors > self.caps.max_tensors:
            raise BadTree(f"more than {self.caps.max_tensors} tensors")
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
        return tensor.reshape(shape) if len(shape) != 1 else tensor

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


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63
