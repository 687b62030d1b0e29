"""What one isolated call may spend on fetches: its limits, its deadline, its budget.

Every cap of the fetch broker (DESIGN 4b) is a field of one frozen :class:`Limits`, as httpx
passes ``Limits``; nothing else states a number. The broker makes one :class:`Deadline` and one
:class:`CallBudget` per call and passes them to every fetch of that call
(``connection.open_checked``), so a worker that asks for many files, huge files or slow servers
is stopped inside the call's own timeout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .. import constants
from ..errors import FetchRefusedError


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Every cap on what one isolated call may fetch. No setting changes them; tests pass smaller ones.

    Attributes:
        max_fetches: files, GETs and nested repositories one call may ask for. Cached, refused
            and failed ones count too, so a flood of requests is bounded whatever it asks for.
        max_url_chars: the longest URL asked for or redirected to. Common servers refuse a
            request line past 8 KiB (Apache 8190, nginx 8k), so a longer URL cannot be served.
        max_redirects: redirects followed per fetch.
        max_file_bytes: the largest body one fetch may bring.
        max_call_bytes: the bytes all fetches of one call may bring together.
        max_get_bytes: the largest body of a plain GET (urllib, requests): it travels in memory.
        max_error_body_bytes: what is read of an error answer's body (the worker sees it).
        io_timeout: seconds one socket operation may wait; the call's deadline bounds the whole.
    """

    max_fetches: int = 256
    max_url_chars: int = 8192
    max_redirects: int = 5
    max_file_bytes: int = 32 * 1024**3
    max_call_bytes: int = 64 * 1024**3
    max_get_bytes: int = 256 * 1024**2
    max_error_body_bytes: int = 64 * 1024
    io_timeout: float = constants.HTTP_TIMEOUT_S


# What a call gets unless it is given other limits; read at call time, so a test can replace it.
DEFAULT_LIMITS = Limits()


class Deadline:
    """A moment (monotonic clock) by which every fetch of a call must be over.

    Sockets get ``min(io_timeout, remaining)`` before each operation, so a server that sends one
    byte just before each timeout (slow loris) still cannot hold the parent past this moment.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self._end = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def check(self, url: str) -> None:
        """Raise :class:`FetchRefusedError` (reason ``"deadline"``) once the time is spent."""
        if self.expired():
            raise self.error(url)

    def error(self, url: str) -> FetchRefusedError:
        return FetchRefusedError(
            f"Stopped fetching {url}: the call's time limit of {self.seconds:g} s is spent. "
            "Give the call more time with Sandbox(timeout=...) if the download is large or slow.",
            url=url,
            reason="deadline",
        )

    def timeout(self, io_timeout: float, url: str) -> float:
        """The timeout for the next socket operation; raises once the deadline has passed."""
        left = self.remaining()  # read once: a timeout of 0 would make the socket non-blocking
        if left <= 0.0:
            raise self.error(url)
        return min(io_timeout, left)


class CallBudget:
    """What one call may still fetch under its :class:`Limits`: fetches and bytes counted.

    Thread-safe, so a broker serving several requests of one call at once shares one budget.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = DEFAULT_LIMITS if limits is None else limits
        self.bytes_used = 0
        self.fetches = 0
        self._lock = threading.Lock()

    @property
    def max_bytes(self) -> int:
        return self.limits.max_call_bytes

    def remaining_bytes(self) -> int:
        with self._lock:
            return self.max_bytes - self.bytes_used

    def start_fetch(self, url: str) -> None:
        """Count one fetch (refused ones too: a flood of bad requests is bounded as well)."""
        with self._lock:
            if self.fetches >= self.limits.max_fetches:
                raise FetchRefusedError(
                    f"Refusing to fetch {url[:500]}: this call already made {self.fetches} fetches, "
                    f"the most one call may make.",
                    url=url,
                    reason="fetch_count",
                )
            self.fetches += 1

    def check_length(self, url: str, length: int) -> None:
        """Refuse, before reading, a body the rest of the budget cannot hold."""
        with self._lock:
            left = self.max_bytes - self.bytes_used
        if length > left:
            raise self._over(url, f"{url} is {length} bytes")

    def charge(self, url: str, nbytes: int) -> None:
        with self._lock:
            if self.bytes_used + nbytes > self.max_bytes:
                raise self._over(url, f"{url} goes past it")
            self.bytes_used += nbytes

    def _over(self, url: str, what: str) -> FetchRefusedError:
        return FetchRefusedError(
            f"Refusing to fetch more: {what}, and this call may fetch {self.max_bytes} bytes in all "
            f"({self.bytes_used} used).",
            url=url,
            reason="call_bytes",
        )
