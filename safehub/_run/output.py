"""The worker's stdout and stderr on the caller's streams: line by line, marked, capped."""

from __future__ import annotations

import threading
from typing import IO

OUTPUT_CAP = 1024 * 1024  # bytes of each of stdout and stderr relayed per call
OUTPUT_PREFIX = "[worker] "
OUTPUT_TRUNCATED = "[worker output truncated]\n"


class Relay(threading.Thread):
    """Copy one of the worker's pipes to the caller's stream, line by line, marked and capped."""

    def __init__(self, pipe: IO[bytes], target: IO[str] | None, cap: int = OUTPUT_CAP) -> None:
        super().__init__(name="safehub-worker-output", daemon=True)
        self.pipe = pipe
        self.target = target
        self.cap = cap

    def run(self) -> None:
        written = 0
        at_line_start = True
        try:
            while chunk := self.pipe.readline(64 * 1024):
                if self.target is None or written > self.cap:
                    continue  # keep draining, so the worker never blocks on a full pipe
                if written + len(chunk) > self.cap:
                    written = self.cap + 1
                    self._write(("\n" if not at_line_start else "") + OUTPUT_TRUNCATED)
                    continue
                written += len(chunk)
                text = chunk.decode("utf-8", "replace")
                self._write((OUTPUT_PREFIX if at_line_start else "") + text)
                at_line_start = chunk.endswith(b"\n")
            if not at_line_start and written <= self.cap:
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
