"""The worker's stdout and stderr on the caller's streams: line by line, marked, controls made visible, capped."""

from __future__ import annotations

import array
import codecs
import fcntl
import os
import select
import termios
import threading
import time
from typing import IO

from .. import _terminal

OUTPUT_CAP = 1024 * 1024  # bytes relayed to each of the caller's stdout and stderr per call
OUTPUT_PREFIX = _terminal.WORKER_PREFIX
OUTPUT_TRUNCATED = "[worker output truncated]\n"


class Relay(threading.Thread):
    """Copy one of the worker's pipes to the caller's stream, line by line, marked, with control
    characters made visible (``_terminal``), and capped.

    :meth:`settle` waits until what the pipe holds now has been written out: a call that returns
    while its worker is still exiting has shown what the worker wrote before its answer.
    """

    def __init__(self, pipe: IO[bytes], target: IO[str] | None, cap: int = OUTPUT_CAP) -> None:
        super().__init__(name="safehub-worker-output", daemon=True)
        self.pipe = pipe
        self.target = target
        self.cap = cap
        self.state = threading.Condition()
        self.busy = False  # between reading a chunk and writing it out
        self.ended = False
        self.line = _terminal.LINE_START  # where the caller's stream stands: at a line's start or within one

    def run(self) -> None:
        written = 0  # bytes relayed, as the caller's stream gets them (marked, controls made visible)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character split across chunks stays whole
        fd = self.pipe.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        try:
            while True:
                poller.poll()
                with self.state:
                    self.busy = True  # before the read: settle() sees either unread bytes or this
                chunk = os.read(fd, 64 * 1024)
                if not chunk:
                    break
                # Line by line, so the cap cuts at a line (as the caller reads them), not a chunk.
                for line in decoder.decode(chunk).splitlines(keepends=True):
                    if self.target is None or written > self.cap:
                        break  # keep draining, so the worker never blocks on a full pipe
                    text, after = _terminal.mark_lines(line, OUTPUT_PREFIX, self.line)
                    size = len(text.encode())
                    if written + size > self.cap:
                        written = self.cap + 1
                        self._write(("\n" if self.line == _terminal.MID_LINE else "") + OUTPUT_TRUNCATED)
                        break
                    written += size
                    self._write(text)
                    self.line = after
                self._idle()
            if self.line == _terminal.MID_LINE and written <= self.cap:
                self._write("\n")
        finally:
            self.pipe.close()
            with self.state:
                self.ended = True
                self.busy = False
                self.state.notify_all()

    def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until every byte now in the pipe has been written out,
        and end a line left open: the caller goes on, and what may follow shows as lines of its own."""
        deadline = time.monotonic() + timeout
        with self.state:
            while not self.ended and (self.busy or _unread(self.pipe)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.state.wait(min(left, 0.01))
            if not self.ended and not self.busy and self.line == _terminal.MID_LINE:
                self._write("\n")
                self.line = _terminal.LINE_START

    def _idle(self) -> None:
        with self.state:
            self.busy = False
            self.state.notify_all()

    def _write(self, text: str) -> None:
        if self.target is None:
            return
        try:
            self.target.write(text)
            self.target.flush()
        except Exception:
            self.target = None  # the caller's stream went away: drain silently


def _unread(pipe: IO[bytes]) -> int:
    """Bytes waiting in the pipe (FIONREAD); 0 once it is closed."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(pipe.fileno(), termios.FIONREAD, count, True)
    except (OSError, ValueError):
        return 0
    return count[0]
