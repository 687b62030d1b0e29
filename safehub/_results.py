"""Decoding a worker's result in the parent: weights as data, objects through cloudpickle.

The weights format (the one place it is described; the worker's encoder is
``safehub/_worker/weights.py``, and ``tests/unit/test_results_decode.py`` pins both with golden
bytes). It is the safetensors layout, so ``safetensors.torch.load`` reads it too::

    8 bytes    N, the header length, unsigned little-endian
    N bytes    a JSON object, UTF-8, padded with spaces to a multiple of 8:
               {"__metadata__": {str: str},                       (optional)
                name: {"dtype": D, "shape": [int, ...], "data_offsets": [begin, end]}, ...}
    the rest   the tensors' bytes, C order, little-endian; offsets count from the end of the header

D is one of F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL. As in safetensors, the byte ranges are
disjoint and together cover the data exactly, with no gap and nothing after the last one. The
encoder lays tensors out by item size, largest first, so every offset is aligned; the decoder
copies a tensor whose offset is not.

A weights result is parsed here as data and never unpickled. An object result *is* unpickled,
which runs code the repository chose: that is why ``returns="object"`` needs trust (DESIGN 2).
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import stat
import sys
from typing import TYPE_CHECKING, Any

from .errors import ResultDecodeError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_TOTAL_BYTES = 1024**4
MAX_NAME_CHARS = 4096
MAX_NDIM = 64

# dtype name -> (torch attribute, item size in bytes)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def map_sealed_memfd(fd: int, *, max_bytes: int = MAX_TOTAL_BYTES) -> mmap.mmap:
    """Map a sealed memfd from the worker privately (copy-on-write). The caller still owns ``fd``.

    The seals are checked first: without them the worker could change the bytes after they were
    validated (a time-of-check/time-of-use race on the shared pages).
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        info = os.fstat(fd)
    except OSError as exc:
        raise ResultDecodeError(f"the worker's result is not a sealed memfd: {exc}") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ResultDecodeError(f"the worker's memfd is not sealed against writes (seals {seals:#x})")
    if not stat.S_ISREG(info.st_mode) or not 0 < info.st_size <= max_bytes:
        raise ResultDecodeError(f"the worker's memfd has an unacceptable size ({info.st_size} bytes)")
    # Before 3.13 the mapping keeps a dup of the fd for its lifetime; from 3.13 on it need not.
    extra = {"trackfd": False} if sys.version_info >= (3, 13) else {}
    # MAP_PRIVATE: tensors built on it are writable in the parent without touching the worker's pages.
    return mmap.mmap(fd, info.st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, **extra)


def decode_weights(
    data: Any,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int = MAX_TENSORS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> dict[str, torch.Tensor]:
    """Parse the weights format (module docstring) into tensors, strictly, without pickle.

    ``data`` is any buffer (bytes, bytearray, mmap). A writable buffer is shared: the tensors
    are views on it and keep it alive. A read-only one is copied first. Raises
    :class:`ResultDecodeError` for anything that is not a valid file in the format.
    """
    with memoryview(data) as probe:
        buffer = bytearray(probe) if probe.readonly else data
    with memoryview(buffer) as raw, raw.cast("B") as view:
        header_len, entries = _parse_weights_header(view, max_header_bytes, max_tensors, max_total_bytes)
    try:
        return _build_tensors(buffer, 8 + header_len, entries)
    except ResultDecodeError:
        raise
    except (RuntimeError, ValueError, OverflowError) as exc:
        # torch's own refusals (a shape it cannot represent): still only a decode error.
        raise ResultDecodeError(f"weights could not be built: {exc}") from None


def _parse_weights_header(
    view: memoryview, max_header_bytes: int, max_tensors: int, max_total_bytes: int
) -> tuple[int, list[tuple[str, str, list[int], int, int]]]:
    if len(view) < 8:
        raise ResultDecodeError(f"weights of {len(view)} bytes: too short for a header length")
    header_len = int.from_bytes(view[:8], "little")
    if header_len > max_header_bytes:
        raise ResultDecodeError(f"weights header of {header_len} bytes, more than the cap of {max_header_bytes}")
    if 8 + header_len > len(view):
        raise ResultDecodeError(f"weights header of {header_len} bytes runs past the {len(view)}-byte buffer")
    data_len = len(view) - 8 - header_len
    if data_len > max_total_bytes:
        raise ResultDecodeError(f"weights of {data_len} bytes, more than the cap of {max_total_bytes}")
    try:
        header = json.loads(
            bytes(view[8 : 8 + header_len]).decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise ResultDecodeError(f"malformed weights header: {exc}") from None
    if not isinstance(header, dict):
        raise ResultDecodeError("the weights header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ResultDecodeError("weights __metadata__ must map str to str")
    if len(header) > max_tensors:
        raise ResultDecodeError(f"{len(header)} tensors, more than the cap of {max_tensors}")
    entries = [_check_entry(name, info) for name, info in header.items()]
    _check_layout(entries, data_len)
    return header_len, entries


def _check_entry(name: str, info: Any) -> tuple[str, str, list[int], int, int]:
    if len(name) > MAX_NAME_CHARS:
        raise ResultDecodeError(f"tensor name of {len(name)} characters, more than {MAX_NAME_CHARS}")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ResultDecodeError(f"tensor {name!r}: needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ResultDecodeError(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_count(d) for d in shape):
        raise ResultDecodeError(f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} non-negative ints")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ResultDecodeError(f"tensor {name!r}: data_offsets must be [begin, end], non-negative ints")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if begin > end or numel * DTYPES[dtype][1] != end - begin:
        raise ResultDecodeError(f"tensor {name!r}: shape {shape} of {dtype} does not fit offsets [{begin}, {end}]")
    return name, dtype, shape, begin, end


def _check_layout(entries: list[tuple[str, str, list[int], int, int]], data_len: int) -> None:
    """Like safetensors: ranges back to back from 0 to the end, so no byte is shared or hidden."""
    position = 0
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != position:
            problem = "overlaps the previous one" if begin < position else "leaves a gap before it"
            raise ResultDecodeError(f"tensor {name!r}: byte range [{begin}, {end}] {problem}")
        position = end
    if position != data_len:
        raise ResultDecodeError(f"the tensors cover {position} bytes of the {data_len}-byte data section")


def _build_tensors(
    buffer: Any, base: int, entries: list[tuple[str, str, list[int], int, int]]
) -> dict[str, torch.Tensor]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, dtype_name, shape, begin, end in entries:
        dtype = getattr(torch, DTYPES[dtype_name][0])
        itemsize = DTYPES[dtype_name][1]
        nbytes = end - begin
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=base + begin)
        if dtype is torch.bool and int(raw.max()) > 1:
            # A bool byte other than 0 or 1 is undefined behaviour in torch's kernels.
            raise ResultDecodeError(f"tensor {name!r}: BOOL bytes must be 0 or 1")
        if (base + begin) % itemsize:
            raw = raw.clone()  # unaligned in the buffer: a fresh, aligned copy
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def decode_object(payload: Any) -> Any:
    """Unpickle an object result with cloudpickle. Runs the repository's code: trusted calls only."""
    import cloudpickle

    try:
        return cloudpickle.loads(payload)
    except Exception as exc:
        raise ResultDecodeError(f"could not unpickle the worker's object: {type(exc).__name__}: {exc}") from exc


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
