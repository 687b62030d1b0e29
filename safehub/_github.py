"""The only module that speaks HTTP to GitHub: the REST API and the archive host.

``GITHUB_TOKEN`` (or ``SAFEHUB_GITHUB_TOKEN``) goes to the API host only, and the opener in
``_http`` drops it on any redirect that leaves the API host. Archives come from the web host with
no token, except a validated fetch (a commit SHA the API named, or a lock file pins) made while a
token is set: that one goes through the API's archive endpoint, ``/repos/{o}/{r}/zipball/{sha}``,
the way GitHub documents for private repositories. GitHub answers it with a redirect to codeload
carrying short-lived credentials of its own, so the token stays on the API host.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from . import _http, constants
from .errors import (
    AuthenticationError,
    GitHubError,
    RateLimitError,
    RefNotFoundError,
    RepoNotFoundError,
)


def _quote(part: str) -> str:
    # Branch names may hold '/': GitHub's API takes them unescaped in /commits/{ref} and compare.
    return urllib.parse.quote(part, safe="/")


def _api_headers() -> dict[str, str]:
    headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
    token = constants.GITHUB_TOKEN
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def api_get(path: str, *, repo: str | None = None) -> Any:
    """GET ``{SAFEHUB_GITHUB_API_URL}{path}`` and decode the JSON answer."""
    url = constants.SAFEHUB_GITHUB_API_URL + path
    _http.require_online(url, url=url)
    try:
        with _http.open_url(url, _api_headers()) as response:
            body = response.read(64 * 1024 * 1024)
    except _http.HTTPStatusError as exc:
        raise _translate(exc, repo) from None
    try:
        return json.loads(body)
    except ValueError as exc:
        raise GitHubError(
            f"GitHub answered {url} with something that is not JSON. Is SAFEHUB_GITHUB_API_URL "
            "pointing at a GitHub API?",
            url=url,
            status=None,
        ) from exc


def _translate(exc: _http.HTTPStatusError, repo: str | None) -> GitHubError:
    headers = {k.lower(): v for k, v in exc.headers.items()}
    message = _message(exc.body)
    where = f" for {repo}" if repo else ""
    has_token = bool(constants.GITHUB_TOKEN)
    if exc.status == 429 or (exc.status == 403 and headers.get("x-ratelimit-remaining") == "0"):
        reset = headers.get("x-ratelimit-reset")
        reset_at = int(reset) if reset and reset.isdigit() else None
        when = (
            f" It resets at {time.strftime('%H:%M:%S', time.localtime(reset_at))}."
            if reset_at
            else ""
        )
        hint = (
            "Your GITHUB_TOKEN's quota is spent; wait, or use another token."
            if has_token
            else "Set GITHUB_TOKEN to a GitHub token to get a much higher limit."
        )
        return RateLimitError(
            f"GitHub's API rate limit is exhausted.{when} {hint}",
            url=exc.url,
            status=exc.status,
            reset_at=reset_at,
        )
    if exc.status == 401:
        return AuthenticationError(
            f"GitHub refused the credentials in GITHUB_TOKEN ({message or 'Bad credentials'}). "
            "Renew the token, or unset GITHUB_TOKEN for public repositories.",
            url=exc.url,
            status=401,
        )
    if exc.status == 404:
        # GitHub answers 404, never 403, for a private repository the caller may not see.
        hint = (" If it is private, the token in GITHUB_TOKEN / SAFEHUB_GITHUB_TOKEN cannot read it: "
                "give the token read access to its contents." if has_token
                else " If it is private, set GITHUB_TOKEN (or SAFEHUB_GITHUB_TOKEN) to a token that can read it.")
        return RepoNotFoundError(
            f"GitHub has no repository {repo or exc.url}, or it is private.{hint} Check the owner and name.",
            url=exc.url,
            status=404,
        )
    if exc.status == 403:
        return AuthenticationError(
            f"GitHub refused access{where} (403: {message or 'Forbidden'}). Check GITHUB_TOKEN's permissions.",
            url=exc.url,
            status=403,
        )
    return GitHubError(
        f"GitHub answered {exc.status}{where} ({message or 'no message'}). Try again later.",
        url=exc.url,
        status=exc.status,
    )


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    return str(data.get("message", ""))[:200] if isinstance(data, dict) else ""


def get_repo(owner: str, repo: str) -> dict[str, Any]:
    """GET /repos/{owner}/{repo}: the repository, with its real ``default_branch``."""
    data = api_get(f"/repos/{_quote(owner)}/{_quote(repo)}", repo=f"{owner}/{repo}")
    if not isinstance(data, dict) or not isinstance(data.get("default_branch"), str):
        raise GitHubError(f"GitHub's answer for {owner}/{repo} has no default branch.", url=None, status=None)
    return data


def _paginate(path: str, repo: str) -> Iterator[dict[str, Any]]:
    for page in range(1, constants.API_MAX_PAGES + 1):
        items = api_get(f"{path}?per_page={constants.API_PAGE_SIZE}&page={page}", repo=repo)
        if not isinstance(items, list):
            raise GitHubError(f"GitHub's answer for {path} is not a list.", url=None, status=None)
        yield from items
        if len(items) < constants.API_PAGE_SIZE:
            return


def iter_branches(owner: str, repo: str) -> Iterator[dict[str, Any]]:
    """Every branch, following pagination: [{"name", "commit": {"sha"}}]."""
    return _paginate(f"/repos/{_quote(owner)}/{_quote(repo)}/branches", f"{owner}/{repo}")


def iter_tags(owner: str, repo: str) -> Iterator[dict[str, Any]]:
    """Every tag, following pagination: [{"name", "commit": {"sha"}}]."""
    return _paginate(f"/repos/{_quote(owner)}/{_quote(repo)}/tags", f"{owner}/{repo}")


def get_commit(owner: str, repo: str, ref: str) -> dict[str, Any]:
    """GET /repos/{o}/{r}/commits/{ref}: the commit a branch, tag or (short) SHA names."""
    try:
        data = api_get(f"/repos/{_quote(owner)}/{_quote(repo)}/commits/{_quote(ref)}", repo=f"{owner}/{repo}")
    except GitHubError as exc:
        if getattr(exc, "status", None) in (404, 422):
            raise RefNotFoundError(
                f"{owner}/{repo} has no branch, tag or commit {ref!r}.",
                repo=f"{owner}/{repo}",
                ref=ref,
                url=exc.url,
                status=exc.status,
            ) from None
        raise
    if not isinstance(data, dict) or not isinstance(data.get("sha"), str):
        raise GitHubError(f"GitHub's answer for commit {ref} has no SHA.", url=None, status=None)
    return data


def compare_status(owner: str, repo: str, base: str, head: str) -> str:
    """GitHub's compare status of ``head`` against ``base``: identical, ahead, behind, diverged."""
    try:
        data = api_get(
            f"/repos/{_quote(owner)}/{_quote(repo)}/compare/{_quote(base)}...{_quote(head)}",
            repo=f"{owner}/{repo}",
        )
    except RepoNotFoundError:
        return "unknown"
    return str(data.get("status", "unknown")) if isinstance(data, dict) else "unknown"


