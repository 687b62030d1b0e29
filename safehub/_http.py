"""Plain HTTP for safehub: one opener, safe redirects, and error translation.

urllib keeps every request header across redirects, Authorization included, even when the
redirect leaves the host; this opener drops it when the origin changes so a token meant for the
API never reaches a mirror, a CDN or an attacker's Location header.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, BinaryIO, Protocol

from . import constants
from .errors import IncompleteDownloadError, NetworkError, OfflineError

_SENSITIVE_HEADERS = ("authorization", "cookie", "proxy-authorization")


def origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of a URL: the unit a credential is scoped to."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


class _OriginScopedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: http.client.HTTPMessage,
                         newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and origin(newurl) != origin(req.full_url):
            # A credential is for the host it was given to, never for where that host points.
            for name in list(new.headers):
                if name.lower() in _SENSITIVE_HEADERS:
                    del new.headers[name]
            for name in list(new.unredirected_hdrs):
                if name.lower() in _SENSITIVE_HEADERS:
                    del new.unredirected_hdrs[name]
        return new


_OPENER = urllib.request.build_opener(_OriginScopedRedirects())


@dataclass
class HTTPStatusError(Exception):
    """A non-success answer, kept raw for the caller to translate (GitHub rules live elsewhere)."""

    url: str
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def __str__(self) -> str:
        return f"HTTP {self.status} from {self.url}"


def require_online(what: str, *, url: str | None = None, where: str = "the cache") -> None:
    """Refuse a fetch in offline mode: ``what`` is not in ``where`` and may not be fetched.

    The one offline check: the fetch step (a repository), GitHub's requests, ``safehub cache
    fill`` and the fetch broker (a worker's file or GET) all ask it before reaching the network.

    Raises:
        OfflineError: ``SAFEHUB_OFFLINE`` is set (``--offline``); ``url`` is set on it.
    """
    if constants.SAFEHUB_OFFLINE:
        raise OfflineError(
            f"Offline mode: {what} is not in {where} and SAFEHUB_OFFLINE is set. "
            "Fetch it once online, or unset SAFEHUB_OFFLINE (drop --offline).",
            url=url,
        )


def open_url(
    url: str,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> http.client.HTTPResponse:
    """Open ``url`` and return the response for streaming; the caller closes it.

    Raises:
        HTTPStatusError: the server answered with a status of 300 or more (after redirects).
        NetworkError: the host could not be reached or the connection failed.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise NetworkError(f"Refusing to fetch {url!r}: only http and https URLs are supported.", url=url, status=None)
    all_headers = {"User-Agent": constants.USER_AGENT, **(headers or {})}
    request = urllib.request.Request(url, headers=all_headers)
    try:
        return _OPENER.open(request, timeout=timeout or constants.HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(64 * 1024)
        except (OSError, http.client.HTTPException):
            body = b""
        finally:
            exc.close()
        raise HTTPStatusError(exc.url or url, exc.code, dict(exc.headers or {}), body) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, socket.timeout) as exc:
        reason = getattr(exc, "reason", exc)
        raise NetworkError(
            f"Could not reach {parts.scheme}://{parts.netloc}: {reason}. "
            "Check your network connection or proxy settings, then try again.",
            url=url,
            status=None,
        ) from exc


class Body(Protocol):
    """What :func:`stream_to_file` reads: urllib's response, or the fetch broker's checked one
    (``_egress/connection.py``, which also hashes what it reads: ``body_sha256()``)."""

    headers: http.client.HTTPMessage

    def read(self, size: int, /) -> bytes: ...

    def geturl(self) -> str: ...


def stream_to_file(
    response: Body,
    out: BinaryIO,
    *,
    max_bytes: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Copy a response body to ``out``; return (bytes written, sha256 hex).

    The body is hashed once: a response that hashes what it reads (``body_sha256()``, as the
    fetch broker's checked connection does) gives its own digest; any other is hashed here.

    Raises:
        IncompleteDownloadError: the body ended before its Content-Length.
        DownloadError subclass: the body exceeds ``max_bytes``.
        NetworkError: the connection broke mid-body.
    """
    from .errors import DownloadError

    url = response.geturl()
    expected = response.headers.get("Content-Length")
    expected_len = int(expected) if expected and expected.isdigit() else None
    if max_bytes is not None and expected_len is not None and expected_len > max_bytes:
        raise DownloadError(
            f"{url} is {expected_len} bytes, over the limit of {max_bytes}.", url=url
        )
    own_digest: Callable[[], str] | None = getattr(response, "body_sha256", None)
    digest = hashlib.sha256()
    received = 0
    while True:
        try:
            chunk = response.read(constants.READ_CHUNK)
        except http.client.IncompleteRead as exc:
            received += len(exc.partial)
            break
        except (OSError, http.client.HTTPException) as exc:
            raise NetworkError(
                f"The connection to {url} broke after {received} bytes: {exc}. Try again.",
                url=url,
                status=None,
            ) from exc
        if not chunk:
            break
        received += len(chunk)
        if max_bytes is not None and received > max_bytes:
            raise DownloadError(f"{url} is over the limit of {max_bytes} bytes.", url=url)
        if own_digest is None:
            digest.update(chunk)
        # Outside the read's handler: a failed write (a full disk) is the disk's, not the network's.
        out.write(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    if expected_len is not None and received != expected_len:
        raise IncompleteDownloadError(
            f"The download of {url} stopped after {received} of {expected_len} bytes; "
            "nothing was saved. Try again.",
            url=url,
            expected=expected_len,
            received=received,
        )
    return received, own_digest() if own_digest is not None else digest.hexdigest()
