"""Fetch a URL for a worker under the parent's policy: checked, pinned, capped, recorded.

The connection layer of the fetch broker (DESIGN 4b); the download itself (temporary file, lock,
hash check, atomic move, progress) stays in ``safehub._download``, which calls
:func:`open_checked` where it would call ``_http.open_url``::

    policy = FetchPolicy.for_sandbox(sandbox)
    budget, deadline = CallBudget(Limits()), Deadline(sandbox.timeout)
    with open_checked(url, policy=policy, budget=budget, deadline=deadline) as response:
        _http.stream_to_file(response, out, on_chunk=bar.update)
    response.record  # FetchRecord(kind="get", url=..., final_url=..., size=..., sha256=...)

What :func:`open_checked` guarantees, hop by hop:

- the URL passes ``policy.check_url`` and its host ``resolve_checked`` (public addresses only,
  unless allowed), and the socket connects to one of exactly those addresses: no second lookup,
  so no DNS rebinding. ``Host``, SNI and certificate verification use the URL's name.
- redirects are followed here, at most ``Limits.max_redirects``, each new URL checked again from
  the start; https to http is refused. No credentials are ever sent.
- every socket operation waits at most ``min(io_timeout, deadline.remaining())``, so neither a
  slow lookup, a slow handshake nor a server dribbling bytes holds the parent past the deadline.
- Content-Length is checked against the per-file cap and the call's budget before the body is
  read, and the bytes are counted and hashed while it is read (the only hash of a download:
  ``_http.stream_to_file`` takes it from :meth:`CheckedResponse.body_sha256`); a complete body
  leaves its :class:`~safehub._egress.record.FetchRecord` on the response.

Proxies (``HTTPS_PROXY``) are not used: a proxy would resolve the name itself, out of reach of
the address check.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import socket
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import constants
from .._http import HTTPStatusError
from ..errors import FetchRefusedError, NetworkError
from . import policy as _policy
from .limits import CallBudget, Deadline, Limits
from .policy import IPAddress, Resolver, Target
from .record import FetchRecord

__all__ = ["CallBudget", "CheckedResponse", "Credentials", "Deadline", "FetchPolicy", "FetchRecord", "Limits", "open_checked"]

_REDIRECT_STATUSES = (301, 302, 303, 307, 308)


@dataclass(frozen=True, kw_only=True)
class FetchPolicy:
    """Where the parent may fetch for one sandboxed call (how much is the budget's ``Limits``).

    Args:
        enabled: False refuses every fetch (``Sandbox(fetch=False)``).
        allow_hosts: ``host`` or ``host:port`` entries let through whatever address they resolve
            to; the configured GitHub endpoints are always added (read at fetch time).
        resolver: ``(host, port) -> addresses``; ``socket.getaddrinfo`` by default.
        ssl_context: for https; ``ssl.create_default_context()`` by default.
    """

    enabled: bool = True
    allow_hosts: tuple[str, ...] = ()
    resolver: Resolver | None = None
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        allow = _policy.normalize_allow_hosts(self.allow_hosts, source="FetchPolicy(allow_hosts=...)")
        object.__setattr__(self, "allow_hosts", allow)

    @classmethod
    def for_sandbox(cls, sandbox: Any, **overrides: Any) -> FetchPolicy:
        """The policy of a ``Sandbox``: its ``fetch`` and ``allow_hosts``, plus ``SAFEHUB_ALLOW_HOSTS``."""
        from_env = _policy.normalize_allow_hosts(constants.SAFEHUB_ALLOW_HOSTS, source="SAFEHUB_ALLOW_HOSTS")
        return cls(enabled=sandbox.fetch, allow_hosts=from_env + tuple(sandbox.allow_hosts), **overrides)

    def allowed_hosts(self) -> tuple[str, ...]:
        return self.allow_hosts + _policy.github_allow_hosts()


def open_checked(url: str, *, policy: FetchPolicy, budget: CallBudget, deadline: Deadline,
                 counted: bool = False, method: str = "GET", headers: Mapping[str, str] | None = None,
                 credentials: Credentials | None = None, follow: str = "all") -> CheckedResponse:
    """Open ``url`` under ``policy`` and ``budget.limits``; return the response, ready to stream.

    The caller closes it. Counts as one fetch of ``budget`` whatever happens, unless ``counted``:
    the caller counted it already (the broker counts each thing a worker asks for as it arrives).

    ``method`` is GET or HEAD; ``headers`` go with every hop; ``credentials`` (headers and the
    origin they belong to) only with a hop to exactly that origin, never across a redirect to
    another. ``follow="same_origin"`` follows only redirects that stay on the origin and returns
    any other redirect as the answer (the Hub's metadata rides on its redirect to the CDN);
    ``follow="none"`` returns every redirect (a client that follows them itself asks again).

    Raises:
        FetchRefusedError: the policy refused the URL, an address, a redirect or a cap, or the
            deadline passed (``reason`` says which).
        HTTPStatusError: the final answer has a status of 300 or more (as ``_http.open_url``).
        NetworkError: the host could not be resolved or reached, or TLS failed.
    """
    if not policy.enabled:
        raise FetchRefusedError(
            f"Refusing to fetch {url}: this sandbox fetches nothing (Sandbox(fetch=False)).",
            url=url,
            reason="disabled",
        )
    if method not in ("GET", "HEAD") or follow not in ("all", "same_origin", "none"):
        raise ValueError(f"open_checked: method {method!r}, follow {follow!r}")
    if not counted:
        budget.start_fetch(url)
    limits = budget.limits
    allow = policy.allowed_hosts()
    current, previous = url, None
    for _ in range(limits.max_redirects + 1):
        target, addresses = _check_hop(current, previous, policy, limits, allow, deadline)
        sent = {**(headers or {}), **(credentials.headers if credentials is not None and credentials.for_target(target) else {})}
        conn, response = _request(target, addresses, policy, limits, deadline, method, sent)
        location = response.getheader("Location") if response.status in _REDIRECT_STATUSES else None
        if location is None:
            return _final(url, target, conn, response, budget, method=method)
        try:
            following = urllib.parse.urljoin(target.url, location.strip())
        except ValueError:  # urljoin parses the Location, and a broken one raises
            conn.close()
            raise FetchRefusedError(
                f"Refusing to fetch {url}: {target.url} redirects to {location[:200]!r}, not a URL.",
                url=url,
                reason="redirect",
            ) from None
        if follow == "none" or (follow == "same_origin" and _origin(following) != (target.scheme, target.host, target.port)):
            return _final(url, target, conn, response, budget, redirect=True, method=method)
        conn.close()
        current, previous = following, target
    raise FetchRefusedError(
        f"Refusing to fetch {url}: it redirects more than {limits.max_redirects} times.",
        url=url,
        reason="redirect",
    )


class CheckedResponse:
    """A response whose body is read under the caps; what ``_http.stream_to_file`` reads.

    ``read(n)`` raises :class:`FetchRefusedError` when the body passes the per-file cap, the
    call's budget or the deadline, and ``OSError`` / ``http.client.HTTPException`` when the
    connection breaks (as ``http.client`` does). The body is hashed as it is read; at the end of
    a complete body, ``record`` is set.
    """

    def __init__(self, url: str, target: Target, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, budget: CallBudget) -> None:
        self.url = url
        self.final_url = target.url
        self.status = response.status
        self.headers = response.headers
        self.length = response.length
        self.record: FetchRecord | None = None
        self.method = "GET"
        self._conn, self._response = conn, response
        self._max_file_bytes, self._budget = budget.limits.max_file_bytes, budget
        self._size = 0
        self._sha256 = hashlib.sha256()
        self._closed = False

    def geturl(self) -> str:
        return self.final_url

    def info(self) -> http.client.HTTPMessage:
        return self.headers

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self._response.getheader(name, default)

    def body_sha256(self) -> str:
        """The sha256 hex of the body read so far (of the whole body once ``record`` is set)."""
        return self._sha256.hexdigest()

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(functools.partial(self.read, constants.READ_CHUNK), b""))
        if n == 0 or self.record is not None or self._closed:
            return b""  # after close(), an empty read must not pass for the end of the body
        # One byte past a cap is enough to see it passed; never buffer more than that.
        n = min(n, self._max_file_bytes - self._size + 1, self._budget.remaining_bytes() + 1)
        data = self._response.read(n)
        if not data:
            self.record = FetchRecord(kind="get", url=self.url, final_url=self.final_url, size=self._size,
                                      sha256=self._sha256.hexdigest())
            return b""
        if self._size + len(data) > self._max_file_bytes:
            self.close()
            raise _too_big(self.final_url, self._max_file_bytes)
        try:
            self._budget.charge(self.final_url, len(data))
        except FetchRefusedError:
            self.close()
            raise
        self._size += len(data)
        self._sha256.update(data)
        return data

    def close(self) -> None:
        self._closed = True
        self._response.close()
        self._conn.close()

    def __enter__(self) -> CheckedResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Credentials:
    """Headers (a token) that belong to one origin: sent to it alone, never to where it redirects."""

    origin_url: str
    headers: Mapping[str, str]

    def for_target(self, target: Target) -> bool:
        return _origin(self.origin_url) == (target.scheme, target.host, target.port)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        host = _policy.normalize_host(parts.hostname or "")
        port = parts.port or _policy.DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        return (scheme, "", -1)  # matches no target: credentials stay home
    return (scheme, host, port)


# --- one hop ----------------------------------------------------------------------------------


def _check_hop(url: str, previous: Target | None, policy: FetchPolicy, limits: Limits, allow: Sequence[str],
               deadline: Deadline) -> tuple[Target, tuple[IPAddress, ...]]:
    """The target of one hop and the addresses it may connect to."""
    try:
        target = _policy.check_url(url, allow_hosts=allow, max_chars=limits.max_url_chars)
        if previous is not None and previous.scheme == "https" and target.scheme == "http":
            # Prevents a TLS fetch continuing in clear text, where anyone on the path can change it.
            raise FetchRefusedError(f"Refusing to fetch {target.url}: it is https to http.", url=target.url, reason="redirect")
        return target, _policy.resolve_checked(target, resolver=policy.resolver, deadline=deadline)
    except FetchRefusedError as exc:
        if previous is None:
            raise
        raise FetchRefusedError(f"{exc.message[:-1]} (a redirect from {previous.url}).", **exc._facts) from None


def _request(target: Target, addresses: Sequence[IPAddress], policy: FetchPolicy, limits: Limits, deadline: Deadline,
             method: str = "GET", headers: Mapping[str, str] | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        conn = _PinnedHTTPSConnection(target, addresses, deadline, limits.io_timeout, policy.ssl_context or _default_context())
    else:
        conn = _PinnedHTTPConnection(target, addresses, deadline, limits.io_timeout)
    try:
        conn.putrequest(method, target.request_target, skip_accept_encoding=True)
        conn.putheader("User-Agent", constants.USER_AGENT)
        conn.putheader("Accept", "*/*")
        conn.putheader("Accept-Encoding", "identity")  # the bytes hashed are the bytes stored
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        return conn, conn.getresponse()
    except FetchRefusedError:
        conn.close()
        raise
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        deadline.check(target.url)  # a timeout past the deadline is the deadline's refusal
        raise NetworkError(
            f"Could not fetch {target.url}: {exc}. Check the URL and the network, then try again.",
            url=target.url,
            status=None,
        ) from exc


def _final(url: str, target: Target, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
           budget: CallBudget, *, redirect: bool = False, method: str = "GET") -> CheckedResponse:
    limits = budget.limits
    try:
        if response.status >= 300 and not redirect:
            try:
                body = response.read(limits.max_error_body_bytes)
            except (OSError, http.client.HTTPException, FetchRefusedError):
                body = b""
            raise HTTPStatusError(target.url, response.status, dict(response.headers), body)
        lengths = {value.strip() for value in response.headers.get_all("Content-Length") or ()}
        if len(lengths) > 1 or not all(value.isdigit() for value in lengths):
            # Prevents a body whose length two readers would read differently.
            raise FetchRefusedError(
                f"Refusing to fetch {target.url}: its Content-Length is malformed ({', '.join(sorted(lengths))}).",
                url=target.url,
                reason="response",
            )
        if response.length is not None:
            if response.length > limits.max_file_bytes:
                raise _too_big(target.url, limits.max_file_bytes, response.length)
            budget.check_length(target.url, response.length)
    except BaseException:
        conn.close()
        raise
    checked = CheckedResponse(url, target, conn, response, budget)
    checked.method = method
    return checked


def _too_big(url: str, cap: int, length: int | None = None) -> FetchRefusedError:
    size = f"is {length} bytes" if length is not None else "goes on"
    return FetchRefusedError(
        f"Refusing to fetch {url}: it {size}, past the limit of {cap} bytes for one file.",
        url=url,
        reason="file_size",
    )


# --- connections pinned to a checked address ------------------------------------------------


class _Pinned:
    """Connects to addresses checked beforehand; ``host`` (the URL's name) stays for Host and TLS."""

    _addresses: Sequence[IPAddress]
    _deadline: Deadline
    _url: str
    host: str
    port: int
    timeout: float

    def _pin(self, target: Target, addresses: Sequence[IPAddress], deadline: Deadline, io_timeout: float) -> None:
        self._addresses, self._deadline, self._url = tuple(addresses), deadline, target.url
        self.response_class = functools.partial(_DeadlineSource.response, deadline=deadline, io_timeout=io_timeout, url=target.url)

    def _connect_pinned(self) -> socket.socket:
        last: OSError | None = None
        for address in self._addresses:
            sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._deadline.timeout(self.timeout, self._url))
                # An address, never a name: nothing here can look the host up again.
                sock.connect((str(address), self.port))
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        self._deadline.check(self._url)
        assert last is not None  # resolve_checked never returns no address
        raise last


class _PinnedHTTPConnection(_Pinned, http.client.HTTPConnection):  # type: ignore[misc]
    def __init__(self, target: Target, addresses: Sequence[IPAddress], deadline: Deadline, io_timeout: float) -> None:
        http.client.HTTPConnection.__init__(self, target.host, target.port, timeout=io_timeout)
        self._pin(target, addresses, deadline, io_timeout)

    def connect(self) -> None:
        self.sock = self._connect_pinned()


class _PinnedHTTPSConnection(_Pinned, http.client.HTTPSConnection):  # type: ignore[misc]
    def __init__(self, target: Target, addresses: Sequence[IPAddress], deadline: Deadline, io_timeout: float,
                 context: ssl.SSLContext) -> None:
        http.client.HTTPSConnection.__init__(self, target.host, target.port, timeout=io_timeout, context=context)
        self._context = context
        self._pin(target, addresses, deadline, io_timeout)

    def connect(self) -> None:
        sock = self._connect_pinned()
        try:
            # CPython bounds the whole handshake by the socket's timeout, not each read in it.
            sock.settimeout(self._deadline.timeout(self.timeout, self._url))
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class _DeadlineSource(io.RawIOBase):
    """The socket as ``HTTPResponse`` reads it: every read waits at most until the deadline.

    A socket timeout bounds one read, so a server sending a byte just before each timeout could
    hold a plain socket forever; here each read gets only what is left of the deadline.
    """

    def __init__(self, sock: socket.socket, deadline: Deadline, io_timeout: float, url: str) -> None:
        super().__init__()
        # The socket's own file object, so the descriptor stays open after the connection lets
        # go of it (http.client hands a closing connection's socket to its response this way).
        self._sock, self._file = sock, sock.makefile("rb", buffering=0)
        self._deadline, self._io_timeout, self._url = deadline, io_timeout, url

    @classmethod
    def response(cls, sock: socket.socket, *args: Any, deadline: Deadline, io_timeout: float, url: str,
                 **kwargs: Any) -> http.client.HTTPResponse:
        return http.client.HTTPResponse(_Makefile(cls(sock, deadline, io_timeout, url)), *args, **kwargs)  # type: ignore[arg-type]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(self._deadline.timeout(self._io_timeout, self._url))
        try:
            return self._file.readinto(buffer)
        except TimeoutError:
            self._deadline.check(self._url)
            raise

    def close(self) -> None:
        self._file.close()
        super().close()


class _Makefile:
    """What ``HTTPResponse.__init__`` asks of a socket: ``makefile("rb")``."""

    def __init__(self, raw: _DeadlineSource) -> None:
        self._raw = raw

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(self._raw)


@functools.lru_cache(maxsize=1)
def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()