def guess_default_branch(owner: str, repo: str) -> str:
    """torch.hub's guess of the default branch, for ``skip_validation``: no API request, no token.

    ``main`` if ``{SAFEHUB_GITHUB_URL}/{owner}/{repo}/tree/main/`` exists, else ``master``
    (torch.hub's ``_parse_repo_info``). A repository whose default branch is neither then fails
    at its archive, as with torch.hub.
    """
    url = f"{constants.SAFEHUB_GITHUB_URL}/{_quote(owner)}/{_quote(repo)}/tree/main/"
    _http.require_online(url, url=url)
    try:
        with _http.open_url(url):
            return "main"
    except _http.HTTPStatusError as exc:
        if exc.status == 404:
            return "master"
        raise _translate(exc, f"{owner}/{repo}") from None


def archive_via_api(validated: bool) -> bool:
    """Whether an archive comes through the API (with the token): a validated fetch while a token is set."""
    return validated and bool(constants.GITHUB_TOKEN)


def archive_url(owner: str, repo: str, ref: str, *, validated: bool = False) -> str:
    """The zipball of ``ref`` (a commit SHA, or with skip_validation a branch or tag).

    On the web host, or with ``validated`` and a token on the API's archive endpoint
    (see :func:`archive_via_api`).
    """
    if archive_via_api(validated):
        return f"{constants.SAFEHUB_GITHUB_API_URL}/repos/{_quote(owner)}/{_quote(repo)}/zipball/{_quote(ref)}"
    return f"{constants.SAFEHUB_GITHUB_URL}/{_quote(owner)}/{_quote(repo)}/zipball/{_quote(ref)}"


