"""Encode a weights result in the worker: tensors only, in the safetensors layout.

The format is described once, in the docstring of ``safehub/_results.py`` (the parent's decoder);
golden-bytes tests pin this encoder to it. Standard library and torch only; torch is imported
lazily, and a result cannot hold tensors when the repository never imported torch.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from collections.abc import Mapping
from typing import Any

# torch dtype name -> format dtype name.
DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_USE_OBJECT = 'Use returns="object" to get the object itself.'


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
            raise NotWeights(f"{name!r} is a {type(value).__name__}, not a tensor (no nesting). {_USE_OBJECT}")
    if not tensors:
        raise NotWeights(f"The entrypoint's result holds no tensors. {_USE_OBJECT}")
    return dict(tensors)


def plan(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[tuple[Any, int]], int]:
    """Lay tensors out: (header with its length prefix, [(contiguous cpu tensor, file offset)], total size)."""
    prepared = {name: _prepare(name, t) for name, t in tensors.items()}
    # Largest item size first, then by name: every offset is then a multiple of its item size.
    order = sorted(prepared, key=lambda n: (-prepared[n].element_size(), n))
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for name in order:
        size = prepared[name].numel() * prepared[name].element_size()
        offsets[name] = (position, position + size)
        position += size
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    for name, t in prepared.items():  # the caller's order, which the decoder keeps
        header[name] = {
            "dtype": DTYPE_NAMES[str(t.dtype).removeprefix("torch.")],
            "shape": list(t.shape),
            "data_offsets": list(offsets[name]),
        }
    body = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # safetensors pads the header so the data starts 8-aligned
    head = len(body).to_bytes(8, "little") + body
    placed = [(prepared[name], len(head) + offsets[name][0]) for name in order]
    return head, placed, len(head) + position


def _prepare(name: str, tensor: Any) -> Any:
    import torch

    t = tensor.detach()
    dtype = str(t.dtype).removeprefix("torch.")
    if t.is_complex():
        raise NotWeights(f"{name!r} is complex ({dtype}); use torch.view_as_real, or {_USE_OBJECT}")
    if dtype not in DTYPE_NAMES:
        raise NotWeights(f"{name!r} has dtype {dtype}, which the weights format does not carry. {_USE_OBJECT}")
    if t.layout != torch.strided or t.is_quantized:
        raise NotWeights(f"{name!r} is not a dense tensor ({t.layout}). {_USE_OBJECT}")
    if t.device.type == "meta":
        raise NotWeights(f"{name!r} is on the meta device and has no data.")
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.dtype is torch.bool:
        t = t.ne(False)  # canonical 0/1 bytes, whatever the storage held
    # Each tensor gets its own contiguous bytes, even when several share one storage (views).
    return t.contiguous()


def write_into(buffer: Any, head: bytes, placed: list[tuple[Any, int]]) -> None:
    """Copy the header and every tensor's bytes into a writable buffer of the planned size."""
    import torch

    with memoryview(buffer) as view:
        view[: len(head)] = head
    for tensor, offset in placed:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            continue
        dst = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset)
        dst.copy_(tensor.reshape(-1).view(torch.uint8))
        # torch does not hold a buffer export: drop the view before the caller unmaps the buffer.
        del dst


def encode_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """The whole file as bytes (tests and the inline fallback)."""
    head, placed, total = plan(tensors, metadata)
    out = bytearray(total)
    write_into(out, head, placed)
    return bytes(out)


def encode_to_memfd(tensors: Mapping[str, Any]) -> tuple[int, int]:
    """Write the file into a sealed memfd; returns (fd, size). The caller sends then closes fd."""
    head, placed, total = plan(tensors)
    fd = os.memfd_create("safehub-weights", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, total)
        with mmap.mmap(fd, total) as mapped:
            write_into(mapped, head, placed)
        seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, total


def bytes_to_memfd(payload: bytes, name: str = "safehub-object") -> int:
    """Copy bytes into a sealed memfd; returns the fd."""
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal(fd: int) -> None:
    import fcntl

    # Sealed, the bytes the parent validates are the bytes it uses: the worker can no longer change them.
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
