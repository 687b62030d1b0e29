"""The broker's caps live in one frozen ``Limits``, and a download is hashed once, on the way in."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import pytest

from safehub import _http, constants
from safehub._egress.limits import DEFAULT_LIMITS, CallBudget, Limits
from safehub._egress.policy import check_url
from safehub.errors import FetchRefusedError


def test_limits_are_frozen_and_hold_every_cap():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.max_fetches = 1  # type: ignore[misc]
    assert (DEFAULT_LIMITS.max_fetches, DEFAULT_LIMITS.max_url_chars) == (256, 8192)
    # No second number for the same rule anywhere in the settings.
    assert not [name for name in dir(constants) if "FETCH" in name and name != "SAFEHUB_OFFLINE"]


def test_the_url_cap_is_the_limits_one():
    base = "https://example.com/"
    check_url(base + "a" * (DEFAULT_LIMITS.max_url_chars - len(base)))
    with pytest.raises(FetchRefusedError, match="longer than 8192"):
        check_url(base + "a" * (DEFAULT_LIMITS.max_url_chars - len(base) + 1))
    with pytest.raises(FetchRefusedError, match="longer than 30"):
        check_url(base + "a" * 20, max_chars=30)


def test_the_budget_counts_fetches_against_its_limits():
    budget = CallBudget(Limits(max_fetches=2))
    budget.start_fetch("a")
    budget.start_fetch("b")
    with pytest.raises(FetchRefusedError) as info:
        budget.start_fetch("c")
    assert info.value.reason == "fetch_count" and budget.fetches == 2


class _Plain:
    """A response as urllib gives it: the body, nothing hashed."""

    def __init__(self, body: bytes) -> None:
        self._body = io.BytesIO(body)
        self.headers = {"Content-Length": str(len(body))}

    def geturl(self) -> str:
        return "https://example.com/w.pth"

    def read(self, n: int = -1) -> bytes:
        return self._body.read(n)


class _SelfHashing(_Plain):
    """A response that hashes what it reads, as the checked connection does."""

    def __init__(self, body: bytes, hasher) -> None:
        super().__init__(body)
        self._hash = hasher

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        self._hash.update(data)
        return data

    def body_sha256(self) -> str:
        return self._hash.hexdigest()


def test_a_body_is_hashed_once_whoever_reads_it(monkeypatch):
    body = b"weights" * 1000
    expected = hashlib.sha256(body).hexdigest()
    fed: list[int] = []
    real_sha256 = hashlib.sha256

    class Counting:
        def __init__(self) -> None:
            self._hash = real_sha256()

        def update(self, data: bytes) -> None:
            fed.append(len(data))
            self._hash.update(data)

        def hexdigest(self) -> str:
            return self._hash.hexdigest()

    monkeypatch.setattr(_http.hashlib, "sha256", Counting)
    for response in (_SelfHashing(body, Counting()), _Plain(body)):
        fed.clear()
        out = io.BytesIO()
        assert _http.stream_to_file(response, out) == (len(body), expected) and out.getvalue() == body
        assert sum(fed) == len(body)  # every byte hashed exactly once: by the response, or here
