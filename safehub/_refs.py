"""Parse ``owner/repo[:ref]`` by GitHub's naming rules, and resolve a ref to a commit SHA.

Parsing happens before any network or disk access: a string that could not name a GitHub
repository is refused here, so no later step ever builds a path or a URL from it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from . import _github, constants
from .errors import ForkCommitError, InvalidRefError, RefNotFoundError

# GitHub user and organisation names: letters, digits and hyphens, no leading hyphen, at most 39.
# Underscores are allowed for GitHub Enterprise managed users (``name_shortcode``).
_OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,38}")
# Repository names: letters, digits, '.', '-', '_', at most 100.
_REPO_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")
_HEX_RE = re.compile(r"[0-9a-f]{4,40}")
_FULL_SHA_RE = re.compile(r"[0-9a-f]{40}")
# Bytes git refuses in a ref name (git check-ref-format): controls, space, ~ ^ : ? * [ \ and DEL.
_BAD_REF_CHARS = re.compile(r"[\x00-\x20~^:?*\[\\\x7f]")
_MAX_REF_LEN = 255


@dataclass(frozen=True)
class RepoRef:
    """What the user asked for: ``ref`` is None when they named no ref."""

    owner: str
    repo: str
    ref: str | None

    @property
    def slug(self) -> str:
        return f"{self.owner}/{self.repo}"

    def __str__(self) -> str:
        return self.slug if self.ref is None else f"{self.slug}:{self.ref}"


@dataclass(frozen=True)
class ResolvedRef:
    """What the ref resolved to. ``ref`` names the cache folder (the default branch if none given).

    ``commit_sha`` is None when validation was skipped: no API was asked, and the archive of
    ``ref`` tells the commit once downloaded.
    """

    owner: str
    repo: str
    ref: str
    commit_sha: str | None
    kind: str  # "branch", "tag", "commit", "locked", or "ref" when validation was skipped
    is_default_branch: bool


def parse(value: object) -> RepoRef:
    """Split ``owner/repo[:ref]`` and check each part; raise InvalidRefError on anything else."""
    if not isinstance(value, str):
        raise InvalidRefError(
            f"Expected a string 'owner/repo[:ref]', got {type(value).__name__}.", value=value
        )
    if "://" in value or value.startswith(("http:", "https:", "git@")):
        raise InvalidRefError(
            f"{value!r} looks like a URL. Pass 'owner/repo' or 'owner/repo:ref', e.g. 'pytorch/vision:v0.10.0'.",
            value=value,
        )
    repo_info, sep, ref = value.partition(":")
    parts = repo_info.split("/")
    if len(parts) != 2:
        raise InvalidRefError(
            f"{value!r} is not of the form 'owner/repo[:ref]' (e.g. 'pytorch/vision:v0.10.0').",
            value=value,
        )
    owner, repo = parts
    if not _OWNER_RE.fullmatch(owner) or owner.startswith("-") or owner.endswith("-"):
        raise InvalidRefError(
            f"{owner!r} is not a valid GitHub owner name (letters, digits and single hyphens, "
            "at most 39 characters).",
            value=value,
        )
    if not _REPO_RE.fullmatch(repo) or repo in (".", ".."):
        raise InvalidRefError(
            f"{repo!r} is not a valid GitHub repository name (letters, digits, '.', '-', '_').",
            value=value,
        )
    if not sep:
        return RepoRef(owner, repo, None)
    check_ref_name(ref, value)
    return RepoRef(owner, repo, ref)


def check_ref_name(ref: str, value: str) -> None:
    """git check-ref-format's rules, which GitHub applies to branch and tag names."""
    problem = None
    if not ref:
        problem = "the ref after ':' is empty; drop the ':' to use the default branch"
    elif len(ref) > _MAX_REF_LEN:
        problem = f"the ref is longer than {_MAX_REF_LEN} characters"
    elif _BAD_REF_CHARS.search(ref):
        problem = "the ref contains a control character, space, or one of ~ ^ : ? * [ \\"
    elif ".." in ref or "@{" in ref or ref == "@":
        problem = "the ref contains '..' or '@{'"
    elif ref.startswith("/") or ref.endswith("/") or "//" in ref:
        problem = "the ref has an empty path component"
    elif ref.endswith(".") or any(c.startswith(".") or c.endswith(".lock") for c in ref.split("/")):
        problem = "a component of the ref starts with '.', ends with '.lock', or the ref ends with '.'"
    if problem:
        raise InvalidRefError(f"Invalid ref in {value!r}: {problem}.", value=value)


