"""What an isolated load gives back: the ``returns`` modes, each declared once (DESIGN 1, 2).

A mode says whether the result brings the repository's code into this process (then the
repository must be trusted), whether the worker stays up after the load (the result is a handle
on it), whether an in-process load can give it, and which decoder reads the worker's RESULT
(``replies.py``). The API (argument checks, trust), the run step (the CALL, the worker's end,
the decoding) and the CLI (``--returns``) read :data:`MODES`. A new mode is one entry here, its
decoder, and its encoder in the worker (``worker/work.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._worker import protocol
from ..errors import InvalidArgumentError
from . import replies
from .process import Worker
from .remote import open_remote


@dataclass(frozen=True)
class Mode:
    """One value of ``returns``."""

    name: str
    needs_trust: bool  # the result carries the repository's code into this process
    keeps_worker: bool  # the worker stays up after the load: the result is a handle on it
    in_process: bool  # a load without isolation gives it too (the entrypoint's own return value)
    # The worker's RESULT (checked against the request) -> the value ``load`` returns. It takes
    # the worker, the entrypoint's name and the replicas asked for, which a mode that keeps the
    # worker hands to its handle.
    decode: Callable[[protocol.Frame, Worker, str, int], Any]


OBJECT = Mode("object", needs_trust=True, keeps_worker=False, in_process=True,
              decode=lambda frame, worker, model, replicas: replies.unpickled_object(frame, replies.result_cap(worker.sandbox)))
WEIGHTS = Mode("weights", needs_trust=False, keeps_worker=False, in_process=False,
               decode=lambda frame, worker, model, replicas: replies.weights(frame, replies.result_cap(worker.sandbox)))
REMOTE = Mode("remote", needs_trust=False, keeps_worker=True, in_process=False,
              decode=lambda frame, worker, model, replicas: open_remote(
                  worker, model, *replies.remote_model(frame), replicas=replicas, applied=replies.applied_layers(frame)))

MODES: dict[str, Mode] = {mode.name: mode for mode in (OBJECT, WEIGHTS, REMOTE)}


def mode_of(returns: object) -> Mode:
    """The mode named ``returns``.

    Raises:
        InvalidArgumentError: no mode has that name.
    """
    mode = MODES.get(returns) if isinstance(returns, str) else None
    if mode is None:
        names = ", ".join(repr(name) for name in MODES)
        raise InvalidArgumentError(f"returns must be one of {names}, not {returns!r}.")
    return mode


def trust_needed(isolated: bool, mode: Mode | None = None) -> bool:
    """Whether the repository must be trusted (DESIGN 2): its code runs here without isolation,
    or comes here with an isolated load's result. ``mode`` None: a list or help, which bring no code."""
    return not isolated or (mode is not None and mode.needs_trust)
