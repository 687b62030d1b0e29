"""Encode a load result in the worker: raw buffers in the safetensors layout, in sealed memfds.

The format is described once, in the docstring of ``safehub/_results.py`` (its names in ``layout.py``) (the parent's decoder);
golden-bytes tests pin this encoder to it. Both ``returns`` modes use it: a weights result holds
each tensor's own bytes; an object result (``objects.py``) holds each storage's bytes once and
the pickle of the object's structure. Standard library and torch only; torch is imported lazily,
and a result cannot hold tensors when the repository never imported torch.

A part is ``(name, dtype name, shape, alignment, source)``: one header entry and the bytes it
names. ``source`` is a contiguous CPU tensor, a ``torch.UntypedStorage`` or a bytes-like object.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from . import with_article

from .layout import DTYPE_NAMES, WEIGHTS_METADATA

MAX_SHARDS = 4
# Below this many bytes a shard's thread costs more than it saves.
SHARD_MIN_BYTES = 64 * 1024 * 1024
_WRITE_CHUNK = 256 * 1024 * 1024  # Linux writes at most ~2 GiB per call
_USE_OBJECT = 'Use returns="object" to get the object itself.'

Part = tuple[str, str, list[int], int, Any]


class NotWeights(Exception):
    """The result is not an nn.Module or a flat mapping of str to tensors (or holds none)."""


def collect_tensors(result: Any) -> dict[str, Any]:
    """The tensors to send: an nn.Module's state_dict(), or a flat mapping of str to tensors."""
    torch = sys.modules.get("torch")
    if torch is None:
        raise NotWeights(f'The entrypoint returned {type(result).__name__}, which holds no tensors. {_USE_OBJECT}')
    if isinstance(result, torch.nn.Module):
        tensors = result.state_dict()
    elif isinstance(result, Mapping):
        tensors = result
    else:
        raise NotWeights(
            f"The entrypoint returned {type(result).__name__}; returns=\"weights\" needs an nn.Module "
            f"or a mapping of str to torch.Tensor. {_USE_OBJECT}"
        )
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise NotWeights(f"Tensor names must be str, not {type(name).__name__} ({name!r}). {_USE_OBJECT}")
        if not isinstance(value, torch.Tensor):
            raise NotWeights(f"{name!r} is {with_article(type(value).__name__)}, not a tensor (no nesting). {_USE_OBJECT}")
    if not tensors:
        raise NotWeights(f"The entrypoint's result holds no tensors. {_USE_OBJECT}")
    return dict(tensors)


def weights_parts(tensors: Mapping[str, Any]) -> list[Part]:
    """One part per tensor, in the caller's order (the decoder keeps it)."""
    parts = []
    for name, tensor in tensors.items():
        try:
            t, dtype_name = prepare_tensor(tensor)
        except Unsendable as exc:
            raise NotWeights(f"{name!r} {exc}" + ("" if exc.final else f". {_USE_OBJECT}")) from None
        parts.append((name, dtype_name, list(t.shape), t.element_size(), t))
    return parts


class Unsendable(ValueError):
    """A tensor the layout cannot carry; the message says why, after the tensor's name."""

    def __init__(self, reason: str, final: bool = False) -> None:
        super().__init__(reason)
        self.final = final  # no other mode would carry it either (a meta tensor has no data)


def prepare_tensor(tensor: Any) -> tuple[Any, str]:
    """(a dense, contiguous CPU tensor with the same values, its layout dtype name), or raise Unsendable.

    Shared by the weights encoder and the value codec (``values.py``), so both carry the same tensors.
    """
    import torch

    # Cheapest checks first: remote calls pay this per tensor (quantized dtypes are not in the table).
    t = tensor.detach() if tensor.requires_grad else tensor
    name = _dtype_names(torch).get(t.dtype)
    if name is None:
        dtype = str(t.dtype).removeprefix("torch.")
        if t.is_complex():
            raise Unsendable(f"is complex ({dtype}); use torch.view_as_real")
        raise Unsendable(f"has dtype {dtype}, which the weights format does not carry")
    if t.layout != torch.strided:
        raise Unsendable(f"is not a dense tensor ({t.layout})")
    if not t.is_cpu:
        if t.is_meta:
            raise Unsendable("is on the meta device and has no data.", final=True)
        t = t.to("cpu")
    if t.dtype is torch.bool:
        t = t.ne(False)  # canonical 0/1 bytes, whatever the storage held
    # Each tensor gets its own contiguous bytes, even when several share one storage (views).
    return (t if t.is_contiguous() else t.contiguous()), name


@functools.lru_cache(maxsize=1)
def _dtype_names(torch: Any) -> dict[Any, str]:
    """torch dtype -> the format's dtype name (DTYPE_NAMES keyed by the dtype objects)."""
    return {getattr(torch, torch_name): name for torch_name, name in DTYPE_NAMES.items()}


def plan(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[tuple[Any, int]], int]:
    """A weights result as one shard: (header with its length prefix, [(source, offset)], total size)."""
    return lay_out(weights_parts(tensors), metadata or WEIGHTS_METADATA)