def resolve(repo_ref: RepoRef, *, skip_validation: bool = False) -> ResolvedRef:
    """Resolve the ref to a full commit SHA through the GitHub API.

    The commit must be held by a branch or tag of the repository itself: GitHub serves a fork's
    commits through the parent repository's URLs, so a SHA alone proves nothing about who wrote it.
    With ``skip_validation``, nothing is asked (see :func:`_unvalidated`).
    """
    owner, repo = repo_ref.owner, repo_ref.repo
    if skip_validation:
        return _unvalidated(repo_ref)
    default_branch: str | None = None
    ref = repo_ref.ref
    if ref is None:
        default_branch = _github.get_repo(owner, repo)["default_branch"]
        ref = default_branch

    branches = {b["name"]: b["commit"]["sha"] for b in _github.iter_branches(owner, repo)}
    tags = {t["name"]: t["commit"]["sha"] for t in _github.iter_tags(owner, repo)}
    is_default = repo_ref.ref is None
    if ref in branches:
        if ref in tags:
            # torch.hub's choice, kept: git warns and prefers the branch too.
            warnings.warn(
                f"The ref {ref} of {owner}/{repo} is both a branch and a tag; using the branch. "
                f"To load the tag, pass its commit SHA ({tags[ref][:12]}).",
                UserWarning,
                stacklevel=4,
            )
        return ResolvedRef(owner, repo, ref, branches[ref], "branch", is_default)
    if ref in tags:
        return ResolvedRef(owner, repo, ref, tags[ref], "tag", False)
    if not _HEX_RE.fullmatch(ref):
        raise RefNotFoundError(
            f"{owner}/{repo} has no branch or tag named {ref!r}. Check the spelling, "
            f"or pass a commit SHA.",
            repo=f"{owner}/{repo}",
            ref=ref,
            url=None,
            status=404,
        )
    # A commit SHA: a branch or tag head first (no more requests), then the branches' history.
    for sha in (*branches.values(), *tags.values()):
        if sha.startswith(ref):
            return ResolvedRef(owner, repo, ref, sha, "commit", False)
    sha = _github.get_commit(owner, repo, ref)["sha"]
    if default_branch is None:
        default_branch = _github.get_repo(owner, repo)["default_branch"]
    candidates = [default_branch] + sorted(b for b in branches if b != default_branch)
    for branch in candidates[: 1 + constants.MAX_BRANCHES_COMPARED]:
        if _github.compare_status(owner, repo, branch, sha) in ("behind", "identical"):
            return ResolvedRef(owner, repo, ref, sha, "commit", False)
    raise ForkCommitError(
        f"Commit {sha[:12]} is not on any branch or tag of {owner}/{repo}. GitHub serves commits "
        "of forks through the parent repository, so this may be someone else's code. Load it "
        "from the fork that holds it ('fork-owner/repo:sha'), or pass skip_validation=True if "
        "you know where it comes from.",
        repo=f"{owner}/{repo}",
        ref=ref,
        url=None,
        status=None,
    )


def _unvalidated(repo_ref: RepoRef) -> ResolvedRef:
    """torch.hub's ``skip_validation=True``: no API request, so no token sent and no rate limit spent.

    The archive is then downloaded by ref, and its zip comment tells the commit. With no ref, the
    default branch is torch.hub's guess: ``main`` if the web host has a ``tree/main``, else
    ``master`` (:func:`_github.guess_default_branch`).
    """
    owner, repo = repo_ref.owner, repo_ref.repo
    ref = repo_ref.ref if repo_ref.ref is not None else _github.guess_default_branch(owner, repo)
    commit_sha = ref if _FULL_SHA_RE.fullmatch(ref) else None
    return ResolvedRef(owner, repo, ref, commit_sha, "ref", repo_ref.ref is None)
