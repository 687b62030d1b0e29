"""Which URLs the parent may fetch on a worker's behalf (DESIGN 4b), decided before connecting.

Two steps, both repeated for every redirect:

1. :func:`check_url` reads the URL alone: http or https, a length cap (``Limits``), no credentials
   (``user:pass@``), no control characters, spaces or backslashes, a host name that survives
   IDNA (``ｌｏｃａｌｈｏｓｔ`` is ``localhost``), no ``localhost`` / ``*.localhost`` names.
2. :func:`resolve_checked` resolves the host in the parent and refuses it unless *every*
   address is public: not loopback, private, shared (100.64/10), link-local, multicast,
   unspecified, documentation, reserved, nor an IPv4-mapped or NAT64 form of one.

The address check is on resolved addresses, never on the host string: glibc's ``inet_aton``
reads ``2130706433``, ``0x7f.1``, ``0177.0.0.1`` and ``127.1`` as 127.0.0.1, so only the answer
of the resolver says where a connection would go. The caller then connects to exactly these
addresses (``connection.py``), so a second lookup cannot be answered differently (DNS
rebinding).

All addresses must pass, rather than connecting only to the passing ones: a name that answers
both a public and a loopback address is an attack or a misconfiguration, and refusing it is
the outcome that cannot surprise anyone.

Hosts on the allow-list (``SAFEHUB_ALLOW_HOSTS``, ``Sandbox(allow_hosts=...)``, and the GitHub
endpoints safehub is configured with) skip the address check, and only that: a local mirror or
the test emulator on 127.0.0.1. An entry is ``host`` (any port) or ``host:port``; names are
compared after the same normalization as URLs, so ``2130706433`` does not match ``127.0.0.1``.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .. import constants
from ..errors import FetchRefusedError, InvalidArgumentError, NetworkError
from .limits import DEFAULT_LIMITS, Deadline

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> addresses as strings; socket.getaddrinfo by default.
Resolver = Callable[[str, int], Iterable[str]]

DEFAULT_PORTS = {"http": 80, "https": 443}

# Bytes a URL may hold outside its host: RFC 3986's unreserved, reserved and '%'. Anything else
# (controls, spaces, backslashes, quotes, non-ASCII) is refused rather than guessed at.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*\Z")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f\\]")
_HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_-]{1,63})*\Z")

# Special-purpose blocks (RFC 6890 and the IANA registries), listed here rather than taken from
# ipaddress.is_global alone, whose answers change between Python releases (2002::/16, fec0::/10).
_SPECIAL_NETWORKS = tuple(
    (ipaddress.ip_network(net), kind)
    for net, kind in (
        ("0.0.0.0/8", "an unspecified address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),  # cloud metadata services live here
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),  # 255.255.255.255 among them
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("fc00::/7", "a private (unique local) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
        ("2001::/23", "an IETF protocol address"),  # Teredo (2001::/32) among them
        ("2001:db8::/32", "a documentation address"),
        ("2002::/16", "a 6to4 address"),
    )
)
# Everything public in IPv6 is inside 2000::/3; the rest is unassigned or special.
_IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits (RFC 6052).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class Target:
    """A URL that passed :func:`check_url`: what to connect to and what to ask for.

    ``host`` is ASCII (IDNA), lower case, without a trailing dot, and IPv6 without brackets;
    ``literal`` is set when the host is an IP address written in standard form; ``allowed``
    says the host is on the allow-list (the address check is skipped for it).
    """

    url: str
    scheme: str
    host: str
    port: int
    request_target: str
    allowed: bool
    literal: IPAddress | None


def check_url(url: str, *, allow_hosts: Iterable[str] = (), max_chars: int | None = None) -> Target:
    """Check a URL on its own (no lookup, no connection) and return the parsed target.

    ``allow_hosts`` holds ``host`` or ``host:port`` entries; see :func:`normalize_allow_hosts`.
    ``max_chars`` is the longest URL accepted (``Limits.max_url_chars`` by default).

    Raises:
        FetchRefusedError: reason ``"url"``, ``"scheme"`` or ``"host"``.
    """
    if not isinstance(url, str):
        raise _refused(repr(url), "url", "a URL must be a string")
    shown = url if len(url) <= 200 else url[:200] + "..."
    max_chars = DEFAULT_LIMITS.max_url_chars if max_chars is None else max_chars
    if len(url) > max_chars:
        raise _refused(shown, "url", f"it is longer than {max_chars} characters")
    if _BAD_CHARS.search(url):
        raise _refused(shown, "url", "it holds control characters, spaces or backslashes")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refused(shown, "url", f"it cannot be parsed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise _refused(shown, "scheme", "only http and https URLs are fetched")
    if "@" in parts.netloc:
        # Prevents credentials in a URL reaching a host, and user@host confusions (a@b@c).
        raise _refused(shown, "url", "it holds credentials (user:password@); they are never sent")
    if not parts.hostname:
        raise _refused(shown, "url", "it has no host")
    if port == 0:
        raise _refused(shown, "url", "port 0 is not a port")
    try:
        host = normalize_host(parts.hostname)
    except ValueError as exc:
        raise _refused(shown, "url", str(exc)) from None
    if not _URL_CHARS.match(parts.path + parts.query):
        raise _refused(shown, "url", "its path or query holds characters that must be percent-encoded")
    port = port or DEFAULT_PORTS[scheme]
    allowed = any(_entry_matches(entry, host, port) for entry in _parse_entries(allow_hosts))
    if not allowed and (host == "localhost" or host.endswith(".localhost")):
        # RFC 6761: these names are loopback wherever they resolve; refused before any lookup.
        raise _refused(shown, "host", f"{host} is a loopback name{_allow_hint(host, port)}")
    request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{port}"
    literal = _literal(host)
    return Target(f"{scheme}://{netloc}{request_target}", scheme, host, port, request_target, allowed, literal)


def resolve_checked(target: Target, *, resolver: Resolver | None = None, deadline: Deadline) -> tuple[IPAddress, ...]:
    """Resolve ``target.host`` once, in the parent, and return the addresses to connect to.

    Every address must be public unless the host is on the allow-list. IPv4-mapped and NAT64
    answers come back as the IPv4 address they stand for.

    Raises:
        FetchRefusedError: reason ``"address"`` (a non-public address), ``"resolve"`` (no
            address) or ``"deadline"`` (the lookup outlived the call's deadline).
        NetworkError: the resolver failed (no such host, no DNS).
    """
    if target.literal is not None:
        answers: Iterable[str] = (str(target.literal),)
    else:
        answers = _lookup(resolver or _getaddrinfo, target, deadline)
    addresses: list[IPAddress] = []
    for answer in answers:
        try:
            address = embedded_ipv4(ipaddress.ip_address(answer))
        except ValueError:
            # A scoped IPv6 answer (fe80::1%eth0) is link-local; anything else is no address.
            raise _refused(target.url, "address", f"{target.host} resolves to {answer!r}, not a plain address") from None
        if not target.allowed:
            kind = address_refusal(address)
            if kind is not None:
                where = f"is {kind}" if str(address) == target.host else f"resolves to {address}, {kind}"
                raise _refused(
                    target.url,
                    "address",
                    f"{target.host} {where}; only public addresses are fetched{_allow_hint(target.host, target.port)}",
                    address=str(address),
                )
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _refused(target.url, "resolve", f"{target.host} resolves to no address")
    return tuple(addresses)


def embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped (``::ffff:a.b.c.d``) or NAT64 address stands for."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_refusal(address: IPAddress) -> str | None:
    """None for a public address, else what kind of address it is ("a loopback address")."""
    address = embedded_ipv4(address)
    for network, kind in _SPECIAL_NETWORKS:
        if address.version == network.version and address in network:
            return kind
    if address.version == 6 and address not in _IPV6_GLOBAL_UNICAST:
        return "a reserved address"
    if not address.is_global:
        return "a non-public address"
    return None


def normalize_host(host: str) -> str:
    """A host as compared and sent: lower case ASCII (IDNA), no trailing dot, IPv6 compressed.

    Raises:
        ValueError: the host cannot be a host name or address.
    """
    if ":" in host:
        if "%" in host:
            raise ValueError("IPv6 zone ids (%eth0) are not fetched")
        try:
            return str(ipaddress.IPv6Address(host.strip("[]")))
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    name = host[:-1] if host.endswith(".") else host
    try:
        # IDNA folds look-alikes first: fullwidth letters and ideographic full stops.
        name = name.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        raise ValueError(f"{host!r} is not a valid host name") from None
    if len(name) > 253 or not _HOST_NAME.match(name):
        raise ValueError(f"{host!r} is not a valid host name")
    return name


def normalize_allow_hosts(entries: Iterable[str], *, source: str) -> tuple[str, ...]:
    """Check allow-list entries and return them in normal form (``host`` or ``host:port``).

    ``source`` names where they came from in the error (``"SAFEHUB_ALLOW_HOSTS"``).

    Raises:
        InvalidArgumentError: an entry is not ``host`` or ``host:port``.
    """
    normal = []
    for entry in entries:
        host, port = _parse_entry(entry, source)
        shown = f"[{host}]" if ":" in host else host
        normal.append(shown if port is None else f"{shown}:{port}")
    return tuple(normal)


def github_allow_hosts() -> tuple[str, ...]:
    """``host:port`` of the GitHub endpoints safehub is configured with, read now."""
    entries = []
    for url in (constants.SAFEHUB_GITHUB_URL, constants.SAFEHUB_GITHUB_API_URL):
        try:
            target = check_url(url, allow_hosts=("localhost",))
        except FetchRefusedError:
            continue  # a misconfigured endpoint allows nothing; its own requests fail elsewhere
        entries.append(f"[{target.host}]:{target.port}" if ":" in target.host else f"{target.host}:{target.port}")
    return tuple(entries)


def is_github_endpoint(url: str) -> bool:
    """Whether the URL's host and port are those of ``SAFEHUB_GITHUB_URL`` or ``SAFEHUB_GITHUB_API_URL``."""
    try:
        target = check_url(url, allow_hosts=github_allow_hosts())
    except FetchRefusedError:
        return False
    return target.allowed


# --- helpers ----------------------------------------------------------------------------------


def _lookup(resolver: Resolver, target: Target, deadline: Deadline) -> list[str]:
    # getaddrinfo takes no timeout; a small shared pool runs it so the call's deadline still
    # holds, and the pool's size bounds the threads a flood of slow lookups can tie up.
    import concurrent.futures

    deadline.check(target.url)
    future = _resolver_pool().submit(lambda: list(resolver(target.host, target.port)))
    try:
        return future.result(timeout=deadline.remaining())
    except (OSError, concurrent.futures.TimeoutError) as exc:  # the latter is an OSError from 3.11 on
        if not future.done():
            future.cancel()
            raise deadline.error(target.url) from None
        raise NetworkError(
            f"Could not resolve {target.host} for {target.url}: {exc}.", url=target.url, status=None
        ) from exc


_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _resolver_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="safehub-resolve")
    return _POOL


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)  # standard spellings only; the odd ones go to the resolver
    except ValueError:
        return None


