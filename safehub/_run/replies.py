"""What a worker's successful reply carries, read as hostile data: the value each decoder makes of it.

``conversation.py`` receives every frame and turns failures into errors; the successes come
here: a RESULT of ``list`` or ``help``, a load's result for its ``returns`` mode (``returns.py``
names the decoder of each: weights parsed as data, an object unpickled, a remote model's
methods), and a remote call's RETURNED value. ``protocol.py`` declares the fields; this module
checks what they mean. Nothing in a reply is executed, except the unpickling of an object
result, which needs trust (DESIGN 2).
"""

from __future__ import annotations

import os
from typing import Any

from .. import _terminal
from .._memfds import map_sealed_memfds
from .._results import MAX_NAME_CHARS, MAX_NDIM, MAX_TENSORS, MAX_TOTAL_BYTES, decode_object, decode_weights
from .._sandbox import Sandbox
from .._worker import protocol, values
from .pools import ResultPool
from ..errors import ProtocolError, ResultDecodeError

MAX_PAYLOAD_BYTES = 1024**4  # a memfd is mapped lazily: this only bounds the address space
MAX_INLINE_BYTES = 2 * 1024**3  # an inline payload is read into memory
MAX_SHARDS = 8  # memfds with one result (the worker writes one per core, at most 4)
MAX_METHODS = 4096  # public methods a remote model may list
MAX_NAME = 256  # characters of a method's or a class's name
# A remote call's value: the weights decoder's caps bound its tensors and bytes too.
VALUE_CAPS = values.Caps(max_tensors=MAX_TENSORS, max_total_bytes=MAX_TOTAL_BYTES, max_ndim=MAX_NDIM,
                         max_key_chars=MAX_NAME_CHARS)


SELF = object()  # a remote call's result that is the model itself (``to("cpu")``, ``float()``): its handle


def result_cap(sandbox: Sandbox) -> int:
    """The most bytes one result may hold: what the worker could hold (its ``memory_limit``)."""
    return min(MAX_PAYLOAD_BYTES, sandbox.memory_limit or MAX_PAYLOAD_BYTES)


def check_result(frame: protocol.Frame, action: str, returns: str) -> None:
    """Hold a RESULT to the request: the action asked, no data with a list or help, the ``returns`` asked."""
    fields = frame.fields
    if fields.get("action") != action:
        raise ProtocolError(f"the worker answered {fields.get('action')!r} to a {action!r} request")
    if action in ("list", "help") and (frame.buffers or frame.fds):
        raise ProtocolError(f"the worker's {action} answer carries unexpected data")
    if action == "load" and fields.get("returns") != returns:
        # E.g. a pickle where weights were asked: refused before a byte of it is looked at.
        raise ProtocolError(f"the worker answered returns={str(fields.get('returns'))[:40]!r} to returns={returns!r}")


def entrypoints(frame: protocol.Frame) -> list[str]:
    """A ``list`` RESULT's entrypoint names, their control characters made visible (``_terminal``)."""
    names = frame.fields.get("entrypoints")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError("the worker's entrypoint list is not a list of str")
    return [_terminal.visible(name) for name in names]


def docstring(frame: protocol.Frame) -> str | None:
    """A ``help`` RESULT's docstring, its control characters made visible: it can write to no terminal."""
    doc = frame.fields.get("doc")
    if doc is not None and not isinstance(doc, str):
        raise ProtocolError("the worker's docstring is not a str")
    return None if doc is None else _terminal.visible_lines(doc)


# Tensors are views on the private mappings, which live as long as they do: never closed here.
def weights(frame: protocol.Frame, max_bytes: int) -> dict[str, Any]:
    """A ``returns="weights"`` RESULT (or a remote ``state_dict()``): tensors parsed as data."""
    return decode_weights(result_shards(frame, max_bytes))


def unpickled_object(frame: protocol.Frame, max_bytes: int) -> Any:
    """A ``returns="object"`` RESULT, unpickled: runs code the repository chose (it needs trust)."""
    return decode_object(result_shards(frame, max_bytes))


def remote_model(frame: protocol.Frame) -> tuple[list[str], str]:
    """A ``returns="remote"`` RESULT: the model's public methods and its class name, checked."""
    fields = frame.fields
    if frame.buffers or frame.fds:
        raise ProtocolError("the worker's answer to a remote load carries data")
    methods = fields.get("methods")
    if (type(methods) is not list or len(methods) > MAX_METHODS
            or not all(type(m) is str and 0 < len(m) <= MAX_NAME and m.isprintable() and not m.startswith("_") for m in methods)):
        raise ProtocolError(f"the worker's list of methods is not at most {MAX_METHODS} public, printable names")
    class_name = fields.get("class")
    return methods, class_name[:MAX_NAME] if isinstance(class_name, str) and class_name.isprintable() else "model"


