"""What one isolated call may spend on fetches: a deadline, a byte and fetch budget, the record.

The fetch broker (DESIGN 4b) makes one :class:`Deadline` and one :class:`CallBudget` per call and
passes them to every fetch of that call (``safehub._egress.open_checked``), so a worker that asks
for many files, huge files or slow servers is stopped inside the call's own timeout. Each
completed fetch leaves a :class:`FetchRecord` on the budget for the caller to see.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .. import constants
from ..errors import FetchRefusedError


@dataclass(frozen=True)
class FetchRecord:
    """One completed fetch: what was asked, where it ended after redirects, and what came."""

    url: str
    final_url: str
    size: int
    sha256: str


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
    """Fetches and bytes one call may still use, and the records of the fetches it made.

    Thread-safe, so a broker serving several requests of one call at once shares one budget.
    """

    def __init__(self, *, max_bytes: int | None = None, max_fetches: int | None = None) -> None:
        self.max_bytes = constants.MAX_FETCH_CALL_BYTES if max_bytes is None else max_bytes
        self.max_fetches = constants.MAX_FETCHES_PER_CALL if max_fetches is None else max_fetches
        self.bytes_used = 0
        self.fetches = 0
        self.records: list[FetchRecord] = []
        self._lock = threading.Lock()

    def remaining_bytes(self) -> int:
        with self._lock:
            return self.max_bytes - self.bytes_used

    def start_fetch(self, url: str) -> None:
        """Count one fetch (refused ones too: a flood of bad requests is bounded as well)."""
        with self._lock:
            if self.fetches >= self.max_fetches:
                raise FetchRefusedError(
                    f"Refusing to fetch {url}: this call already made {self.fetches} fetches, "
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

    def add_record(self, record: FetchRecord) -> None:
        with self._lock:
            self.records.append(record)

    def _over(self, url: str, what: str) -> FetchRefusedError:
        return FetchRefusedError(
            f"Refusing to fetch more: {what}, and this call may fetch {self.max_bytes} bytes in all "
            f"({self.bytes_used} used).",
            url=url,
            reason="call_bytes",
        )
