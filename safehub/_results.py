"""Decoding a worker's result in the parent: weights as data, objects through cloudpickle.

The layout (the one place it is described; the worker's encoders are ``worker/weights.py``
and ``worker/objects.py``, the shared names ``worker/layout.py``, and ``tests/unit/test_results_decode.py`` pins them with golden
bytes). A result is one or more shards, each in the safetensors layout, so that
``safetensors.torch.load`` reads every shard too::

    8 bytes    N, the header length, unsigned little-endian
    N bytes    a JSON object, UTF-8, padded with spaces to a multiple of 8:
               {"__metadata__": {str: str},                       (optional)
                name: {"dtype": D, "shape": [int, ...], "data_offsets": [begin, end]}, ...}
    the rest   the entries' bytes, C order, little-endian; offsets count from the end of the header

D is one of F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL. As in safetensors, the byte ranges are
disjoint and together cover the data exactly, with no gap and nothing after the last one. The
encoder lays entries out by alignment, largest first, so every offset is aligned; the decoder
copies a weights tensor whose offset is not. A name appears in one shard only, and the shards'
headers, in order, list the entries in the result's order. The worker writes its shards in
parallel, one sealed memfd each.

weights  ``"format": "pt"`` (any metadata is accepted, as from safetensors): one entry per
         tensor, parsed here as data and never unpickled.
object   ``"format": "safehub-object"`` in every shard, and every entry U8 of one dimension: one
         entry per torch storage, named by its key ("0", "1", ...), and one named "pickle", the
         object's structure pickled by cloudpickle (repository modules by value) in which each
         storage is the persistent id ("storage", key, D): D is the dtype a tensor reads it
         with, and the storage's size and address are multiples of D's item size. Unpickling
         rebuilds each storage once, as a view on its bytes, so tensors that shared a storage in
         the worker (tied weights, views) share it here. TorchScript, which does not pickle
         (a ``torch.jit.ScriptModule``, including a traced one, or a ``ScriptFunction``), is the
         persistent id ("torchscript", key) and its entry the ``torch.jit.save`` archive (a zip
         of its compiled code and its own tensors); keys number storages and archives together.
         Each archive is read with ``torch.jit.load`` once and comes back as a ScriptModule (a
         function as one whose ``forward`` it is; torch's own saving drops its default
         arguments). Its weights are copies, shared with nothing outside it.

Buffers are private (copy-on-write) mappings of the worker's sealed memfds: tensors are views on
them, no copy is made, the caller may write them, and a mapping lives as long as any tensor on
it. An object result *is* unpickled, which runs code the repository chose: that is why
``returns="object"`` needs trust (DESIGN 2); its storage references are still checked like
everything else the worker sends. Loading its TorchScript runs the repository's compiled code
too, which needs no trust beyond that pickle's; a malformed archive is a ResultDecodeError.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import TYPE_CHECKING, Any

from ._worker.layout import DTYPES, OBJECT_FORMAT, PICKLE_ENTRY
from ._worker.protocol import count_nodes, strict_json_loads
from .errors import ResultDecodeError
from ._worker import with_article

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
# JSON nodes in one header, counted before it is parsed (~80 bytes each to the parser): 2 M
# allow 200,000 tensors of 4 dimensions in one shard.
MAX_HEADER_NODES = 2_000_000
MAX_TENSORS = 1_000_000
MAX_TOTAL_BYTES = 1024**4
MAX_NAME_CHARS = 4096
MAX_NDIM = 64

def decode_weights(
    data: Any,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int = MAX_TENSORS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> dict[str, torch.Tensor]:
    """Parse a weights result (module docstring) into tensors, strictly, without pickle.

    ``data`` is a buffer (bytes, bytearray, mmap), or a list of them: the shards of one result.
    A writable buffer is shared: the tensors are views on it and keep it alive. A read-only one
    is copied first. Raises :class:`ResultDecodeError` for anything that is not a valid result.
    """
    tensors: dict[str, torch.Tensor] = {}
    for buffer, base, _, entries in _parse_shards(data, max_header_bytes, max_tensors, max_total_bytes):
        try:
            tensors.update(_build_tensors(buffer, base, entries))
        except ResultDecodeError:
            raise
        except (RuntimeError, ValueError, OverflowError) as exc:
            # torch's own refusals (a shape it cannot represent): still only a decode error.
            raise ResultDecodeError(f"weights could not be built: {exc}") from None
    return tensors


def decode_object(
    data: Any,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int = MAX_TENSORS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> Any:
    """Rebuild an object result (module docstring). Runs the repository's code: trusted calls only.

    ``data`` is as for :func:`decode_weights`. Storages are views on it, never copies. Raises
    :class:`ResultDecodeError` for a malformed layout, a bad storage reference, or a pickle
    that fails.
    """
    places: dict[str, tuple[Any, int, int]] = {}
    pickled = None
    for buffer, base, metadata, entries in _parse_shards(data, max_header_bytes, max_tensors, max_total_bytes):
        if metadata.get("format") != OBJECT_FORMAT:
            raise ResultDecodeError(f"the worker's object result is not marked {OBJECT_FORMAT!r}")
        for name, dtype, shape, begin, end in entries:
            if dtype != "U8" or len(shape) != 1:
                raise ResultDecodeError(f"object entry {name!r}: must be U8 bytes of one dimension")
            if name == PICKLE_ENTRY:
                with memoryview(buffer) as view:
                    pickled = bytes(view[base + begin : base + end])  # the structure only: small
            else:
                places[name] = (buffer, base + begin, end - begin)
    if pickled is None:
        raise ResultDecodeError(f"the worker's object result has no {PICKLE_ENTRY!r} entry")
    try:
        return _StorageUnpickler(io.BytesIO(pickled), places).load()
    except ResultDecodeError:
        raise
    except Exception as exc:
        raise ResultDecodeError(f"could not unpickle the worker's object: {type(exc).__name__}: {exc}") from exc


class _StorageUnpickler(pickle.Unpickler):
    """cloudpickle's unpickling, with each storage reference resolved to a view on the result's
    bytes and each TorchScript reference to what ``torch.jit.load`` makes of its archive."""

    def __init__(self, stream: io.BytesIO, places: dict[str, tuple[Any, int, int]]) -> None:
        super().__init__(stream)
        self.places = places
        self.storages: dict[str, Any] = {}  # one per key, so that sharing survives
        self.scripts: dict[str, Any] = {}  # likewise one script module per archive
        self.bools_checked: set[str] = set()

    def persistent_load(self, pid: Any) -> Any:
        import torch

        if type(pid) is tuple and len(pid) == 2 and pid[0] == "torchscript":
            return self._torchscript(torch, pid[1])
        if type(pid) is not tuple or len(pid) != 3 or pid[0] != "storage":
            raise ResultDecodeError(f"the object's pickle holds an unknown reference ({_describe(pid)})")
        _, key, dtype_name = pid
        if type(key) is not str or key not in self.places:
            raise ResultDecodeError(f"the object's pickle refers to storage {_describe(key)}, which the result does not hold")
        if type(dtype_name) is not str or dtype_name not in DTYPES:
            raise ResultDecodeError(f"storage {key!r}: dtype {_describe(dtype_name)} is not one of {sorted(DTYPES)}")
        buffer, offset, size = self.places[key]
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _storage_view(torch, buffer, offset, size)
        itemsize = DTYPES[dtype_name][1]
        if size % itemsize or storage.data_ptr() % itemsize:
            raise ResultDecodeError(f"storage {key!r} of {size} bytes is not sized and aligned for {dtype_name} items")
        if dtype_name == "BOOL" and key not in self.bools_checked:
            if size and int(torch.empty(0, dtype=torch.uint8).set_(storage).max()) > 1:
                raise ResultDecodeError(f"storage {key!r}: BOOL bytes must be 0 or 1")
            self.bools_checked.add(key)
        return torch.storage.TypedStorage(  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            wrap_storage=storage, dtype=getattr(torch, DTYPES[dtype_name][0]), _internal=True)

    def _torchscript(self, torch: Any, key: Any) -> Any:
        """The script module or function saved as archive ``key``, loaded once however often it is referenced."""
        if type(key) is not str or key not in self.places:
            raise ResultDecodeError(f"the object's pickle refers to TorchScript archive {_describe(key)}, which the result does not hold")
        script = self.scripts.get(key)
        if script is None:
            buffer, offset, size = self.places[key]
            # From a file object torch.jit.load holds the whole archive twice (read(), then a C++
            # copy) while it builds the tensors; from a path it reads each record straight into
            # its tensor. So the archive is copied once, into a memfd of ours, and loaded by its
            # /proc path: the parent's peak is the weights twice over instead of three times.
            fd = os.memfd_create("safehub-torchscript", os.MFD_CLOEXEC)
            try:
                with memoryview(buffer) as view:
                    _write_all(fd, view[offset : offset + size])
                # No device the worker could name: it had only the CPU.
                script = self.scripts[key] = torch.jit.load(f"/proc/self/fd/{fd}", map_location="cpu")
            except Exception as exc:
                first_line = str(exc).strip().split("\n")[0][:200]
                raise ResultDecodeError(f"TorchScript archive {key!r} could not be loaded: {type(exc).__name__}: {first_line}") from None
            finally:
                os.close(fd)
        return script


def _write_all(fd: int, data: memoryview) -> None:
    with data:
        written = 0
        while written < len(data):  # Linux writes at most ~2 GiB per call
            written += os.write(fd, data[written : written + (1 << 30)])


def _storage_view(torch: Any, buffer: Any, offset: int, size: int) -> Any:
    if size == 0:
        return torch.UntypedStorage(0)
    # frombuffer keeps the buffer (the mapping) alive for as long as the storage lives.
    return torch.frombuffer(buffer, dtype=torch.uint8, count=size, offset=offset).untyped_storage()


def _describe(value: Any) -> str:
    # Never repr an arbitrary object here: its __repr__ would be the worker's code.
    return repr(value)[:80] if type(value) in (str, int) else with_article(type(value).__name__)


def _parse_shards(
    data: Any, max_header_bytes: int, max_tensors: int, max_total_bytes: int
) -> list[tuple[Any, int, dict[str, str], list[tuple[str, str, list[int], int, int]]]]:
    """[(buffer, where its data starts, metadata, entries)] for each shard, checked together."""
    shards = list(data) if isinstance(data, (list, tuple)) else [data]
    if not shards:
        raise ResultDecodeError("a result of no shards")
    parsed = []
    names: set[str] = set()
    total = 0
    for shard in shards:
        with memoryview(shard) as probe:
            buffer = bytearray(probe) if probe.readonly else shard
        with memoryview(buffer) as raw, raw.cast("B") as view:
            header_len, metadata, entries = _parse_weights_header(view, max_header_bytes, max_tensors, max_total_bytes)
            total += len(view) - 8 - header_len
        for name, *_ in entries:
            if name in names:
                raise ResultDecodeError(f"tensor {name!r} appears in two shards")
            names.add(name)
        if len(names) > max_tensors or total > max_total_bytes:
            raise ResultDecodeError(f"the shards together pass the cap of {max_tensors} tensors or {max_total_bytes} bytes")
        parsed.append((buffer, 8 + header_len, metadata, entries))
    return parsed


def _parse_weights_header(
    view: memoryview, max_header_bytes: int, max_tensors: int, max_total_bytes: int, max_header_nodes: int = MAX_HEADER_NODES
) -> tuple[int, dict[str, str], list[tuple[str, str, list[int], int, int]]]:
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
    raw = bytes(view[8 : 8 + header_len])
    nodes = count_nodes(raw)
    if nodes > max_header_nodes:
        raise ResultDecodeError(f"weights header of {nodes} JSON nodes, more than the cap of {max_header_nodes}")
    try:
        header = strict_json_loads(raw.decode("utf-8"))
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
    return header_len, metadata, entries


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


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63