def returned_value(frame: protocol.Frame, method: str, name: str, max_bytes: int, pool: ResultPool | None = None) -> Any:
    """A RETURNED's value, read as hostile data: the weights layout for ``state_dict``, else a value tree.

    ``name`` is the call as messages name it; ``max_bytes`` bounds the result (``result_cap``);
    ``pool`` is the result pool the INVOKE passed (its ``pooled`` bytes are copied out of it
    before a byte is read). Its fds are closed here: no mapping needs them.
    """
    try:
        if method in protocol.REMOTE_WEIGHTS_METHODS:
            if frame.fields["value"] is not None:
                raise ProtocolError(f"the worker answered {method}() with something else than weights")
            return weights(frame, max_bytes)
        if frame.fields.get("self") is True:
            if frame.fields["value"] is not None or frame.buffers or frame.fds:
                raise ProtocolError(f"the worker answered a call to {name} with the model and data")
            return SELF
        if "transport" in frame.fields or "sizes" in frame.fields:
            raise ProtocolError(f"the worker answered {name} with weights")
        tree = frame.fields["value"]
        if tree is None:
            raise ProtocolError(f"the worker answered a call to {name} without a value")
        # One mapping for all the reply's memfds, and no descriptor kept: a caller may keep thousands of results.
        segments = [*frame.buffers, *map_sealed_memfds(frame.fds, max_bytes=max_bytes)] if frame.fds else frame.buffers
        pooled = frame.fields.get("pooled")
        if pooled is not None:  # the result pool's bytes, copied into the caller's own memory first
            if pool is None:
                raise ResultDecodeError(f"the result of a call to {name} uses a result pool it was not given")
            segments = [*segments, pool.copy_out(pooled)]
        try:
            return values.unpack(tree, segments, VALUE_CAPS)
        except values.BadTree as exc:
            raise ResultDecodeError(f"the result of a call to {name} is not valid data: {exc}") from None
    finally:
        if frame.fds:
            frame.close_fds()


def unpooled_bytes(frame: protocol.Frame, method: str) -> int:
    """The bytes a RETURNED value carries outside the result pool (its memfds, and its inline
    buffer when that holds large blobs): what the pool must hold for the next such result to take
    it. 0 for weights, a pooled reply, and a reply whose inline buffer is at most
    ``values.INLINE_BLOB_BYTES``: such blobs ride in the frame whatever the pool, so a pool would
    only cost each later call a descriptor passed and checked. (Where the worker may make no
    memfd, large blobs ride inline too: they count.)"""
    if frame.kind != protocol.RETURNED or method in protocol.REMOTE_WEIGHTS_METHODS or frame.fields.get("pooled") is not None:
        return 0
    inline = sum(len(b) for b in frame.buffers)
    try:
        return (inline if inline > values.INLINE_BLOB_BYTES else 0) + sum(os.fstat(fd).st_size for fd in frame.fds)
    except OSError:
        return 0  # not a memfd: the decoder refuses it


def result_shards(frame: protocol.Frame, max_bytes: int = MAX_PAYLOAD_BYTES) -> list[Any]:
    """A weights or object result's shards (``transport``, ``sizes`` and what came with the frame):
    the memfds checked and mapped privately, together (``_memfds``), or the one inline buffer.
    ``max_bytes`` bounds the result. The frame's fds stay the caller's to close: no shard needs them."""
    fields = frame.fields
    sizes, transport = fields.get("sizes"), fields.get("transport")
    if type(sizes) is not list or not 1 <= len(sizes) <= MAX_SHARDS or not all(type(n) is int and n >= 0 for n in sizes):
        raise ProtocolError(f"the worker's result sizes {str(sizes)[:100]} are not 1 to {MAX_SHARDS} counts of bytes")
    if sum(sizes) > max_bytes:
        raise ResultDecodeError(f"the worker's result of {sum(sizes)} bytes is more than the cap of {max_bytes} "
                                "(what the worker could hold: Sandbox(memory_limit=...))")
    if transport == "memfd" and len(frame.fds) == len(sizes) and not frame.buffers:
        shards = map_sealed_memfds(frame.fds, max_bytes=max_bytes)
        for shard, size in zip(shards, sizes, strict=True):
            if len(shard) != size:
                raise ResultDecodeError(f"the worker's memfd holds {len(shard)} bytes, not the {size} announced")
        return shards
    if transport == "inline" and len(frame.buffers) == len(sizes) == 1 and not frame.fds:
        if len(frame.buffers[0]) != sizes[0]:
            raise ResultDecodeError(f"the worker's result holds {len(frame.buffers[0])} bytes, not {sizes[0]}")
        return [frame.buffers[0]]
    raise ProtocolError(f"the worker's result transport {str(transport)[:40]!r} does not match what came with it")


def scratch_full(report: Any) -> str:
    """A note when the worker's scratch tmpfs was full as it answered, else "".

    A write that fails with ENOSPC on a tmpfs leaves it full (a large write is cut short first),
    so less than 1 MiB left is the sign; the worker's figures only ever make a message.
    """
    scratch = report.get("scratch") if isinstance(report, dict) else None
    if not isinstance(scratch, dict):
        return ""
    size, free = scratch.get("size"), scratch.get("free")
    if type(size) is not int or type(free) is not int or size <= 0 or free >= 1024**2:
        return ""
    return (
        f"the worker filled its scratch folder (HOME, TMPDIR, working folder) of {size / 1024**2:.0f} MiB: "
        "writes past it fail with 'No space left on device' (Sandbox(max_scratch_size=...) sets its size)"
    )


def applied_layers(frame: protocol.Frame) -> list[str]:
    """The sandbox layers a RESULT says are in force (its ``sandbox.applied``), or none."""
    report = frame.fields.get("sandbox")
    applied = report.get("applied") if isinstance(report, dict) else None
    return [name for name in applied if isinstance(name, str)] if isinstance(applied, list) else []
