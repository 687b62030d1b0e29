"""What the parent reads in a worker's sandbox report: hostile figures make at most a message."""

from __future__ import annotations

import pytest

from safehub._run.replies import scratch_full as _scratch_full

MIB = 1024**2


@pytest.mark.parametrize(
    ("report", "full"),
    [
        ({"scratch": {"size": 16 * MIB, "free": 0}}, True),
        ({"scratch": {"size": 16 * MIB, "free": 4096}}, True),
        ({"scratch": {"size": 16 * MIB, "free": 8 * MIB}}, False),
        ({"scratch": {"size": "16", "free": 0}}, False),
        ({"scratch": {"size": 16 * MIB, "free": 0.5}}, False),
        ({"scratch": {"size": 0, "free": 0}}, False),
        ({"scratch": ["size"]}, False),
        ({"scratch": None}, False),
        ({}, False),
        (None, False),
        ("scratch", False),
    ],
)
def test_a_full_scratch_is_read_from_the_report_with_care(report, full):
    note = _scratch_full(report)
    assert bool(note) is full
    if full:
        assert "16 MiB" in note and "max_scratch_size" in note
