"""One remote model's worker for the life of its handle: calls, limits, and the end (DESIGN 1, 4).

A :class:`RemoteSession` owns a ``process.Worker`` that answered a load with ``returns="remote"``
and stays up. Each call is one exchange of the worker's conversation (``conversation.py``: INVOKE,
then RETURNED or FAILED), under the sandbox's ``timeout`` counted afresh; calls from several
threads take turns (one lock). Arguments leave as data (``values.py``: tensors copied once into
the session's input pool, ``pools.py``, or inline when small, so the worker never holds the
caller's own memory); a reply is read as hostile (``replies.py``): held to its declaration,
capped like the weights decoder, the result pool's bytes copied into the caller's own memory
before they are read, memfds checked for their seals and mapped privately.
During a call the worker's questions (fetches) are all refused: the inputs could leave through a URL.

A call that times out, a worker that dies or breaks the protocol, an interrupted call: the worker
is ended (its whole tree killed, its scratch folder removed) and every later call raises
:class:`~safehub.errors.RemoteClosedError` saying why. The same happens past the sandbox's
``idle_timeout`` or ``lifetime`` (a watchdog thread), on ``close()``, when the handle is
collected, and at interpreter exit. An exception in the model's own code is not an end: it is
raised as :class:`~safehub.errors.RemoteError` and the model stays.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .._sandbox import Sandbox
from .._worker import protocol, values
from ..errors import (
    InvalidArgumentError,
    ProtocolError,
    RemoteClosedError,
    SandboxLimitError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from . import conversation, pools, replies
from .process import EXIT_GRACE_S, Worker

CALL_METHOD = "__call__"  # the wire name of ``remote(*args)``: the model's own __call__
GETATTR_METHOD = protocol.REMOTE_GETATTR  # reading a plain attribute: ``remote.training``
SELF = replies.SELF  # a call's result that is the model itself (``to("cpu")``, ``float()``): the handle
FETCH_REFUSED = "a remote model's calls may not fetch: the inputs could leave through a URL"


class RemoteSession:
    """The worker of one remote model, from its load to its end. Thread-safe."""

    def __init__(self, worker: Worker, model: str) -> None:
        self.worker = worker
        self.model = model
        self.sandbox = worker.sandbox
        self.owner = os.getpid()  # a forked child holds a copy of the channel, not the worker
        self.call_lock = threading.Lock()  # one exchange at a time on the channel
        self.state = threading.Condition()  # guards the fields below; wakes the watchdog
        self.gone: str | None = None  # why the model is gone; None while it is up
        self.busy = False
        self.started = self.last_used = time.monotonic()
        self.cleaned = False
        self.pools = pools.SessionPools(replies.result_cap(self.sandbox))
        _track(self)
        if self.sandbox.idle_timeout is not None or self.sandbox.lifetime is not None:
            threading.Thread(target=self._watch, name="safehub-remote-watchdog", daemon=True).start()

    @property
    def pid(self) -> int | None:
        """The worker's supervisor (the top of its process tree), or None once it is gone."""
        proc = self.worker.proc
        return proc.pid if proc is not None and not self.cleaned else None

    def call(self, method: str, args: Sequence[Any], kwargs: Mapping[str, Any], *, inference: bool) -> Any:
        """Run ``method`` on the model in the worker; its result, as data.

        Raises:
            RemoteClosedError: the model is gone (the reason says why); also when it goes during this call.
            RemoteError: the model's code raised; the model stays.
            InvalidArgumentError: an argument is not data.
            WorkerTimeoutError, WorkerCrashedError, ProtocolError, ResultDecodeError: this call
                ended the worker; later calls raise RemoteClosedError.
        """
        self._check_owner()
        with self.call_lock:  # the input pool is written under it
            try:
                packed = values.pack_call(args, kwargs, pool=self._input_pool())
            except values.NotData as exc:
                raise InvalidArgumentError(
                    f"the arguments of a call to {_name(method)} cannot be sent to the remote model: {exc}") from None
            try:
                self._begin()
                try:
                    frame = self._exchange(method, packed, inference)
                    # The model's own failure leaves it up; a reply that breaks the protocol does not.
                    # (A success is not a failure: no subject is made for it.)
                    failure = None if frame.kind == protocol.RETURNED else conversation.failure_of(
                        frame, _subject(method, self.sandbox))
                    value = None
                    if failure is None:
                        unpooled = replies.unpooled_bytes(frame, method)
                        value = replies.returned_value(frame, method, _name(method), replies.result_cap(self.sandbox),
                                                       self.pools.results)
                        self.pools.results.fit(unpooled)  # the next such result takes the pool
                except BaseException as exc:
                    error = self._fail(exc, method)
                    if error is exc:
                        raise
                    raise error from exc
                finally:
                    self._end_call()
            finally:
                packed.close()
        if failure is not None:
            raise failure
        return value

    def warm_up(self) -> None:
        """Run this side of a call's path once (the INVOKE's header, the codec both ways, a
        RETURNED read as a reply is), so the first call costs what later ones do."""
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            packed = values.pack_call((torch.ones(1, 8),), {"k": [1.0, "s"]})
            protocol.encode_head(protocol.INVOKE, {"method": CALL_METHOD, "call": packed.tree, "inference": True},
                                 [len(b) for b in packed.buffers])
            result = values.pack({"out": torch.ones(1, 2)}, root="result")
            message = protocol.MESSAGES[protocol.RETURNED]
            fields = protocol.decode_fields(message, protocol.encode_fields(message, {"value": result.tree}), 0)
            frame = protocol.check_message(protocol.Frame(protocol.RETURNED, fields, [bytearray(b) for b in result.buffers]),
                                           conversation.INVOKE.expected)
            if conversation.failure_of(frame, _subject(CALL_METHOD, self.sandbox)) is None:
                replies.returned_value(frame, CALL_METHOD, _name(CALL_METHOD), replies.result_cap(self.sandbox))

    def close(self) -> None:
        """End the worker (politely: CLOSE, then the tree is killed if it lingers). Idempotent."""
        if os.getpid() != self.owner:
            self._forget_in_child()
            return
        if not self.call_lock.acquire(blocking=False):
            # A call runs in another thread: end the worker under it; that call cleans up.
            self._end("the handle was closed while a call was running")
            return
        try:
            with self.state:
                polite = self.gone is None and not self.cleaned
                self._mark_gone("the handle was closed")
            if polite:
                with contextlib.suppress(Exception):
                    self.worker.restart_clock(EXIT_GRACE_S)
                    self.worker.send(protocol.CLOSE, {})
                    self.worker.finish()
            self._cleanup()
        finally:
            self.call_lock.release()

    # -- one call -----------------------------------------------------------------------------

    def _begin(self) -> None:
        with self.state:
            if self.gone is not None:
                raise RemoteClosedError(_gone_message(self.model, self.gone), reason=self.gone)
            self.busy = True

    def _end_call(self) -> None:
        with self.state:
            self.busy = False
            self.last_used = time.monotonic()
            self.state.notify_all()

    def _exchange(self, method: str, packed: values.Packed, inference: bool) -> protocol.Frame:
        """Send the INVOKE, refusing every question the worker asks meanwhile; return its reply."""
        self.worker.restart_clock()
        fields: dict[str, Any] = {"method": method, "call": packed.tree, "inference": inference}
        fds = packed.fds
        results = self.pools.results.fd
        if packed.pooled or results is not None:
            fds = [*fds, self.pools.inputs.fd] if packed.pooled else [*fds]  # the segment after the memfds
            if results is not None:
                fields["result_pool"] = True
                fds.append(results)  # last: the worker's to write into
        return conversation.converse(self.worker, conversation.INVOKE, fields, packed.buffers, fds,
                                     asks={}, refuse_all=FETCH_REFUSED)

    def _input_pool(self) -> values.Pool | None:
        """The input pool while the model is up (a closed session's is gone)."""
        return None if self.gone is not None else self.pools.inputs.reserve

    def _fail(self, exc: BaseException, method: str) -> BaseException:
        """After anything that broke an exchange: end the worker; the error to raise."""
        with self.state:
            ended_by_other = self.gone  # closed, or past its idle or whole life, meanwhile
            self._mark_gone(_why(exc, method))
        self._cleanup()
        if ended_by_other is not None:
            return RemoteClosedError(_gone_message(self.model, ended_by_other), reason=ended_by_other)
        return exc

    # -- the end ------------------------------------------------------------------------------

    def _mark_gone(self, reason: str) -> None:
        """Under ``state``: the first reason stays."""
        if self.gone is None:
            self.gone = reason
        self.state.notify_all()

    def _end(self, reason: str) -> None:
        """From any thread: mark the model gone and kill its tree; clean up unless a call will."""
        with self.state:
            self._mark_gone(reason)
            if not self.cleaned:
                self.worker.kill()  # under `state`: never while _cleanup reaps the same process
        if self.call_lock.acquire(blocking=False):
            try:
                self._cleanup()
            finally:
                self.call_lock.release()

    def _cleanup(self) -> None:
        """Once, with the call lock held: the channel closed, the tree killed and reaped, scratch removed."""
        with self.state:
            if self.cleaned:
                return
            self.cleaned = True
            self.state.notify_all()
            self.worker.__exit__(None, None, None)
            self.pools.close()  # the caller's regions in use stay until their tensors go
        _untrack(self)

    def _watch(self) -> None:
        """The watchdog: end the worker once it sat idle, or lived, longer than the sandbox allows."""
        with self.state:
            while self.gone is None:
                when, why = next_limit(self.sandbox, self.started, self.last_used, self.busy)
                now = time.monotonic()
                if when is None:
                    self.state.wait()
                    continue
                if when <= now:
                    break
                self.state.wait(when - now)
            else:
                return
        self._end(why)

    def _check_owner(self) -> None:
        if os.getpid() != self.owner:
            raise RemoteClosedError(
                f"The remote model {self.model!r} belongs to process {self.owner}; a forked child cannot call it. "
                "Load it again in the child.", reason="forked child")

    def _forget_in_child(self) -> None:
        # The worker is the parent's: a forked child only drops its copy of the channel.
        with self.state:
            self._mark_gone(f"the handle belongs to process {self.owner}")
            if self.worker.sock is not None and not self.cleaned:
                self.cleaned = True
                self.worker.sock.close()


