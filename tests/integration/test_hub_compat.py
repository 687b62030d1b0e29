"""torch's own test/test_hub.py behaviours, run against safehub through the GitHub emulator.

Where safehub deliberately differs from torch.hub, the test says so and checks safehub's way.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import safehub
from safehub.errors import ForkCommitError, UntrustedRepoError

# The emulator's stand-in for ailzhang/torchhub_example: a hubconf whose model sums to a known value.
HUBCONF = '''
dependencies = ["torch"]

import torch


def mnist(pretrained=False, **kwargs):
    """A tiny MNIST-shaped model."""
    model = torch.nn.Linear(4, 2)
    if pretrained:
        with torch.no_grad():
            model.weight.fill_(1.0)
            model.bias.fill_(0.5)
    return model


def _private_helper():
    return None
'''
SUM_OF_HUB_EXAMPLE = 4 * 2 * 1.0 + 2 * 0.5


def sum_of_state_dict(state_dict):
    return float(sum(v.sum() for v in state_dict.values()))


@pytest.fixture
def example(make_repo):
    repo = make_repo("ailzhang", "torchhub_example", {"hubconf.py": HUBCONF}, default_branch="master")
    repo.branch("ci/test_slash")
    return repo


def test_load_from_github(example):
    model = safehub.load("ailzhang/torchhub_example", "mnist", source="github", pretrained=True,
                         verbose=False, trust_repo=True)
    assert sum_of_state_dict(model.state_dict()) == SUM_OF_HUB_EXAMPLE


def test_load_from_local_dir(example, tmp_path):
    model = safehub.load(str(example.path), "mnist", source="local", pretrained=True, verbose=False)
    assert sum_of_state_dict(model.state_dict()) == SUM_OF_HUB_EXAMPLE


def test_load_from_branch_with_slash(example):
    model = safehub.load("ailzhang/torchhub_example:ci/test_slash", "mnist", pretrained=True,
                         verbose=False, trust_repo=True)
    assert sum_of_state_dict(model.state_dict()) == SUM_OF_HUB_EXAMPLE
    assert os.path.isdir(os.path.join(safehub.get_dir(), "ailzhang_torchhub_example_ci_test_slash"))


def test_get_set_dir(example, tmp_path, monkeypatch):
    previous = safehub.get_dir()
    safehub.set_dir(str(tmp_path))
    assert safehub.get_dir() == str(tmp_path) != previous
    model = safehub.load("ailzhang/torchhub_example", "mnist", pretrained=True, verbose=False,
                         trust_repo=True)
    assert sum_of_state_dict(model.state_dict()) == SUM_OF_HUB_EXAMPLE
    # The default branch comes from the API (master here), as torch.hub names the folder.
    assert (tmp_path / "ailzhang_torchhub_example_master").is_dir()
    safehub.set_dir(os.path.join("~", "hub"))
    assert safehub.get_dir() == os.path.expanduser(os.path.join("~", "hub"))


def test_default_hub_dir_follows_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert safehub.get_dir() == str(tmp_path / "th" / "hub") == torch.hub.get_dir()
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert safehub.get_dir() == str(tmp_path / "xdg" / "torch" / "hub") == torch.hub.get_dir()


def test_list_entrypoints(example):
    entrypoints = safehub.list("ailzhang/torchhub_example", trust_repo=True)
    assert "mnist" in entrypoints and "_private_helper" not in entrypoints
    assert entrypoints == sorted(entrypoints)


def test_help(example):
    assert "tiny MNIST" in safehub.help("ailzhang/torchhub_example", "mnist", trust_repo=True)


def test_default_branch_comes_from_the_api(make_repo):
    make_repo("o", "on-main", {"hubconf.py": "def f():\n    return 'main'\n"}, default_branch="main")
    trunk = make_repo("o", "on-trunk", {"hubconf.py": "def f():\n    return 'trunk'\n"},
                      default_branch="trunk")
    trunk.branch("main")  # torch.hub would guess 'main' here; the API says 'trunk'
    trunk.commit("trunk moves on", {"hubconf.py": "def f():\n    return 'trunk2'\n"})
    assert safehub.load("o/on-main", "f", trust_repo=True) == "main"
    assert safehub.load("o/on-trunk", "f", trust_repo=True) == "trunk2"


def test_load_commit_from_forked_repo(example, github):
    sha = github.add_fork_commit("ailzhang", "torchhub_example", {"hubconf.py": "def evil():\n    pass\n"})
    with pytest.raises(ForkCommitError) as info:
        safehub.load(f"ailzhang/torchhub_example:{sha[:7]}", "evil", trust_repo=True)
    assert isinstance(info.value, ValueError)
    assert "fork" in str(info.value)
    assert not os.path.exists(os.path.join(safehub.get_dir(), f"ailzhang_torchhub_example_{sha[:7]}"))


def _trusted_lines():
    path = os.path.join(safehub.get_dir(), "trusted_list")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.strip() for line in f]


def test_trust_repo_true(example):
    safehub.load("ailzhang/torchhub_example", "mnist", trust_repo=True)
    assert "ailzhang_torchhub_example" in _trusted_lines()


def test_trust_repo_builtin_trusted_owners(make_repo):
    make_repo("pytorch", "vision", {"hubconf.py": "def resnet18():\n    return 'r18'\n"})
    assert safehub.load("pytorch/vision", "resnet18", trust_repo="check") == "r18"
    assert _trusted_lines() == []


def test_trust_repo_check_without_terminal_fails_at_once(example, github):
    # torch.hub calls input() here and dies with EOFError in CI; safehub names the fixes.
    with pytest.raises(UntrustedRepoError) as info:
        safehub.load("ailzhang/torchhub_example", "mnist", trust_repo="check")
    message = str(info.value)
    assert "trust_repo=True" in message and "safehub trust add" in message and "weights" in message
    assert github.requests() == [], "an untrusted repository must cost no network request"
    assert _trusted_lines() == []


def test_trust_repo_false_without_terminal_fails(example):
    safehub.load("ailzhang/torchhub_example", "mnist", trust_repo=True)
    with pytest.raises(UntrustedRepoError):
        safehub.load("ailzhang/torchhub_example", "mnist", trust_repo=False)


def test_cached_folder_is_not_trust(example):
    # torch.hub's "legacy" rule trusts any repo already in the cache; safehub does not.
    safehub.load("ailzhang/torchhub_example", "mnist", trust_repo=True)
    os.remove(os.path.join(safehub.get_dir(), "trusted_list"))
    with pytest.raises(UntrustedRepoError):
        safehub.load("ailzhang/torchhub_example", "mnist", trust_repo="check")


@pytest.mark.parametrize("value", [None, "yes", 1.5])
def test_trust_repo_other_values_refused(value):
    with pytest.raises(ValueError, match="trust_repo"):
        safehub.load("ailzhang/torchhub_example", "mnist", trust_repo=value)


def test_unknown_source():
    with pytest.raises(ValueError, match="Unknown source"):
        safehub.load("a/b", "m", source="gitlab")


def test_ambiguous_tag_and_branch_prefers_branch(make_repo):
    repo = make_repo("o", "amb", {"hubconf.py": "def which():\n    return 'tag'\n"})
    repo.tag("v1")
    repo.checkout("v1-work", create=True)
    repo.commit("branch", {"hubconf.py": "def which():\n    return 'branch'\n"})
    repo.branch("v1", at="v1-work")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert safehub.load("o/amb:v1", "which", trust_repo=True) == "branch"
    assert any("both a branch and a tag" in str(w.message) for w in caught)
