"""One isolated call: ``list``, ``help`` or ``load`` of a hubconf.py, run in a worker (DESIGN 4).

The call is a conversation (``safehub._worker.protocol``): the parent sends CALL, answers the
worker's ASKs (or refuses them) until the worker sends its final RESULT or ERROR, all under the
sandbox's deadline. ``process.Worker`` owns the process and leaves nothing behind;
``replies.interpret`` turns the final frame into a value or an error.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .. import _log
from .._asks import AskHandler, Refusal
from .._sandbox import Sandbox
from .._worker import protocol
from ..errors import HubconfNotFoundError, InvalidArgumentError, ProtocolError
from .process import Worker
from .remote import open_remote
from .replies import interpret, result_cap, scratch_full

ACTIONS = ("list", "help", "load")
RETURNS = ("object", "weights", "remote")
MAX_ASKS = 10_000  # questions one call may ask; each is answered within the call's deadline


def run_isolated(
    repo_dir: Path,
    action: str,
    *,
    model: str | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    returns: str = "object",
    sandbox: Sandbox,
    asks: dict[str, AskHandler] | None = None,
    view_dir: Path | None = None,
) -> Any:
    """Run ``list``, ``help`` or ``load`` for the hubconf.py in ``repo_dir`` in a worker.

    Args:
        repo_dir: the repository folder on disk (holds hubconf.py).
        action: "list" -> list[str] of entrypoints; "help" -> the entrypoint's docstring
            (str or None); "load" -> the entrypoint's result.
        model: the entrypoint name (help and load).
        args, kwargs: passed to the entrypoint (load). Pickled with cloudpickle in the parent.
        returns: "object" -> the result itself, unpickled here (runs the repository's code:
            trusted repositories only); "weights" -> dict[str, torch.Tensor] parsed as data,
            never unpickled; "remote" -> a ``RemoteModule``: the result stays in the worker,
            which stays up for the handle's calls (``remote.py``).
        sandbox: the limits (``Sandbox``).
        asks: handlers for what the worker may ask mid-call (``what`` -> handler); the rest is refused.
        view_dir: the call's view of the cache (``_egress.broker.Broker``): the worker reads it, and its
            fetch shims are on. None: no view, and the shims stay off.

    Raises:
        HubconfError, MissingDependenciesError, EntrypointNotFoundError: as torch.hub would.
        RemoteError: the repository's code raised; ``remote_traceback`` holds the traceback.
        WorkerTimeoutError, WorkerCrashedError, ProtocolError, ResultDecodeError, SandboxError.

    Example::

        names = run_isolated(repo_dir, "list", sandbox=Sandbox())
        state = run_isolated(repo_dir, "load", model="resnet18", returns="weights", sandbox=Sandbox())
    """
    repo_dir = _check_call(repo_dir, action, model, returns, sandbox)
    request = {"action": action, "model": model, "returns": returns}
    buffers = [_dump_args(args, kwargs or {})] if action == "load" and (args or kwargs) else []
    with contextlib.ExitStack() as cleanup:
        worker = cleanup.enter_context(Worker(repo_dir, sandbox, view_dir))
        worker.send(protocol.CALL, request, buffers)
        frame = _converse(worker, asks or {})
        if returns == "remote" and frame.kind == protocol.RESULT:
            _report_missing_layers(frame.fields.get("sandbox"))
            handle = open_remote(worker, frame, model or "")
            cleanup.pop_all()  # the handle owns the worker now: it ends when the handle closes
            return handle
        try:
            worker.finish()  # the whole answer is in: let the worker flush its output and exit
            _report_missing_layers(frame.fields.get("sandbox"))
            if frame.kind == protocol.RESULT and (full := scratch_full(frame.fields.get("sandbox"))):
                _log.warning(full)  # the repository went on; an exception it raised says it in its message
            return interpret(frame, action, model, returns, repo_dir, result_cap(sandbox), sandbox=sandbox)
        finally:
            frame.close_fds()


def _converse(worker: Worker, asks: dict[str, AskHandler]) -> protocol.Frame:
    """Answer the worker's questions until its final frame arrives; return that frame."""
    for _ in range(MAX_ASKS + 1):
        frame = worker.receive((protocol.ASK, protocol.RESULT, protocol.ERROR))
        if frame.kind != protocol.ASK:
            return frame
        ask_id, what = frame.fields["id"], frame.fields["what"]
        handler = asks.get(what)
        if handler is None:
            worker.send(protocol.REFUSE, {"id": ask_id, "reason": f"the parent does not serve {what[:60]!r} requests"})
            continue
        try:
            value, buffers, fds = handler(frame.fields["args"])
        except Refusal as exc:
            worker.send(protocol.REFUSE, {"id": ask_id, "reason": str(exc)[:4096]})
            continue
        try:
            worker.send(protocol.ANSWER, {"id": ask_id, "value": value}, buffers, fds)
        finally:
            for fd in fds:  # the worker has its copies now
                with contextlib.suppress(OSError):
                    os.close(fd)
    raise ProtocolError(f"the worker asked more than {MAX_ASKS} questions in one call")




_reported: set[tuple[str, str]] = set()


def _report_missing_layers(report: Any) -> None:
    """Warn, once per process and layer, about a layer the machine could not apply."""
    missing = report.get("missing") if isinstance(report, dict) else None
    if not isinstance(missing, dict):
        return
    for name, reason in missing.items():
        if not isinstance(name, str) or not isinstance(reason, str) or "switched off" in reason:
            continue
        if (name, reason) not in _reported:
            _reported.add((name, reason))
            _log.warning(f"sandbox layer {name[:40]} is not active on this machine: {reason[:300]} (see `safehub doctor`)")


def _check_call(repo_dir: Path, action: str, model: str | None, returns: str, sandbox: Sandbox) -> Path:
    if action not in ACTIONS:
        raise InvalidArgumentError(f"action must be one of {ACTIONS}, not {action!r}")
    if returns not in RETURNS:
        raise InvalidArgumentError(f'returns must be "object", "weights" or "remote", not {returns!r}')
    if action != "list" and not isinstance(model, str):
        raise InvalidArgumentError("Invalid input: model should be a string of function name")
    if not isinstance(sandbox, Sandbox):
        raise InvalidArgumentError(f"sandbox must be a safehub.Sandbox, not {type(sandbox).__name__}")
    repo_dir = Path(repo_dir).resolve()
    if not (repo_dir / "hubconf.py").is_file():
        # Said here, without starting a worker; the worker checks again (the folder may change).
        raise HubconfNotFoundError(f"No hubconf.py in {repo_dir}", repo_dir=str(repo_dir))
    return repo_dir


def _dump_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    import cloudpickle

    try:
        # cloudpickle: a lambda or a class from the caller's __main__ goes by value.
        return cloudpickle.dumps((tuple(args), dict(kwargs)), protocol=5)
    except Exception as exc:
        raise InvalidArgumentError(f"the entrypoint's arguments cannot be pickled: {exc}") from exc
