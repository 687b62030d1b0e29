"""Make a worker's output safe to show: control characters visible, every line marked.

The worker's stdout and stderr are the repository's, and they reach the caller's stream, often a
terminal or a CI log. A terminal acts on control characters: escape sequences move the cursor,
erase or rewrite lines, set the window title, write the clipboard (OSC 52); a carriage return or
backspaces write over what is shown; Unicode bidi controls reorder a line and zero-width ones
hide text inside it. So nothing of the kind passes: :func:`mark_lines` shows each as an escape
(``\\x1b``, ``\\x9b``, ``\\u202e``), keeps newline and tab, and starts every line with the
relay's prefix.

A carriage return ends the line it is on, if anything is on it (CR LF is one line end; a CR at
the start of a line does nothing): the next text starts a new marked line instead of
overwriting one, so a progress bar shows as one line per update, readable, and nothing it
prints can hide a line shown before.

The same treatment goes to every other string from the worker that the caller may show:
``safehub/errors.py`` applies :func:`visible` to every error's message and facts (a worker's
exception class and message, a remote traceback through :func:`visible_lines`), and the parent
applies them to entrypoint names and docstrings as they arrive.

Pure functions, no I/O; ``safehub/_run/output.py``'s relay calls :func:`mark_lines` per chunk.
"""

from __future__ import annotations

import re

__all__ = ["LINE_START", "MID_LINE", "AFTER_CR", "CONTROLS", "mark_lines", "visible", "visible_lines", "WORKER_PREFIX"]

WORKER_PREFIX = "[worker] "  # the mark of every line of the worker's: its output, a remote traceback

# Where the relayed stream stands between chunks.
LINE_START = 0  # nothing shown on the current line yet (the prefix is still to come)
MID_LINE = 1  # the current line has text
AFTER_CR = 2  # a carriage return just ended a line: a newline right after it belongs to it

# Every character of Unicode's categories Cc (C0, DEL, C1), Cf (format: bidi embeddings,
# overrides and isolates, zero-width space and joiners, word joiner, BOM, soft hyphen, tags,
# interlinear annotation) and Zl, Zp (line and paragraph separators), as of Unicode 15, the
# newest the supported Pythons know; tests/unit/test_terminal.py checks it against the running
# Python's unicodedata. Tab, newline and carriage return are matched too and handled apart.
CONTROLS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f]"
)
_LINE_BREAK = re.compile(r"\r+\n?|\n")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code == 0x09:
        return "\t"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str) -> str:
    """``text`` with every control character shown as its escape, tab excepted.

    Newlines and carriage returns are escaped too: :func:`mark_lines` handles them before.

    Example::

        visible("\\x1b[2Jred\\u202e")  # -> '\\\\x1b[2Jred\\\\u202e'
    """
    return CONTROLS.sub(_escape, text)


def visible_lines(text: str, prefix: str = "") -> str:
    """A whole text of several lines (a docstring, a traceback), made safe to show as the relay
    shows output (:func:`mark_lines`): newlines and tabs kept, every other control made visible.

    Example::

        visible_lines("line 1\r\x1b]52;c;aGk=\x07\n")  # -> 'line 1\n\\x1b]52;c;aGk=\\x07\n'
    """
    return mark_lines(text, prefix)[0]


def mark_lines(text: str, prefix: str, state: int = LINE_START) -> tuple[str, int]:
    """One chunk of a worker's output, made safe to show: (the text to write, the state after).

    Every line starts with ``prefix``; control characters are made visible (:func:`visible`);
    newline and tab stay; a run of carriage returns ends the line if it has text, and is dropped
    at the start of a line; CR LF is one line end, even split across chunks. ``state`` carries
    that across chunks: start with :data:`LINE_START`, pass each result's on; a stream that
    ends in :data:`MID_LINE` needs a last newline.

    Example::

        out, state = mark_lines("10%\\r20%\\r\\n\\x1b[31mdone\\n", "[worker] ")
        # out == "[worker] 10%\\n[worker] 20%\\n[worker] \\\\x1b[31mdone\\n", state == LINE_START
    """
    out: list[str] = []
    pos = 0
    for match in _LINE_BREAK.finditer(text):
        state = _line(out, text[pos : match.start()], prefix, state)
        pos = match.end()
        if match.group().endswith("\n"):
            if state == AFTER_CR:
                state = LINE_START  # the end of a CR LF split across two chunks
                continue
            if state == LINE_START:
                out.append(prefix)  # an empty line, marked as every other
            out.append("\n")
            state = LINE_START
        elif state == MID_LINE:  # carriage returns alone: they end the line, if it has text
            out.append("\n")
            state = AFTER_CR
    state = _line(out, text[pos:], prefix, state)
    return "".join(out), state


def _line(out: list[str], piece: str, prefix: str, state: int) -> int:
    if not piece:
        return state
    if state != MID_LINE:
        out.append(prefix)
    out.append(visible(piece))
    return MID_LINE
