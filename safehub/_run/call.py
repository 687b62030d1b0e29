"""One isolated call: ``list``, ``help`` or ``load`` of a hubconf.py, run in a worker (DESIGN 4).

The call is a conversation (``conversation.py``): the parent sends CALL, answers the worker's
ASKs (or refuses them) until the worker sends its final RESULT or ERROR, all under the sandbox's
deadline. ``process.Worker`` owns the process and leaves nothing behind; a failure becomes its
error in ``conversation.failure_of``, a result its value through the decoder of its ``returns``
mode (``returns.py``), which may hand the worker on to a remote model's handle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import _log
from .._asks import AskHandler
from .._sandbox import Sandbox
from .._worker import protocol
from ..errors import HubconfNotFoundError, InvalidArgumentError
from . import conversation, replies
from .process import Worker
from .returns import Mode, mode_of

ACTIONS = ("list", "help", "load")


def run_isolated(
    repo_dir: Path,
    action: str,
    *,
    model: str | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    returns: str = "object",
    sandbox: Sandbox,
    asks: Mapping[str, AskHandler] | None = None,
    view_dir: Path | None = None,
    replicas: int = 1,
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
        replicas: with returns="remote", how many replicas serve the model (``replicas.py``).

    Raises:
        HubconfError, MissingDependenciesError, EntrypointNotFoundError: as torch.hub would.
        RemoteError: the repository's code raised; ``remote_traceback`` holds the traceback.
        WorkerTimeoutError, WorkerCrashedError, ProtocolError, ResultDecodeError, SandboxError.

    Example::

        names = run_isolated(repo_dir, "list", sandbox=Sandbox())
        state = run_isolated(repo_dir, "load", model="resnet18", returns="weights", sandbox=Sandbox())
    """
    mode = mode_of(returns)
    repo_dir = _check_call(repo_dir, action, model, sandbox)
    request = {"action": action, "model": model, "returns": mode.name}
    buffers = [_dump_args(args, kwargs or {})] if action == "load" and (args or kwargs) else []
    subject = conversation.Subject(model=model, repo_dir=repo_dir, sandbox=sandbox)
    with contextlib.ExitStack() as cleanup:
        worker = cleanup.enter_context(Worker(repo_dir, sandbox, view_dir))
        frame = conversation.converse(worker, conversation.CALL, request, buffers, asks=asks or {})
        try:
            _report_missing_layers(frame.fields.get("sandbox"))
            handing_on = action == "load" and mode.keeps_worker and frame.kind == protocol.RESULT
            if not handing_on:
                worker.release()  # the whole answer is in: the worker exits in the background
            failure = conversation.failure_of(frame, subject)
            if failure is not None:
                raise failure
            if not handing_on and (full := replies.scratch_full(frame.fields.get("sandbox"))):
                _log.warning(full)  # the repository went on; an exception it raised says it in its message
            value = _decode(frame, action, mode, worker, model, replicas)
            if handing_on:
                cleanup.pop_all()  # the handle owns the worker now: it ends when the handle closes
            return value
        finally:
            frame.close_fds()


def _decode(frame: protocol.Frame, action: str, mode: Mode, worker: Worker, model: str | None, replicas: int) -> Any:
    """A RESULT's value: the entrypoints, the docstring, or the load's result by its mode's decoder."""
    replies.check_result(frame, action, mode.name)
    if action == "list":
        return replies.entrypoints(frame)
    if action == "help":
        return replies.docstring(frame)
    return mode.decode(frame, worker, model or "", replicas)


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


def _check_call(repo_dir: Path, action: str, model: str | None, sandbox: Sandbox) -> Path:
    if action not in ACTIONS:
        raise InvalidArgumentError(f"action must be one of {ACTIONS}, not {action!r}")
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
