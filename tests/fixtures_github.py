"""Pytest fixtures for the loopback GitHub emulator (loaded via ``pytest_plugins``).

- ``github_emulator`` (session): the running emulator, shared by the whole session.
- ``github`` (function): the same emulator, with faults, the request log and ``require_token``
  reset, SAFEHUB_GITHUB_URL / SAFEHUB_GITHUB_API_URL pointing at it, and repositories and files
  registered during the test unregistered afterwards.
- ``make_repo`` (function): ``make_repo(owner, name, files=None, default_branch="main", private=False)`` builds a
  committed git repository under tmp_path_factory and registers it; returns a GitRepo.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import pytest

from tests.git_repos import FileData, GitRepo
from tests.github_emulator import GitHubEmulator

__all__ = ["github_emulator", "github", "make_repo"]


@pytest.fixture(scope="session")
def github_emulator() -> Iterator[GitHubEmulator]:
    with GitHubEmulator() as emu:
        yield emu


@pytest.fixture
def github(github_emulator: GitHubEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[GitHubEmulator]:
    emu = github_emulator
    emu.reset()
    saved = emu.snapshot()
    monkeypatch.setenv("SAFEHUB_GITHUB_URL", emu.url)
    monkeypatch.setenv("SAFEHUB_GITHUB_API_URL", emu.api_url)
    yield emu
    emu.reset()
    emu.restore(saved)


MakeRepo = Callable[..., GitRepo]


@pytest.fixture
def make_repo(github: GitHubEmulator, tmp_path_factory: pytest.TempPathFactory) -> MakeRepo:
    def make(owner: str, name: str, files: Mapping[str, FileData] | None = None,
             default_branch: str = "main", message: str = "Initial commit", private: bool = False) -> GitRepo:
        path = tmp_path_factory.mktemp(re.sub(r"[^A-Za-z0-9_.-]", "_", f"{owner}-{name}"))
        repo = GitRepo(path / "repo", initial_branch=default_branch)
        if files:
            repo.write(files)
        repo.commit(message)
        repo.owner, repo.name = owner, name
        github.add_repo(owner, name, repo.path, default_branch=default_branch, private=private)
        return repo

    return make
