"""safehub's messages: the ``logging`` logger ``"safehub"``, with torch.hub's lines on stderr by default.

torch.hub writes "Using cache found in ..." and "Downloading: ..." straight to stderr, and its
users expect to see them without configuring anything. safehub sends every message to the logger
``"safehub"`` at INFO, and echoes it to stderr itself only while nobody would otherwise see it.

The rule, decided per message:

- ``verbose=False``: logged, never echoed (torch.hub's ``verbose=False`` mutes these lines).
- ``logging.getLogger("safehub").hasHandlers()`` is true (the application configured logging:
  ``logging.basicConfig()``, a handler on the root logger or on ``"safehub"``, pytest's log
  capture): the handlers decide what is shown and where; safehub writes nothing itself, so no line
  appears twice.
- Otherwise: the bare message goes to ``sys.stderr``, as torch.hub writes it.

To silence the echo without configuring logging, attach a handler to ``"safehub"`` (for example
``logging.NullHandler()``); to see the lines through logging, configure logging as usual.

:func:`progress` gives a tqdm bar on stderr for downloads only where someone watches (stderr is
a terminal) and ``verbose`` is on; elsewhere (CI logs, pipes) it does nothing. Every download
bar of the process goes through it, those made on a worker's behalf included. :func:`set_quiet`
(the command line's ``-q``) turns the bars off for the whole process.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from ._terminal import visible

logger = logging.getLogger("safehub")
_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """No progress bars at all in this process (``safehub -q``); messages are the logger's to silence."""
    global _quiet
    _quiet = quiet


def info(msg: str, *, verbose: bool = True) -> None:
    """Log ``msg`` at INFO on ``"safehub"``; echo it to stderr when verbose and logging is unconfigured.

    Control characters are made visible (``_terminal``): a message may name what the worker chose
    (a URL it fetched, a layer's report)."""
    msg = visible(msg)
    logger.info(msg)
    if verbose and not logger.hasHandlers():
        stream = sys.stderr
        if stream is None:  # pythonw, or a daemon that closed it
            return
        try:
            stream.write(msg + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not fail a load


def warning(msg: str) -> None:
    """Log ``msg`` at WARNING on ``"safehub"``; with logging unconfigured, Python's last-resort handler shows it.
    Control characters are made visible, as by :func:`info`."""
    logger.warning(visible(msg))


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream is not None and stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


@contextlib.contextmanager
def progress(desc: str, *, verbose: bool = True, total: int | None = None) -> Iterator[Callable[[int], None] | None]:
    """A callback taking a byte count, drawing a tqdm bar on a terminal's stderr; None when quiet."""
    if not verbose or _quiet or not _is_terminal(sys.stderr):
        yield None
        return
    from tqdm import tqdm  # only when a bar is drawn

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, leave=False) as bar:
        yield bar.update
