"""Build real git repositories at test time with the ``git`` command.

Everything runs with a fixed author, committer and clock, ignoring the user's and the system's git
configuration, so it works on a bare CI machine and commit ids are reproducible for a given
sequence of operations on one repository.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterable, Mapping, Union

FileData = Union[str, bytes, None]

# 2021-01-01T00:00:00Z; each commit of a repository is one minute after the previous one.
_EPOCH = 1609459200

GIT_BASE_ENV = {
    "GIT_AUTHOR_NAME": "Safehub Test",
    "GIT_AUTHOR_EMAIL": "test@safehub.invalid",
    "GIT_COMMITTER_NAME": "Safehub Test",
    "GIT_COMMITTER_EMAIL": "test@safehub.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
}


def git_env(**extra: str) -> dict[str, str]:
    """The process environment plus the fixed identity, without the caller's git configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_BASE_ENV)
    env.update(extra)
    return env


class GitError(RuntimeError):
    pass


class GitRepo:
    """A git repository with a working tree at ``path`` (created with ``git init`` if needed)."""

    def __init__(self, path: str | os.PathLike, initial_branch: str = "main") -> None:
        self.path = Path(path)
        # Set by the ``make_repo`` fixture when the repository is registered with the emulator.
        self.owner: str | None = None
        self.name: str | None = None
        self._tick = 0
        if not (self.path / ".git").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self.git("init", "-q", "-b", initial_branch)
            self.git("config", "commit.gpgsign", "false")
            self.git("config", "tag.gpgsign", "false")
            self.git("config", "core.autocrlf", "false")
            self.git("config", "core.symlinks", "true")

    def __repr__(self) -> str:
        return f"GitRepo({str(self.path)!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def git(self, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None) -> str:
        """Run ``git`` in the repository and return its stripped stdout (raises GitError)."""
        self._tick += 1
        date = f"@{_EPOCH + 60 * self._tick} +0000"
        full_env = git_env(GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date, **(env or {}))
        proc = subprocess.run(
            ["git", *args], cwd=self.path, env=full_env, input=input, capture_output=True
        )
        if proc.returncode != 0:
            raise GitError(
                f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
            )
        return proc.stdout.decode(errors="replace").strip()

    def rev_parse(self, ref: str) -> str:
        return self.git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")

    # -- working tree --------------------------------------------------------------------------

    def write(self, files: Mapping[str, FileData]) -> None:
        """Write files (str is UTF-8 encoded; None deletes the file) and stage everything."""
        for rel, data in files.items():
            target = self.path / rel
            if data is None:
                if target.is_symlink() or target.exists():
                    target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink():
                target.unlink()
            target.write_bytes(data.encode() if isinstance(data, str) else data)
        self.git("add", "-A")

    def symlink(self, path: str, target: str) -> None:
        """Create (or replace) a symlink at ``path`` pointing to ``target`` and stage it."""
        link = self.path / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(target, link)
        self.git("add", "-A")

    def commit(self, msg: str = "commit", files: Mapping[str, FileData] | None = None) -> str:
        """Commit the staged tree (optionally writing ``files`` first); empty commits are allowed."""
        if files:
            self.write(files)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "--no-verify", "-m", msg)
        return self.head_sha()

    # -- refs ----------------------------------------------------------------------------------

    def branch(self, name: str, at: str | None = None) -> str:
        """Create or move branch ``name`` to ``at`` (default HEAD) without checking it out."""
        sha = self.rev_parse(at or "HEAD")
        self.git("update-ref", f"refs/heads/{name}", sha)
        return sha

    def branches(self, names: Iterable[str], at: str | None = None) -> None:
        """Create many branches at once (one ``git update-ref --stdin``)."""
        sha = self.rev_parse(at or "HEAD")
        script = "".join(f"update refs/heads/{n} {sha}\n" for n in names)
        self.git("update-ref", "--stdin", input=script.encode())

    def delete_branch(self, name: str) -> None:
        self.git("update-ref", "-d", f"refs/heads/{name}")

    def checkout(self, name: str, create: bool = False) -> None:
        if create:
            self.git("checkout", "-q", "-b", name)
        else:
            self.git("checkout", "-q", name)

    def tag(self, name: str, at: str | None = None, message: str | None = None) -> str:
        """Create a tag at ``at`` (default HEAD): lightweight, or annotated when ``message`` is given.

        Returns the commit sha the tag points to (peeled).
        """
        sha = self.rev_parse(at or "HEAD")
        if message is None:
            self.git("tag", name, sha)
        else:
            self.git("tag", "-a", name, "-m", message, sha)
        return sha

    def head_sha(self, branch: str | None = None) -> str:
        """The commit sha of ``branch`` (default: the current HEAD)."""
        return self.rev_parse(f"refs/heads/{branch}" if branch else "HEAD")

    def current_branch(self) -> str:
        return self.git("symbolic-ref", "--short", "HEAD")
