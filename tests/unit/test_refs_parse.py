"""Parsing owner/repo[:ref]: every rejection happens before any network or disk access."""

from __future__ import annotations

import pytest

from safehub import _refs
from safehub.errors import InvalidRefError, SafeHubError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("pytorch/vision", ("pytorch", "vision", None)),
        ("pytorch/vision:v0.10.0", ("pytorch", "vision", "v0.10.0")),
        ("a/b:ci/test_slash", ("a", "b", "ci/test_slash")),
        ("ailzhang/torchhub_example:master", ("ailzhang", "torchhub_example", "master")),
        ("o-w-n/re.po_x-1:feature/deep/name", ("o-w-n", "re.po_x-1", "feature/deep/name")),
        ("owner/repo:4e2c216", ("owner", "repo", "4e2c216")),
        ("owner/repo:" + "a" * 40, ("owner", "repo", "a" * 40)),
        ("o/.github", ("o", ".github", None)),
    ],
)
def test_valid(value, expected):
    parsed = _refs.parse(value)
    assert (parsed.owner, parsed.repo, parsed.ref) == expected
    assert str(parsed) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "owner",
        "owner/",
        "/repo",
        "owner/repo/extra",
        "owner/repo:",
        "owner/..",
        "owner/.",
        "../repo",
        "owner/repo:../../etc",
        "owner/repo:a/../b",
        "owner/repo:a\x00b",
        "own\x00er/repo",
        "owner/re\npo",
        "owner/repo:a\tb",
        "owner/repo:a b",
        "owner/repo:a\x7fb",
        "/etc/passwd",
        "/abs/path:ref",
        "owner\\evil/repo",
        "owner/repo:a\\b",
        "https://github.com/owner/repo",
        "http://evil/owner/repo",
        "git@github.com:owner/repo",
        "owner/repo:a:b",
        "owner/repo:/leading",
        "owner/repo:trailing/",
        "owner/repo:dou//ble",
        "owner/repo:.hidden",
        "owner/repo:dir/.hidden",
        "owner/repo:name.lock",
        "owner/repo:ends.",
        "owner/repo:a@{1}",
        "owner/repo:@",
        "owner/repo:a~1",
        "owner/repo:a^",
        "owner/repo:a?",
        "owner/repo:a*",
        "owner/repo:a[b",
        "-owner/repo",
        "owner-/repo",
        "o" * 40 + "/repo",
        "owner/" + "r" * 101,
        "owner/repo:" + "x" * 256,
        "ow ner/repo",
        "owner/re po",
        "owner/rep$o",
    ],
)
def test_invalid(value):
    with pytest.raises(InvalidRefError) as info:
        _refs.parse(value)
    assert isinstance(info.value, ValueError), "torch.hub callers catch ValueError"
    assert info.value.value == value
    assert str(info.value)


@pytest.mark.parametrize("value", [None, 3, b"owner/repo", ["owner/repo"]])
def test_not_a_string(value):
    with pytest.raises(InvalidRefError):
        _refs.parse(value)


def test_url_error_says_what_to_pass():
    with pytest.raises(InvalidRefError, match="owner/repo"):
        _refs.parse("https://github.com/pytorch/vision")


def test_errors_pickle_with_their_facts():
    import pickle

    err = InvalidRefError("bad", value="x/y:..")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, InvalidRefError) and isinstance(back, SafeHubError)
    assert back.value == "x/y:.." and str(back) == "bad"
