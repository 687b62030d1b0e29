"""What a worker may ask of the parent mid-call: the handler's shape and its refusal.

The run step (``_run/call.py``) carries the questions and answers; the fetch broker
(``_egress/broker.py``) answers them. Both import these two names from here, so neither
package depends on the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# ``what`` -> handler(args) -> (value, buffers, fds). A handler raises Refusal to refuse;
# anything the worker asks that has no handler is refused.
AskHandler = Callable[[dict[str, Any]], tuple[Any, list[bytes], list[int]]]


class Refusal(Exception):
    """A handler's refusal of one ASK; the text is sent to the worker as the reason."""