def next_limit(sandbox: Sandbox, started: float, last_used: float, busy: int) -> tuple[float | None, str]:
    """When the sandbox's lifetime or idle timeout next ends a remote model (monotonic time), and
    why; ``(None, "")`` when neither applies now. ``busy``: calls running (no idle timeout while
    any runs). One worker's rule, and a replica set's."""
    idle, lifetime = sandbox.idle_timeout, sandbox.lifetime
    limits = []
    if lifetime is not None:
        limits.append((started + lifetime, f"its lifetime of {lifetime:g} s ran out (Sandbox(lifetime=...))"))
    if idle is not None and not busy:
        limits.append((last_used + idle, f"it sat idle for {idle:g} s (Sandbox(idle_timeout=...))"))
    if not limits:
        return None, ""
    when, why = min(limits)
    return when, why


def _why(exc: BaseException, method: str) -> str:
    """Why the model is gone, after ``exc`` broke a call to ``method``."""
    name = _name(method)
    if isinstance(exc, WorkerTimeoutError):
        return f"a call to {name} ran past its time limit of {exc.timeout:g} s (Sandbox(timeout=...)) and its worker was ended"
    if isinstance(exc, WorkerCrashedError):
        return f"its worker died during a call to {name}: {exc}"
    if isinstance(exc, SandboxLimitError):
        return f"its worker hit a limit of the sandbox during a call to {name}: {exc.message}"
    if isinstance(exc, ProtocolError):
        return f"its worker broke the protocol during a call to {name}: {exc}"
    if isinstance(exc, RemoteClosedError):
        return exc.reason or str(exc)
    return f"a call to {name} was cut off ({type(exc).__name__}: {str(exc)[:200]}) and its worker was ended"


