"""What a worker may ask the parent mid-call, as the parent's services see it (DESIGN 4, 4b).

The conversation (``_run/conversation.py``) reads each question and hands it to the handler
registered for its ``what``; a handler serves it (a value, buffers, file descriptors) or raises
:class:`Refusal`. The services (the broker) depend on this contract only, not on the run step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# ``what`` -> handler(args) -> (value, buffers, fds); the conversation sends the fds, then closes them.
AskHandler = Callable[[dict[str, Any]], tuple[Any, list[bytes], list[int]]]


class Refusal(Exception):
    """A handler's refusal of one question; the text is sent to the worker as the reason."""
