"""The parent's side of every conversation with a worker: a request, the worker's questions, one outcome.

Every frame a worker sends back is received here, for a plain call and for each call on a remote
model alike (``protocol.py`` declares the messages; :class:`Exchange` names the three of each)::

    CALL   -> ASK* -> RESULT or ERROR          (:data:`CALL`: list, help, load)
    INVOKE -> ASK* -> RETURNED or FAILED       (:data:`INVOKE`: one call on a remote model)

:func:`converse` sends the request, answers or refuses each question (``_asks.py``), and returns
the final frame; :func:`failure_of` reads a failure once, through one table from the worker's
category to the safehub error it stands for (:data:`FAILURES`), like pyproject-hooks'
``_call_hook`` reading every outcome in one place. A success goes to its decoder (``replies.py``).

Questions come one at a time: a worker asks, then reads the parent's reply before it asks again
(``work.Channel`` holds a lock across both). So a question that arrives while the worker has not
read everything the parent sent it breaks the protocol, as does a call asking more than
:data:`MAX_ASKS` times: the call ends at once with a ProtocolError. The kernel counts the unread
bytes (``SIOCOUTQ``), not the worker, so a worker that floods questions and reads no reply can
never leave the parent blocked on a full socket until the timeout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._asks import AskHandler, Refusal
from .._limit_errors import known_limit, limit_error
from .._worker import hubconf as _hubconf
from .._worker import protocol, values
from ..errors import (
    EntrypointNotFoundError,
    HubconfError,
    HubconfNotFoundError,
    InvalidArgumentError,
    MissingDependenciesError,
    ProtocolError,
    RemoteError,
    ResultDecodeError,
    SafeHubError,
    SandboxError,
)
from .process import Worker
from .replies import MAX_INLINE_BYTES, MAX_SHARDS, scratch_full

MAX_ASKS = 1000  # questions one call (or one call on a remote model) may ask
MAX_TEXT = 1024 * 1024  # characters kept of any text the worker sends (it caps its own far lower)
MAX_REASON = 4096  # characters of a refusal's reason sent to the worker


@dataclass(frozen=True)
class Exchange:
    """One kind of exchange: what the parent sends, the worker's two final replies, their caps."""

    request: str
    success: str
    failure: str
    limits: protocol.Limits

    @property
    def expected(self) -> tuple[str, ...]:
        return (protocol.ASK, self.success, self.failure)


CALL = Exchange(
    protocol.CALL, protocol.RESULT, protocol.ERROR,
    # A list of entrypoints, a report of the sandbox: small.
    protocol.Limits(max_header_bytes=4 * 1024 * 1024, max_header_nodes=100_000, max_buffers=1,
                    max_buffer_bytes=MAX_INLINE_BYTES, max_total_bytes=MAX_INLINE_BYTES, max_fds=MAX_SHARDS),
)
# A remote call's result tree is in its header; the value decoder's caps bound its tensors and bytes.
INVOKE = Exchange(
    protocol.INVOKE, protocol.RETURNED, protocol.FAILED,
    protocol.Limits(max_header_bytes=16 * 1024 * 1024, max_header_nodes=values.Caps().max_nodes, max_buffers=1,
                    max_buffer_bytes=MAX_INLINE_BYTES, max_total_bytes=MAX_INLINE_BYTES, max_fds=protocol.MAX_VALUE_FDS),
)


def converse(
    worker: Worker,
    exchange: Exchange,
    fields: dict[str, Any],
    buffers: Sequence[bytes] = (),
    fds: Sequence[int] = (),
    *,
    asks: Mapping[str, AskHandler],
    refuse_all: str | None = None,
) -> protocol.Frame:
    """Send the request, answer the worker's questions, return its final frame (success or failure).

    Args:
        asks: what the worker may ask for (``what`` -> handler); any other question is refused.
        refuse_all: when given, every question is refused with this reason (a remote model's
            calls may not fetch: the inputs could leave through a URL).

    Raises:
        ProtocolError: a question the protocol does not allow (see the module docstring);
            WorkerTimeoutError, WorkerCrashedError as the channel reports them (``process.py``).
    """
    worker.send(exchange.request, fields, buffers, fds)
    asked = 0
    while True:
        frame = worker.receive(exchange.expected, exchange.limits)
        if frame.kind != protocol.ASK:
            return frame
        if asked == MAX_ASKS:
            raise ProtocolError(f"the worker asked more than {MAX_ASKS} questions in one call")
        if worker.unread_bytes():
            raise ProtocolError("the worker asked again before reading the parent's reply: questions are one at a time")
        _reply(worker, frame.fields, asks, refuse_all)
        asked += 1


def _reply(worker: Worker, question: dict[str, Any], asks: Mapping[str, AskHandler], refuse_all: str | None) -> None:
    """Answer one question, or refuse it with a reason the worker sees."""
    ask_id, what = question["id"], question["what"]
    handler = None if refuse_all is not None else asks.get(what)
    if handler is None:
        reason = refuse_all or f"the parent does not serve {what[:60]!r} requests"
        worker.send(protocol.REFUSE, {"id": ask_id, "reason": reason})
        return
    try:
        value, buffers, fds = handler(question["args"])
    except Refusal as exc:
        worker.send(protocol.REFUSE, {"id": ask_id, "reason": str(exc)[:MAX_REASON]})
        return
    try:
        worker.send(protocol.ANSWER, {"id": ask_id, "value": value}, buffers, fds)
    finally:
        for fd in fds:  # the worker has its copies now
            with contextlib.suppress(OSError):
                os.close(fd)


