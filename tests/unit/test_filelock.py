"""safehub._filelock.locked: a real lock file, held by a real second process."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest

from safehub import _filelock, constants

# Holds the lock through safehub's own helper until a line arrives on stdin (or stdin closes).
HOLDER = r"""
import sys
from safehub import _filelock
with _filelock.locked(sys.argv[1], "the test's file"):
    print("held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""

HANG_GUARD_S = 60  # only so a broken lock fails the test instead of hanging it


class _Waiting(logging.Handler):
    """Sets ``seen`` on the first "still waiting" line from safehub."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "waiting for lock on" in message:
            self.messages.append(message)
            self.seen.set()


@pytest.fixture
def holder(tmp_path):
    lock_path = tmp_path / "thing.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc, lock_path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=HANG_GUARD_S)


def test_waits_for_another_process_and_says_so(holder, monkeypatch):
    proc, lock_path = holder
    monkeypatch.setattr(constants, "LOCK_LOG_EVERY_S", 0.05)
    handler = _Waiting()
    logger = logging.getLogger("safehub")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    acquired = threading.Event()

    def take() -> None:
        with _filelock.locked(lock_path, "the test's file"):
            acquired.set()

    thread = threading.Thread(target=take, daemon=True)
    try:
        thread.start()
        assert handler.seen.wait(HANG_GUARD_S), "no 'waiting' line while the other process held the lock"
        assert not acquired.is_set()
        assert "the test's file" in handler.messages[0] and str(lock_path) in handler.messages[0]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert acquired.wait(HANG_GUARD_S), "the lock was not taken once the other process let go"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        thread.join(HANG_GUARD_S)
    assert proc.stdout.readline() == "released\n"


def test_a_killed_holder_leaves_no_lock_behind(holder):
    proc, lock_path = holder
    proc.kill()
    proc.wait(HANG_GUARD_S)
    with _filelock.locked(lock_path, "the test's file"):
        pass


def test_released_when_the_block_raises(tmp_path):
    lock_path = tmp_path / "sub" / "thing.lock"  # missing folders are created
    with pytest.raises(RuntimeError), _filelock.locked(lock_path, "x"):
        raise RuntimeError("boom")
    # Another process can take it now: the lock went with the exception.
    out = subprocess.run([sys.executable, "-c", HOLDER, str(lock_path)], input="\n", text=True,
                         capture_output=True, timeout=HANG_GUARD_S)
    assert out.stdout == "held\nreleased\n", out.stderr