def _gone_message(model: str, reason: str) -> str:
    return f"The remote model {model!r} is gone: {reason}. Load it again to go on."


def _name(method: str) -> str:
    """What a call is a call to, in a sentence: "the model" (its own ``__call__``) or "encode()"."""
    return "the model" if method == CALL_METHOD else f"{method}()"


def _subject(method: str, sandbox: Any) -> conversation.Subject:
    """A remote call, as its errors name it."""
    whose = "the remote model" if method == CALL_METHOD else f"the remote model's {method}()"
    return conversation.Subject(remote_call=_name(method), remote_whose=whose, sandbox=sandbox)


# -- every open session of this process, closed at exit ----------------------------------------

_open: set[RemoteSession] = set()
_open_lock = threading.Lock()
_exit_hook_registered = False


def _track(session: RemoteSession) -> None:
    global _exit_hook_registered
    with _open_lock:
        _open.add(session)
        if not _exit_hook_registered:
            # Registered on first use, after the warm path's own hook: atexit runs it first, so the
            # workers get their CLOSE before the zygote they came from is stopped.
            atexit.register(close_all)
            _exit_hook_registered = True


def _untrack(session: RemoteSession) -> None:
    with _open_lock:
        _open.discard(session)


def close_all() -> None:
    """Close every remote model of this process (at exit; tests)."""
    with _open_lock:
        sessions = list(_open)
    for session in sessions:
        with contextlib.suppress(Exception):
            session.close()
