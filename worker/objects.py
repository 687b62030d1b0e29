"""Pickle an object result in the worker: its structure through cloudpickle, its tensors' bytes beside it.

The way ``torch.save`` does it: a pickler whose ``persistent_id`` catches torch storages. Each
CPU storage becomes a reference ``("storage", key, dtype)`` in the pickle, and its bytes one part
of the result's layout (``weights.py``), once however many tensors share it (tied weights,
views), so sharing survives the trip. Other storages (another device, a dtype outside the
allow-list) pickle as usual. The parent's side is ``decode_object`` in ``safehub/_results.py``.

TorchScript cannot be pickled at all (``ScriptFunction cannot be pickled``), yet repositories
keep it in what they return: gen-efficientnet's module-level ``@torch.jit.script`` activations,
reached through the globals of the classes cloudpickle sends by value, scripted submodules,
traced models. Each ``torch.jit.ScriptModule`` or ``ScriptFunction`` becomes a reference
``("torchscript", key)`` and its ``torch.jit.save`` archive (code and weights together) one part,
once however often it is referenced. Standard library, torch and cloudpickle only.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping
from typing import Any

from .layout import OBJECT_METADATA as OBJECT_METADATA, PICKLE_ENTRY as PICKLE_PART  # OBJECT_METADATA: re-exported for the encoders


def dumps(value: Any, dtype_names: Mapping[str, str]) -> list[tuple[str, str, list[int], int, Any]]:
    """The parts of an object result: one per storage or TorchScript archive (keys "0", "1", ...,
    numbered together in the order met), then the pickle.

    ``dtype_names`` maps torch dtype names to the format's (the allow-list). A part is
    ``(name, "U8", [nbytes], alignment, source)``: storages are untyped bytes, aligned for the
    largest item size any reference reads them with.
    """
    import cloudpickle

    torch: Any = sys.modules.get("torch")  # no torch imported: no tensor can be in the value
    storages: dict[int, list[Any]] = {}  # the storage's C pointer -> [key, storage, alignment]
    scripts: dict[int, tuple[str, Any, Any]] = {}  # id(script) -> (key, script kept alive, archive)

    def next_key() -> str:
        return str(len(storages) + len(scripts))

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle ships no types
        def persistent_id(self, obj: Any) -> tuple[str, ...] | None:
            if isinstance(obj, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
                if id(obj) not in scripts:
                    archive = io.BytesIO()
                    # jit's own format: the compiled code and the module's tensors, no Python.
                    torch.jit.save(obj, archive)
                    scripts[id(obj)] = (next_key(), obj, archive.getbuffer())
                return ("torchscript", scripts[id(obj)][0])
            if isinstance(obj, torch.storage.TypedStorage):
                storage, dtype = obj._untyped_storage, obj.dtype
            elif isinstance(obj, torch.UntypedStorage):
                storage, dtype = obj, torch.uint8  # how torch pickles the newer dtypes (uint16, float8)
            else:
                return None
            name = dtype_names.get(str(dtype).removeprefix("torch."))
            if name is None or storage.device.type != "cpu" or storage.nbytes() % dtype.itemsize:
                return None
            if dtype is torch.bool and storage.nbytes() and _bytes(torch, storage).max() > 1:
                return None  # bytes other than 0/1: the parent refuses them out of band
            if storage._cdata not in storages:
                storages[storage._cdata] = [next_key(), storage, 1]
            entry = storages[storage._cdata]
            entry[2] = max(entry[2], dtype.itemsize)
            return ("storage", entry[0], name)

    out = io.BytesIO()
    (Pickler if torch is not None else cloudpickle.Pickler)(out, protocol=5).dump(value)
    pickled = out.getbuffer()
    parts = [(key, "U8", [storage.nbytes()], align, storage) for key, storage, align in storages.values()]
    parts += [(key, "U8", [archive.nbytes], 1, archive) for key, _, archive in scripts.values()]
    return parts + [(PICKLE_PART, "U8", [pickled.nbytes], 1, pickled)]


def _bytes(torch: Any, storage: Any) -> Any:
    return torch.empty(0, dtype=torch.uint8).set_(storage)
