"""What a worker may ask of the parent mid-call: the handler's shape and its refusal (DESIGN 4, 4b).

The run step's conversation (``_run/conversation.py``) reads each question and hands it to the
handler registered for its ``what``; the fetch broker (``_egress/broker.py``) is such a handler.
Both import these two names from here, so neither package depends on the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# ``what`` -> handler(args) -> (value, buffers, fds): the conversation sends the fds, then closes
# them. A handler raises Refusal to refuse; anything the worker asks that has no handler is refused.
AskHandler = Callable[[dict[str, Any]], tuple[Any, list[bytes], list[int]]]


class Refusal(Exception):
    """A handler's refusal of one question; the text is sent to the worker as the reason."""
