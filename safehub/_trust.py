"""Trust: torch.hub's ``trusted_list`` file and ``trust_repo`` values, asked only when needed.

Trust is needed exactly when the repository's code would run outside a sandbox (DESIGN section
2); the caller decides that and passes ``needed``. Unlike torch.hub, a folder present in the
cache is not taken as trust, and with no terminal the answer is an error, never a hang or an
empty "yes".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import _cache, constants
from .errors import InvalidArgumentError, UntrustedRepoError


def trusted_list_path() -> Path:
    return _cache.trusted_list_path()


def _entry(owner: str, repo: str) -> str:
    return f"{owner}_{repo}"


def read_trusted() -> list[str]:
    """The entries of ``trusted_list`` (torch.hub writes ``owner_repo``, one a line)."""
    try:
        text = trusted_list_path().read_text()
    except FileNotFoundError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def is_trusted(owner: str, repo: str) -> bool:
    return _entry(owner, repo) in read_trusted() or owner in constants.TRUSTED_REPO_OWNERS


def add(owner: str, repo: str) -> bool:
    """Add ``owner/repo`` to ``trusted_list``; return False if it was there already."""
    path = trusted_list_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _cache.locked(constants.TRUSTED_LIST_NAME):
        entries = read_trusted()
        if _entry(owner, repo) in entries:
            return False
        _rewrite(path, [*entries, _entry(owner, repo)])
    return True


def remove(owner: str, repo: str) -> bool:
    """Remove ``owner/repo`` from ``trusted_list``; return False if it was not there."""
    path = trusted_list_path()
    with _cache.locked(constants.TRUSTED_LIST_NAME):
        entries = read_trusted()
        if _entry(owner, repo) not in entries:
            return False
        _rewrite(path, [e for e in entries if e != _entry(owner, repo)])
    return True


def _rewrite(path: Path, entries: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(e + "\n" for e in entries))
    os.replace(tmp, path)


def validate(trust_repo: object) -> None:
    # torch.hub silently trusts any other value (None, "yes"); refuse them instead.
    if not (trust_repo is True or trust_repo is False or trust_repo == "check"):
        raise InvalidArgumentError(f"trust_repo must be 'check', True or False, not {trust_repo!r}.")


def check(owner: str, repo: str, trust_repo: object, *, needed: bool) -> None:
    """Apply ``trust_repo`` (``"check"``, True or False) as torch.hub does, where trust is needed.

    Raises:
        UntrustedRepoError: not trusted, and the user said no or there is no terminal to ask.
        InvalidArgumentError: ``trust_repo`` is none of the three values.
    """
    validate(trust_repo)
    if not needed:
        return
    slug = f"{owner}/{repo}"
    if trust_repo is True:
        add(owner, repo)
        return
    if trust_repo == "check" and is_trusted(owner, repo):
        return
    if not _can_prompt():
        raise UntrustedRepoError(
            f"The repository {slug} is not in your trusted list and there is no terminal to ask. "
            f"Its code would run in this process. Either trust it: pass trust_repo=True, or run "
            f"`safehub trust add {slug}`; or keep its code in the sandbox: "
            f"safehub.load(..., isolate=True, returns='weights') or returns='remote', which need no trust.",
            repo=slug,
        )
    answer = input(
        f"The repository {slug} does not belong to the list of trusted repositories and as such "
        "cannot be downloaded. Do you trust this repository and wish to add it to the trusted "
        "list of repositories (y/N)?"
    ).strip().lower()
    if answer in ("y", "yes"):
        if not add(owner, repo):
            print("The repository is already trusted.")
        return
    if answer in ("n", "no", ""):
        raise UntrustedRepoError(f"Untrusted repository: {slug}.", repo=slug)
    raise InvalidArgumentError(f"Unrecognized response {answer!r}: answer y or n.")


def _can_prompt() -> bool:
    stdin = sys.stdin
    try:
        return stdin is not None and not stdin.closed and stdin.isatty()
    except (AttributeError, ValueError):
        return False
