"""safehub._log: torch.hub's lines on stderr until the application configures logging; progress bars."""

from __future__ import annotations

import io
import logging

from safehub import _log


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def unconfigure(monkeypatch) -> None:
    """No handler anywhere, as in a script that never touches logging. Called in the test body:
    pytest adds its capture handler to the root logger when the test phase starts."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger("safehub"), "handlers", [])


def test_echoed_to_stderr_while_logging_is_unconfigured(monkeypatch):
    unconfigure(monkeypatch)
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    _log.info("Using cache found in /x")
    _log.info("muted", verbose=False)
    assert stderr.getvalue() == "Using cache found in /x\n"


def test_handlers_take_over_from_the_echo(monkeypatch):
    unconfigure(monkeypatch)
    stderr, logged = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    logger = logging.getLogger("safehub")
    logger.addHandler(logging.StreamHandler(logged))  # undone with the monkeypatched .handlers
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        _log.info("Downloading: x")
        _log.info("quiet one", verbose=False)
    finally:
        logger.setLevel(level)
    assert stderr.getvalue() == ""
    assert logged.getvalue() == "Downloading: x\nquiet one\n"


def test_progress_only_on_a_terminal_and_when_verbose(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with _log.progress("acme/models") as on_chunk:
        assert on_chunk is None
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with _log.progress("acme/models", verbose=False) as on_chunk:
        assert on_chunk is None
    with _log.progress("acme/models") as on_chunk:
        on_chunk(2048)
    assert "acme/models" in terminal.getvalue()