def download_archive(
    owner: str,
    repo: str,
    ref: str,
    out: BinaryIO,
    *,
    on_chunk: Callable[[int], None] | None = None,
    validated: bool = False,
) -> tuple[int, str]:
    """Stream the zipball of ``ref`` into ``out``; return (bytes, sha256).

    ``ref`` is the resolved commit SHA (``validated``), or with skip_validation the ref as given.
    The token goes only to the API host, for a validated fetch (:func:`archive_via_api`). A name
    that is both a branch and a tag gets GitHub's 300 Multiple Choices; then the branch is
    downloaded, with a warning, as torch.hub does.
    """
    try:
        response = _open_archive(owner, repo, ref, validated)
    except _http.HTTPStatusError as exc:
        if exc.status != 300:
            raise
        warnings.warn(
            f"The ref {ref} of {owner}/{repo} is both a branch and a tag; using the branch, as "
            "torch.hub does. Pass refs/heads/NAME or refs/tags/NAME to choose.",
            UserWarning,
            stacklevel=2,
        )
        response = _open_archive(owner, repo, f"refs/heads/{ref}", validated)
    with response:
        return _http.stream_to_file(response, out, max_bytes=constants.MAX_ARCHIVE_BYTES, on_chunk=on_chunk)


def _open_archive(owner: str, repo: str, ref: str, validated: bool) -> Any:
    """The archive's response, ready to stream; a 300 stays an HTTPStatusError for the caller."""
    via_api = archive_via_api(validated)
    url = archive_url(owner, repo, ref, validated=validated)
    _http.require_online(url, url=url)
    try:
        # Through the API, the token goes along; _http drops it at the redirect to codeload.
        return _http.open_url(url, _api_headers() if via_api else None)
    except _http.HTTPStatusError as exc:
        if exc.status == 300:
            raise
        if exc.status == 404:
            if via_api:
                hint = ("If the repository is private, the token in GITHUB_TOKEN / SAFEHUB_GITHUB_TOKEN "
                        "cannot read it: give it read access to the repository's contents.")
            elif validated or not constants.GITHUB_TOKEN:
                hint = ("If the repository is private, set GITHUB_TOKEN (or SAFEHUB_GITHUB_TOKEN) to a token "
                        "that can read it: archives of private repositories come through the API with it.")
            else:
                hint = ("If the repository is private, load it without skip_validation: only a validated "
                        "fetch sends the token (to the API host).")
            raise RefNotFoundError(
                f"GitHub has no archive of {owner}/{repo} at {ref}: the repository or the ref "
                f"does not exist, or the repository is private. {hint}",
                repo=f"{owner}/{repo}",
                ref=ref,
                url=exc.url,
                status=404,
            ) from None
        raise _translate(exc, f"{owner}/{repo}") from None