def _parse_entries(entries: Iterable[str]) -> list[tuple[str, int | None]]:
    return [_parse_entry(entry, "allow_hosts") for entry in entries]


def _parse_entry(entry: object, source: str) -> tuple[str, int | None]:
    fix = "give a host name or address, optionally with :port, like 'mirror.local:8080' or '[::1]:8080'"
    if not isinstance(entry, str) or not entry.strip() or _BAD_CHARS.search(entry.strip()) or any(
        char in entry for char in "/@*?#"
    ):
        raise InvalidArgumentError(f"{source} holds {entry!r}: {fix}", value=entry)
    text = entry.strip()
    host, port_text = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise InvalidArgumentError(f"{source} holds {entry!r}: {fix}", value=entry)
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidArgumentError(f"{source} holds {entry!r}: the port must be 1 to 65535", value=entry)
        port = int(port_text)
    try:
        return normalize_host(host.lower()), port
    except ValueError as exc:
        raise InvalidArgumentError(f"{source} holds {entry!r}: {exc}; {fix}", value=entry) from None


def _entry_matches(entry: tuple[str, int | None], host: str, port: int) -> bool:
    return entry[0] == host and entry[1] in (None, port)


def _allow_hint(host: str, port: int) -> str:
    entry = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (
        f". If this host is yours (a local mirror, a test server), allow it with "
        f"SAFEHUB_ALLOW_HOSTS={entry} or Sandbox(allow_hosts=({entry!r},))"
    )


def _refused(url: str, reason: str, why: str, **facts: str) -> FetchRefusedError:
    return FetchRefusedError(f"Refusing to fetch {url}: {why}.", url=url, reason=reason, **facts)
