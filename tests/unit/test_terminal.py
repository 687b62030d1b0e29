"""safehub/_terminal.py: a worker's output reaches the caller with every control character visible."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safehub import _terminal
from safehub._terminal import AFTER_CR, CONTROLS, LINE_START, MID_LINE, mark_lines, visible

P = "[w] "
SHOWN_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


def relay(*chunks: str) -> str:
    """What the relay writes for these chunks, the last newline included."""
    out, state = [], LINE_START
    for chunk in chunks:
        text, state = mark_lines(chunk, P, state)
        out.append(text)
    return "".join(out) + ("\n" if state == MID_LINE else "")


def shown(text: str) -> list[str]:
    """Control characters left in relayed text (the check the caller's terminal cares about)."""
    return [ch for ch in text if ch not in "\n\t" and unicodedata.category(ch) in SHOWN_CATEGORIES]


def test_the_control_table_covers_this_pythons_unicode():
    matched = {chr(c) for c in range(0x110000) if CONTROLS.fullmatch(chr(c))}
    wanted = {chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) in SHOWN_CATEGORIES}
    assert wanted - matched == set(), "a control character this Python knows is not made visible"
    # Beyond this Python's Unicode only characters it does not know yet (newer Unicode's controls).
    assert {unicodedata.category(ch) for ch in matched - wanted} <= {"Cn"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),  # clear the screen
        ("\x1b]52;c;cHduZWQ=\x07", "\\x1b]52;c;cHduZWQ=\\x07"),  # OSC 52: the clipboard
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # the window title
        ("rm -rf ~\x08\x08ls", "rm -rf ~\\x08\\x08ls"),  # backspaces
        ("\x00\x7f", "\\x00\\x7f"),
        ("\u009b31m\u0085", "\\x9b31m\\x85"),  # C1 CSI and NEL, as UTF-8 brings them
        ("abc\u202edef\u202c", "abc\\u202edef\\u202c"),  # a bidi override
        ("a\u2066b\u2069", "a\\u2066b\\u2069"),  # isolates
        ("zero\u200bwidth\u200d\ufeff", "zero\\u200bwidth\\u200d\\ufeff"),
        ("tag\U000e0041", "tag\\U000e0041"),  # invisible tag characters
        ("a\u2028b", "a\\u2028b"),  # the line separator
        ("tab\tstays", "tab\tstays"),
        ("ünïcödé, 漢字 and emoji 🙂 stay", "ünïcödé, 漢字 and emoji 🙂 stay"),
    ],
)
def test_controls_become_visible(raw, expected):
    assert visible(raw) == expected
    assert relay(raw + "\n") == P + expected + "\n"


def test_lines_are_marked_and_newline_and_tab_kept():
    assert relay("one\n", "two\n\n", "three") == f"{P}one\n{P}two\n{P}\n{P}three\n"
    assert relay("a\tb\n") == f"{P}a\tb\n"


def test_a_carriage_return_ends_the_line_instead_of_overwriting_it():
    assert relay("all tests passed\rFAILURE HIDDEN\n") == f"{P}all tests passed\n{P}FAILURE HIDDEN\n"


def test_a_progress_bar_reads_as_one_line_per_update():
    bar = "".join(f"\r{n:3d}%|{'#' * (n // 10):<10}|" for n in (0, 50, 100)) + "\n"
    assert relay(bar) == f"{P}  0%|          |\n{P} 50%|#####     |\n{P}100%|##########|\n"


def test_carriage_returns_at_a_line_start_do_nothing_and_crlf_is_one_line_end():
    assert relay("\r\r\rx\n") == f"{P}x\n"
    assert relay("dos\r\nlines\r\n\r\nend\r\n") == f"{P}dos\n{P}lines\n{P}\n{P}end\n"
    assert relay("a\r\r\nb\n") == f"{P}a\n{P}b\n"


def test_crlf_split_across_chunks_is_still_one_line_end():
    assert relay("dos\r", "\nnext\n") == f"{P}dos\n{P}next\n"
    assert relay("dos\r", "\r\nnext\n") == f"{P}dos\n{P}next\n"
    assert relay("half", " a line\n") == f"{P}half a line\n"


def test_states():
    assert mark_lines("", P) == ("", LINE_START)
    assert mark_lines("x", P)[1] == MID_LINE
    assert mark_lines("x\r", P)[1] == AFTER_CR
    assert mark_lines("x\n", P)[1] == LINE_START


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=40), max_size=8))
def test_nothing_a_terminal_acts_on_gets_through(chunks):
    out = relay(*chunks)
    assert shown(out) == []
    assert "\r" not in out
    lines = out.split("\n")
    assert lines[-1] == "" and all(line.startswith(P) for line in lines[:-1])


def test_visible_lines_keeps_lines_and_shows_every_other_control():
    text = "line 1\r\x1b]52;c;aGk=\x07\nline 3\t\u202e\n"
    assert _terminal.visible_lines(text) == "line 1\n\\x1b]52;c;aGk=\\x07\nline 3\t\\u202e\n"
    assert _terminal.visible_lines(text, "[worker] ").splitlines()[1] == "[worker] \\x1b]52;c;aGk=\\x07"
    assert _terminal.visible_lines(_terminal.visible_lines(text)) == _terminal.visible_lines(text)  # idempotent
