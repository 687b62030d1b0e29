"""The worker's stdout and stderr on the caller's streams: line by line, marked, controls made visible, capped."""

from __future__ import annotations

import codecs
import threading
from typing import IO

from .. import _terminal

OUTPUT_CAP = 1024 * 1024  # bytes relayed to each of the caller's stdout and stderr per call
OUTPUT_PREFIX = _terminal.WORKER_PREFIX
OUTPUT_TRUNCATED = "[worker output truncated]\n"


class Relay(threading.Thread):
    """Copy one of the worker's pipes to the caller's stream, line by line, marked, with control
    characters made visible (``_terminal``), and capped."""

    def __init__(self, pipe: IO[bytes], target: IO[str] | None, cap: int = OUTPUT_CAP) -> None:
        super().__init__(name="safehub-worker-output", daemon=True)
        self.pipe = pipe
        self.target = target
        self.cap = cap

    def run(self) -> None:
        written = 0  # bytes relayed, as the caller's stream gets them (marked, controls made visible)
        state = _terminal.LINE_START
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character split across chunks stays whole
        try:
            while chunk := self.pipe.readline(64 * 1024):
                if self.target is None or written > self.cap:
                    continue  # keep draining, so the worker never blocks on a full pipe
                text, after = _terminal.mark_lines(decoder.decode(chunk), OUTPUT_PREFIX, state)
                size = len(text.encode())
                if written + size > self.cap:
                    written = self.cap + 1
                    self._write(("\n" if state == _terminal.MID_LINE else "") + OUTPUT_TRUNCATED)
                    continue
                written += size
                self._write(text)
                state = after
            if state == _terminal.MID_LINE and written <= self.cap:
                self._write("\n")
        finally:
            self.pipe.close()

    def _write(self, text: str) -> None:
        if self.target is None:
            return
        try:
            self.target.write(text)
            self.target.flush()
        except Exception:
            self.target = None  # the caller's stream went away: drain silently