def lay_out(parts: list[Part], metadata: Mapping[str, str]) -> tuple[bytes, list[tuple[Any, int]], int]:
    """Lay parts out in one shard: (header with its length prefix, [(source, file offset)], total size)."""
    # Largest alignment first, then by name: every offset is then a multiple of its alignment.
    order = sorted(parts, key=lambda p: (-p[3], p[0]))
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for name, _, _, _, source in order:
        offsets[name] = (position, position + nbytes(source))
        position = offsets[name][1]
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    for name, dtype, shape, _, _ in parts:  # the caller's order, which the decoder keeps
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": list(offsets[name])}
    body = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # safetensors pads the header so the data starts 8-aligned
    head = len(body).to_bytes(8, "little") + body
    placed = [(source, len(head) + offsets[name][0]) for name, _, _, _, source in order]
    return head, placed, len(head) + position


def split(parts: list[Part], count: int) -> list[list[Part]]:
    """Cut the parts, in order, into at most ``count`` runs of about equal bytes (the shards)."""
    total = sum(nbytes(p[4]) for p in parts)
    shards: list[list[Part]] = [[]]
    filled = 0
    for part in parts:
        if shards[-1] and len(shards) < count and filled >= total * len(shards) / count:
            shards.append([])
        shards[-1].append(part)
        filled += nbytes(part[4])
    return shards


def shard_count(parts: list[Part]) -> int:
    """How many shards to write in parallel: a thread per core, each with enough bytes to be worth it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except OSError:
        cores = 1
    total = sum(nbytes(p[4]) for p in parts)
    return max(1, min(MAX_SHARDS, cores, len(parts), total // SHARD_MIN_BYTES))


def encode_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """A weights result as bytes (tests)."""
    return bytes(parts_to_bytes(weights_parts(tensors), metadata or WEIGHTS_METADATA))


def parts_to_bytes(parts: list[Part], metadata: Mapping[str, str]) -> bytearray:
    """One shard in memory (the inline fallback, tests)."""
    head, placed, total = lay_out(parts, metadata)
    out = bytearray(total)
    with memoryview(out) as view:
        view[: len(head)] = head
        for source, offset in placed:
            with raw_view(source) as raw:
                view[offset : offset + len(raw)] = raw
    return out


def parts_to_memfds(parts: list[Part], metadata: Mapping[str, str], count: int | None = None) -> list[tuple[int, int]]:
    """Write the parts as sealed memfds, one shard each, in parallel; returns [(fd, size)].

    The caller sends then closes the fds.
    """
    layouts = [lay_out(shard, metadata) for shard in split(parts, shard_count(parts) if count is None else count)]
    return write_memfds(layouts)


def encode_shards(parts: list[Part], metadata: Mapping[str, str]) -> tuple[dict[str, Any], list[Any], list[int]]:
    """A weights result as a frame's content: ({"transport", "sizes"}, buffers, fds).

    Sealed memfds where the machine has them; else one inline buffer (a sandbox without memfds).
    """
    try:
        shards = parts_to_memfds(parts, metadata)
    except OSError:
        payload = parts_to_bytes(parts, metadata)
        return {"transport": "inline", "sizes": [len(payload)]}, [payload], []
    return {"transport": "memfd", "sizes": [size for _, size in shards]}, [], [fd for fd, _ in shards]


def write_memfds(layouts: list[tuple[bytes, list[tuple[Any, int]], int]], name: str = "safehub-result") -> list[tuple[int, int]]:
    """One sealed memfd per layout ``(head, [(source, offset)], total size)``, written in parallel.

    Returns [(fd, size)]; the caller sends then closes them. One file per thread: writes to one
    tmpfs file take its inode lock, so several threads on one file go no faster than one.
    """
    fds: list[int] = []
    errors: list[BaseException] = []
    try:
        for _ in layouts:
            fds.append(os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC))
        jobs = [(fd, *layout, errors) for fd, layout in zip(fds, layouts, strict=True)]
        threads = [threading.Thread(target=_write_shard, args=job, daemon=True) for job in jobs[1:]]
        for thread in threads:
            thread.start()
        _write_shard(*jobs[0])  # this thread writes the first shard itself
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for fd in fds:
            seal(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return [(fd, total) for fd, (_, _, total) in zip(fds, layouts, strict=True)]


def _write_shard(fd: int, head: bytes, placed: list[tuple[Any, int]], total: int, errors: list[BaseException]) -> None:
    try:
        os.ftruncate(fd, total)
        # pwrite, not a shared mapping: the kernel copies into fresh pages without zeroing them first.
        _pwrite_all(fd, memoryview(head), 0)
        for source, offset in placed:
            with raw_view(source) as raw:
                _pwrite_all(fd, raw, offset)
    except BaseException as exc:
        errors.append(exc)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + _WRITE_CHUNK], offset + done)


def nbytes(source: Any) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).nbytes
    torch = sys.modules["torch"]
    if isinstance(source, torch.UntypedStorage):
        return source.nbytes()
    return source.numel() * source.element_size()


def raw_view(source: Any) -> memoryview:
    """The source's bytes as a memoryview, without a copy. The source must stay alive meanwhile."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).cast("B")
    size = nbytes(source)
    if size == 0:
        return memoryview(b"")
    # torch exports no buffer; its contiguous CPU memory is read in place through its address.
    return memoryview((ctypes.c_char * size).from_address(source.data_ptr())).cast("B")


def seal(fd: int) -> None:
    import fcntl

    # Sealed, the bytes the parent validates are the bytes it uses: the worker can no longer change them.
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