# -- the failures -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """What a conversation was about, as its errors name it."""

    model: str | None = None  # the entrypoint of a call
    repo_dir: Path | None = None  # the repository of a call
    remote_call: str | None = None  # a call on a remote model, as named in messages: "the model", "encode()"
    remote_whose: str = "the remote model"  # whose code raised, in a remote call: "the remote model's encode()"
    sandbox: Any = None  # the call's Sandbox, to name a limit it hit with its value


@dataclass(frozen=True)
class Failure:
    """One ERROR or FAILED, its text capped (``MAX_TEXT``): what a table entry builds its error from."""

    fields: dict[str, Any]
    subject: Subject

    @property
    def message(self) -> str:
        return _text(self.fields.get("message"))

    @property
    def remote_type(self) -> str:
        return _text(self.fields.get("type"))

    @property
    def remote_traceback(self) -> str:
        return _text(self.fields.get("traceback"))

    @property
    def repo_dir(self) -> str:
        return str(self.subject.repo_dir)


def _hubconf_missing(f: Failure) -> SafeHubError:
    return HubconfNotFoundError(f"No hubconf.py in {f.repo_dir}", repo_dir=f.repo_dir)


def _hubconf_unreadable(f: Failure) -> SafeHubError:
    return HubconfError(f.message or f"The sandbox cannot read {f.repo_dir}", repo_dir=f.repo_dir)


def _missing_dependencies(f: Failure) -> SafeHubError:
    missing = f.fields.get("missing")
    if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        raise ProtocolError("the worker's list of missing dependencies is not a list of str")
    return MissingDependenciesError(_hubconf.missing_dependencies_message(missing), missing=missing)


def _entrypoint_not_found(f: Failure) -> SafeHubError:
    suggestions = f.fields.get("suggestions")
    suggestions = [s for s in suggestions[:3] if isinstance(s, str) and s.isidentifier() and len(s) <= 100] \
        if isinstance(suggestions, list) else []
    return EntrypointNotFoundError(_hubconf.entrypoint_not_found_message(str(f.subject.model), suggestions),
                                   model=f.subject.model, suggestions=suggestions)


_PHASES = {
    "import": "hubconf.py raised while being imported",
    "arguments": "the worker could not unpickle the entrypoint's arguments",
    "call": "the entrypoint {model!r} raised",
}


def _exception(f: Failure) -> Exception:
    limit = known_limit(f.fields.get("limit"))  # the exception is a sandbox limit the code ran into
    if f.subject.remote_call is not None:
        if limit and f.subject.sandbox is not None:
            return limit_error(limit, f.subject.sandbox, f"a call to {f.subject.remote_call} raised {f.remote_type}: {f.message}",
                               remote_type=f.remote_type, remote_traceback=f.remote_traceback)
        message = f"{f.subject.remote_whose} raised {f.remote_type}: {f.message}"
    else:
        phase = f.fields.get("phase")
        where = _PHASES.get(phase if isinstance(phase, str) else "", "the repository's code raised").format(model=f.subject.model)
        if limit and f.subject.sandbox is not None:
            return limit_error(limit, f.subject.sandbox, f"{where}: {f.remote_type}: {f.message}",
                               remote_type=f.remote_type, remote_traceback=f.remote_traceback)
        full = scratch_full(f.fields.get("sandbox"))
        message = f"{where}: {f.remote_type}: {f.message}" + (f" ({full})" if full else "")
    return RemoteError(message, remote_type=f.remote_type, remote_traceback=f.remote_traceback)


def _bad_result(f: Failure) -> SafeHubError:
    return ResultDecodeError(f.message, remote_type=f.remote_type, remote_traceback=f.remote_traceback)


def _sandbox(f: Failure) -> SafeHubError:
    return SandboxError(f.message, layer=_text(f.fields.get("layer")))


def _invalid_call(f: Failure) -> Exception:
    return InvalidArgumentError(f.message)


def _no_attribute(f: Failure) -> Exception:
    return AttributeError(f.message)  # a remote model's attribute read: what Python raises for one it lacks


# The worker's category -> (the failure frames it may come in, the error it stands for).
FAILURES: dict[str, tuple[tuple[str, ...], Callable[[Failure], Exception]]] = {
    "hubconf_missing": ((protocol.ERROR,), _hubconf_missing),
    "hubconf_unreadable": ((protocol.ERROR,), _hubconf_unreadable),
    "missing_dependencies": ((protocol.ERROR,), _missing_dependencies),
    "entrypoint_not_found": ((protocol.ERROR,), _entrypoint_not_found),
    "sandbox": ((protocol.ERROR,), _sandbox),
    "exception": ((protocol.ERROR, protocol.FAILED), _exception),
    "bad_result": ((protocol.ERROR, protocol.FAILED), _bad_result),
    "no_method": ((protocol.FAILED,), _invalid_call),
    "arguments": ((protocol.FAILED,), _invalid_call),
    "no_attribute": ((protocol.FAILED,), _no_attribute),
}


def failure_of(frame: protocol.Frame, subject: Subject) -> Exception | None:
    """None for a success; for a failure (ERROR, FAILED), the error it stands for, to raise.

    Raises:
        ProtocolError: the failure itself breaks the protocol (a category unknown to its kind of
            frame, malformed facts): the worker is not to be trusted further.
    """
    if frame.kind not in (protocol.ERROR, protocol.FAILED):
        return None
    category = frame.fields["error"]  # a str: the message's declaration holds it to that
    kinds, build = FAILURES.get(category, ((), _invalid_call))
    if frame.kind not in kinds:
        raise ProtocolError(f"the worker sent a {frame.kind} of unknown category {category[:40]!r}")
    return build(Failure(frame.fields, subject))


def _text(value: Any) -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else ""
