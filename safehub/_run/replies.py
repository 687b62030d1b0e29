"""The worker's final answer, read as hostile data: a value, or the safehub error it stands for.

The one place where the worker's RESULT and ERROR frames become return values and exceptions
(``protocol.py`` declares their fields; this module checks what they mean). Nothing in a reply
is executed, except the unpickling of an object result, which needs trust (DESIGN 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import _terminal
from .._limit_errors import known_limit, limit_error
from .._memfds import map_sealed_memfds
from .._results import decode_object, decode_weights
from .._sandbox import Sandbox
from .._worker import hubconf as _hubconf
from .._worker import protocol
from ..errors import (
    EntrypointNotFoundError,
    HubconfError,
    HubconfNotFoundError,
    MissingDependenciesError,
    ProtocolError,
    RemoteError,
    ResultDecodeError,
    SafeHubError,
    SandboxError,
)

MAX_PAYLOAD_BYTES = 1024**4  # a memfd is mapped lazily: this only bounds the address space
MAX_INLINE_BYTES = 2 * 1024**3  # an inline payload is read into memory
MAX_SHARDS = 8  # memfds with one result (the worker writes one per core, at most 4)
_MAX_TEXT = 1024 * 1024


def result_cap(sandbox: Sandbox) -> int:
    """The most bytes one result may hold: what the worker could hold (its ``memory_limit``)."""
    return min(MAX_PAYLOAD_BYTES, sandbox.memory_limit or MAX_PAYLOAD_BYTES)


def interpret(frame: protocol.Frame, action: str, model: str | None, returns: str, repo_dir: Path,
              max_bytes: int = MAX_PAYLOAD_BYTES, sandbox: Any = None) -> Any:
    """Check the reply against the request and decode it; nothing in it is executed but an object result.

    Strings meant to be shown (entrypoint names, a docstring) come with their control characters
    made visible (``_terminal``): a name or docstring can write to no terminal. ``sandbox``: the
    call's, to name a limit it hit with its value."""
    if frame.kind == protocol.ERROR:
        raise _remote_failure(frame.fields, model, repo_dir, sandbox)
    if frame.kind != protocol.RESULT:
        raise ProtocolError(f"the worker sent a {frame.kind!r} frame, expected a result")
    fields = frame.fields
    if fields.get("action") != action:
        raise ProtocolError(f"the worker answered {fields.get('action')!r} to a {action!r} request")
    if action in ("list", "help") and (frame.buffers or frame.fds):
        raise ProtocolError(f"the worker's {action} answer carries unexpected data")
    if action == "list":
        names = fields.get("entrypoints")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ProtocolError("the worker's entrypoint list is not a list of str")
        return [_terminal.visible(name) for name in names]
    if action == "help":
        doc = fields.get("doc")
        if doc is not None and not isinstance(doc, str):
            raise ProtocolError("the worker's docstring is not a str")
        return None if doc is None else _terminal.visible_lines(doc)
    if fields.get("returns") != returns:
        # E.g. a pickle where weights were asked: refused before a byte of it is looked at.
        raise ProtocolError(f"the worker answered returns={fields.get('returns')!r} to returns={returns!r}")
    # Tensors are views on the private mappings, which live as long as they do: never closed here.
    shards = result_shards(frame, max_bytes)
    if returns == "weights":
        return decode_weights(shards)
    return decode_object(shards)


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


def _remote_failure(fields: dict[str, Any], model: str | None, repo_dir: Path, sandbox: Any = None) -> SafeHubError:
    category = fields.get("error")
    message, remote_type = _text(fields.get("message")), _text(fields.get("type"))
    remote_traceback = _text(fields.get("traceback"))
    if category == "hubconf_missing":
        return HubconfNotFoundError(f"No hubconf.py in {repo_dir}", repo_dir=str(repo_dir))
    if category == "hubconf_unreadable":
        return HubconfError(message or f"The sandbox cannot read {repo_dir}", repo_dir=str(repo_dir))
    if category == "missing_dependencies":
        missing = fields.get("missing")
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            return ProtocolError("the worker's list of missing dependencies is not a list of str")
        return MissingDependenciesError(_hubconf.missing_dependencies_message(missing), missing=missing)
    if category == "entrypoint_not_found":
        suggestions = fields.get("suggestions")
        suggestions = [s for s in suggestions[:3] if isinstance(s, str) and s.isidentifier() and len(s) <= 100] \
            if isinstance(suggestions, list) else []
        return EntrypointNotFoundError(_hubconf.entrypoint_not_found_message(str(model), suggestions),
                                       model=model, suggestions=suggestions)
    if category == "exception":
        phase = fields.get("phase")
        where = {
            "import": "hubconf.py raised while being imported",
            "arguments": "the worker could not unpickle the entrypoint's arguments",
            "call": f"the entrypoint {model!r} raised",
        }.get(phase if isinstance(phase, str) else "", "the repository's code raised")
        limit = known_limit(fields.get("limit"))
        if limit and sandbox is not None:
            return limit_error(limit, sandbox, f"{where}: {remote_type}: {message}",
                               remote_type=remote_type, remote_traceback=remote_traceback)
        full = scratch_full(fields.get("sandbox"))
        return RemoteError(
            f"{where}: {remote_type}: {message}" + (f" ({full})" if full else ""),
            remote_type=remote_type,
            remote_traceback=remote_traceback,
        )
    if category == "bad_result":
        return ResultDecodeError(message, remote_type=remote_type, remote_traceback=remote_traceback)
    if category == "sandbox":
        return SandboxError(message, layer=_text(fields.get("layer")))
    return ProtocolError(f"the worker sent an error of unknown category {category!r}")


def _text(value: Any) -> str:
    return value[:_MAX_TEXT] if isinstance(value, str) else ""


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
