"""Attack tests for the fetch policy the broker will use (``safehub/_egress/``, DESIGN 4b).

Each test aims a fetch at a real loopback listener (a :class:`Canary` the policy must keep away
from, or a real HTTP(S) server) and asserts on what the listener saw. Where a test needs a host
name to resolve, the resolver is injected, or ``socket.getaddrinfo`` is patched to give the
answers of the attack; an autouse guard lets the real resolver answer numeric hosts only, so no
test sends a DNS query (this machine's name server is on a private address). The one "public"
address a test uses is refused in-process before any packet leaves.

Slow-server attacks run against a deadline of a fraction of a second and servers that would
dribble for many seconds; each stops as soon as the client hangs up.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import socket
import threading
import time

import pytest

from safehub import _http
from safehub._egress.connection import CallBudget, Deadline, FetchPolicy, Limits, open_checked
from safehub._egress.policy import is_github_endpoint
from safehub._sandbox import Sandbox
from safehub.errors import FetchRefusedError, NetworkError
from tests.loopback_servers import Canary, LoopbackHTTPServer, canary_pair, make_tls_files

pytestmark = pytest.mark.timeout(60)

# Documented as example.com's; never reached: the test's connect guard refuses it in-process.
PUBLIC_ADDRESS = "93.184.215.14"


@pytest.fixture(autouse=True)
def numeric_resolver_only(monkeypatch):
    """The real getaddrinfo, but for numeric hosts only: a name never becomes a DNS query."""
    real = socket.getaddrinfo

    def numeric_only(host, port, family=0, type=0, proto=0, flags=0):
        return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)


@pytest.fixture
def canaries():
    v4, v6 = canary_pair()
    yield v4, v6
    v4.close()
    v6.close()


@pytest.fixture
def server():
    srv = LoopbackHTTPServer()
    yield srv
    srv.close()


def fetch(url, policy=None, budget=None, deadline=None):
    """Fetch ``url`` whole under the policy; returns (body, response)."""
    budget = budget or CallBudget()
    with open_checked(url, policy=policy or FetchPolicy(), budget=budget, deadline=deadline or Deadline(30)) as response:
        return response.read(), response


def allow(srv, **kwargs):
    return FetchPolicy(allow_hosts=(f"127.0.0.1:{srv.port}",), **kwargs)


def capped(**caps):
    """A call's budget under smaller limits (``Limits`` holds every cap)."""
    return CallBudget(Limits(**caps))


# --- SSRF spellings -------------------------------------------------------------------------

SPELLINGS = [
    "http://127.0.0.1:{port}/",
    "http://2130706433:{port}/",  # decimal
    "http://0x7f000001:{port}/",  # hex
    "http://0x7f.1:{port}/",  # hex, short
    "http://0X7F.0.0.1:{port}/",
    "http://0177.0.0.1:{port}/",  # octal
    "http://0177.1:{port}/",
    "http://017700000001:{port}/",
    "http://127.1:{port}/",  # short IPv4
    "http://127.0.1:{port}/",
    "http://127.000.000.001:{port}/",
    "http://127.0.0.1.:{port}/",  # trailing dot
    "http://127.42.0.7:{port}/",  # anywhere in 127/8
    "http://0:{port}/",  # unspecified: Linux connects it to this machine
    "http://0.0.0.0:{port}/",
    "http://[::1]:{port}/",
    "http://[0:0:0:0:0:0:0:1]:{port}/",
    "http://[::]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",  # IPv4-mapped
    "http://[::ffff:7f00:1]:{port}/",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/",
    "http://[::127.0.0.1]:{port}/",  # IPv4-compatible (deprecated)
    "http://[64:ff9b::7f00:1]:{port}/",  # NAT64 of 127.0.0.1
    "http://localhost:{port}/",
    "http://LOCALHOST:{port}/",
    "http://localhost.:{port}/",
    "http://api.localhost:{port}/",
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{port}/",  # fullwidth, IDNA folds it
    "http://127\u30020\u30020\u30021:{port}/",  # ideographic full stops
    "https://2130706433:{port}/",
]


@pytest.mark.parametrize("template", SPELLINGS)
def test_loopback_in_every_spelling_is_refused_and_the_listener_sees_nothing(template, canaries):
    v4, v6 = canaries
    url = template.format(port=v4.port)
    with pytest.raises(FetchRefusedError) as info:
        fetch(url)
    assert info.value.reason in ("address", "host")
    assert "SAFEHUB_ALLOW_HOSTS" in str(info.value) and "Sandbox(allow_hosts=" in str(info.value)
    assert v4.connections() == 0 and v6.connections() == 0
    # The canary is real: where the refused spelling named a loopback address, that address
    # reaches the listener, so the refusal is what kept the attack away.
    address = getattr(info.value, "address", None)
    if address is not None and ipaddress.ip_address(address).is_loopback and address in ("127.0.0.1", "::1"):
        with socket.create_connection((address, v4.port), timeout=5):
            pass
        assert (v4 if address == "127.0.0.1" else v6).connections() == 1


def test_odd_spellings_really_resolve_to_loopback_here():
    # What makes the spellings above attacks: the system resolver (glibc inet_aton) takes them.
    for host in ("2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "0177.1", "127.1", "017700000001"):
        answers = {info[4][0] for info in socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)}
        assert answers == {"127.0.0.1"}, host


@pytest.mark.parametrize(
    "host",
    ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "224.0.0.1",
     "240.0.0.1", "255.255.255.255", "198.18.0.1", "192.0.2.1", "[fc00::1]", "[fd12:3456::1]",
     "[fe80::1]", "[ff02::1]", "[2001:db8::1]", "[2002:7f00:1::]", "[::ffff:10.0.0.1]", "[::ffff:169.254.169.254]"],
)
def test_private_and_special_addresses_are_refused_before_any_connect(host, monkeypatch):
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    with pytest.raises(FetchRefusedError) as info:
        fetch(f"http://{host}:8080/")
    assert info.value.reason == "address"
    assert attempts == []


def test_fetch_false_refuses_everything(server, canaries):
    url = server.serve("/f", b"data")
    policy = FetchPolicy.for_sandbox(Sandbox(fetch=False, allow_hosts=(f"127.0.0.1:{server.port}",)))
    with pytest.raises(FetchRefusedError) as info:
        fetch(url, policy)
    assert info.value.reason == "disabled" and "Sandbox(fetch=False)" in str(info.value)
    assert server.requests == []


# --- the allow-list ---------------------------------------------------------------------------


def test_allow_list_lets_exactly_that_host_and_port_through(server, canaries):
    v4, _ = canaries
    url = server.serve("/weights.pth", b"w" * 1000)
    body, response = fetch(url, allow(server))
    assert body == b"w" * 1000 and response.status == 200
    # The same server under another spelling, and another port of the same host, stay refused.
    for other in (f"http://2130706433:{server.port}/weights.pth", f"http://127.0.0.1:{v4.port}/"):
        with pytest.raises(FetchRefusedError):
            fetch(other, allow(server))
    assert len(server.requests) == 1 and v4.connections() == 0


def test_safehub_allow_hosts_and_sandbox_allow_hosts_both_count(server, monkeypatch):
    url = server.serve("/f", b"mirror")
    with pytest.raises(FetchRefusedError):
        fetch(url, FetchPolicy.for_sandbox(Sandbox()))
    monkeypatch.setenv("SAFEHUB_ALLOW_HOSTS", f"mirror.example, 127.0.0.1:{server.port}")
    assert fetch(url, FetchPolicy.for_sandbox(Sandbox()))[0] == b"mirror"
    monkeypatch.delenv("SAFEHUB_ALLOW_HOSTS")
    assert fetch(url, FetchPolicy.for_sandbox(Sandbox(allow_hosts=("127.0.0.1",))))[0] == b"mirror"


def test_the_configured_github_endpoints_are_always_allowed(github):
    url = github.add_file("model.pth", b"emulated weights")
    assert is_github_endpoint(url) and is_github_endpoint(github.api_url + "/repos/o/r")
    body, response = fetch(url, FetchPolicy())
    assert body == b"emulated weights" and response.record.sha256 == hashlib.sha256(body).hexdigest()
    assert [r.path for r in github.requests("web")] == ["/files/model.pth"]
    # Only those endpoints: the emulator's codeload origin is another port of 127.0.0.1.
    assert not is_github_endpoint(github.codeload_url + "/x")
    with pytest.raises(FetchRefusedError) as info:
        fetch(github.codeload_url + "/x", FetchPolicy())
    assert info.value.reason == "address"


# --- redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "http://2130706433:{canary}/",
        "http://127.0.0.1:{canary}/",  # the allowed host, another port
        "http://[::1]:{canary}/",
        "http://[::ffff:127.0.0.1]:{canary}/",
        "http://localhost:{canary}/",
        "http://0x7f.1:{canary}/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:{canary}/_PING",
        "http://user:pw@127.0.0.1:{canary}/",
        "http://[::1:{canary}/",  # not even a URL
    ],
)
def test_a_redirect_from_an_allowed_server_to_a_refused_address_is_refused(location, server, canaries):
    v4, v6 = canaries
    url = server.redirect("/r", location.format(canary=v4.port))
    with pytest.raises(FetchRefusedError) as info:
        fetch(url, allow(server))
    assert info.value.reason in ("address", "host", "scheme", "url", "redirect")
    assert "redirect" in str(info.value)
    assert [r.path for r in server.requests] == ["/r"]  # the attack ran: the redirect was served
    assert v4.connections() == 0 and v6.connections() == 0


def test_redirects_are_followed_and_recorded(server):
    server.serve("/files/model.pth", b"model bytes")
    server.redirect("/b", "/files/model.pth", status=301)
    url = server.redirect("/a", server.url("/b"), status=307)
    budget = CallBudget()
    body, response = fetch(url, allow(server), budget)
    assert body == b"model bytes" and response.final_url == server.url("/files/model.pth")
    assert response.record.kind == "get" and response.record.url == url and response.record.final_url == server.url("/files/model.pth")
    assert response.record.size == len(body) and response.record.sha256 == hashlib.sha256(body).hexdigest()


def test_a_redirect_loop_stops_at_the_cap(server):
    url = server.redirect("/loop", "/loop")
    with pytest.raises(FetchRefusedError) as info:
        fetch(url, allow(server), capped(max_redirects=3))
    assert info.value.reason == "redirect"
    assert len(server.requests) == 4  # the first request and three redirects, no more


# --- DNS rebinding ----------------------------------------------------------------------------


def test_the_connection_goes_to_the_address_that_was_checked(server):
    # One lookup per hop: a second one (what urllib does at connect time) would be answered
    # with 127.0.0.2, where a canary listens on the same port.
    canary = Canary("127.0.0.2", server.port)
    answers = iter(["127.0.0.1", "127.0.0.2", "127.0.0.2"])
    lookups = []

    def resolver(host, port):
        lookups.append((host, port))
        return [next(answers)]

    try:
        url = server.serve("/f", b"pinned")
        policy = FetchPolicy(allow_hosts=("mirror.test",), resolver=resolver)
        body, _ = fetch(f"http://mirror.test:{server.port}/f", policy)
        assert body == b"pinned"
        assert lookups == [("mirror.test", server.port)]
        assert canary.connections() == 0
        assert server.requests[0].host == f"mirror.test:{server.port}"  # the name, not the address
        assert url.endswith("/f")
    finally:
        canary.close()


def test_dns_rebinding_public_first_then_loopback_never_reaches_loopback(canaries, monkeypatch):
    v4, _ = canaries
    answers = iter([PUBLIC_ADDRESS, "127.0.0.1", "127.0.0.1"])
    lookups, attempts = [], []

    def rebinding_getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (next(answers), port))]

    def guarded_connect(self, address):
        attempts.append(address[0])
        # Nothing leaves the machine: the public answer is refused here, before any packet.
        raise ConnectionRefusedError("test: public addresses are never connected to")

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    with pytest.raises(NetworkError):
        fetch(f"http://rebind.test:{v4.port}/")
    assert lookups == ["rebind.test"]  # looked up once
    assert attempts == [PUBLIC_ADDRESS]  # and connected to the checked answer only
    assert v4.connections() == 0


def test_a_name_with_a_public_and_a_loopback_answer_is_refused(canaries, monkeypatch):
    v4, _ = canaries
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    policy = FetchPolicy(resolver=lambda host, port: [PUBLIC_ADDRESS, "127.0.0.1"])
    with pytest.raises(FetchRefusedError) as info:
        fetch(f"http://mixed.test:{v4.port}/", policy)
    assert info.value.reason == "address" and info.value.address == "127.0.0.1"
    assert attempts == [] and v4.connections() == 0


# --- TLS: pinned address, the name's certificate -----------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"), ("mirror.test",))


@pytest.fixture
def tls_server(tls_files):
    srv = LoopbackHTTPServer(tls=tls_files.server_context())
    yield srv
    srv.close()


def tls_policy(tls_files, *names, **kwargs):
    return FetchPolicy(
        allow_hosts=names,
        resolver=lambda host, port: ["127.0.0.1"],
        ssl_context=tls_files.client_context(),
        **kwargs,
    )


def test_https_connects_to_the_pinned_address_and_verifies_the_name(tls_server, tls_files):
    tls_server.serve("/f", b"over tls")
    body, response = fetch(f"https://mirror.test:{tls_server.port}/f", tls_policy(tls_files, "mirror.test"))
    assert body == b"over tls" and response.final_url == f"https://mirror.test:{tls_server.port}/f"
    assert tls_server.sni_names == ["mirror.test"]
    assert tls_server.requests[0].host == f"mirror.test:{tls_server.port}"


def test_https_with_a_certificate_for_another_name_fails(tls_server, tls_files):
    tls_server.serve("/f", b"over tls")
    with pytest.raises(NetworkError) as info:
        fetch(f"https://other.test:{tls_server.port}/f", tls_policy(tls_files, "other.test"))
    assert "certificate" in str(info.value).lower()
    assert tls_server.sni_names == ["other.test"]  # the handshake ran, and stopped there
    assert tls_server.requests == []


def test_https_to_http_redirect_is_refused(tls_server, tls_files, server):
    server.serve("/f", b"clear text")
    url = tls_server.redirect("/r", f"http://mirror.test:{server.port}/f")
    with pytest.raises(FetchRefusedError) as info:
        fetch(url.replace("127.0.0.1", "mirror.test"), tls_policy(tls_files, "mirror.test"))
    assert info.value.reason == "redirect" and "https to http" in str(info.value)
    assert [r.path for r in tls_server.requests] == ["/r"] and server.requests == []


# --- caps -------------------------------------------------------------------------------------


def test_content_length_past_the_file_cap_is_refused_before_reading(server):
    sent = threading.Event()

    def huge(request):
        request.send_response(200)
        request.send_header("Content-Length", str(10 * 1024 * 1024))
        sent.set()  # before the headers leave, so the client cannot be faster than this
        request.end_headers()
        request.wfile.write(b"x" * 64 * 1024)

    url = server.route("/huge", huge)
    budget = capped(max_file_bytes=1024 * 1024)
    with pytest.raises(FetchRefusedError) as info:
        fetch(url, allow(server), budget)
    assert info.value.reason == "file_size" and "10485760 bytes" in str(info.value)
    assert sent.is_set() and budget.bytes_used == 0


def test_a_body_without_length_is_cut_at_the_file_cap(server):
    url = server.serve("/endless", b"y" * (3 * 1024 * 1024), content_length=False)
    budget = capped(max_file_bytes=1024 * 1024)
    with pytest.raises(FetchRefusedError) as info:
        with open_checked(url, policy=allow(server), budget=budget, deadline=Deadline(30)) as r:
            while r.read(64 * 1024):
                pass
    assert info.value.reason == "file_size"
    assert budget.bytes_used <= 1024 * 1024


def test_the_call_budget_spans_fetches(server):
    first = server.serve("/a", b"a" * 1000)
    second = server.serve("/b", b"b" * 1000)
    chunked = server.serve("/c", b"c" * 1000, content_length=False)
    budget = capped(max_call_bytes=1500)
    body, response = fetch(first, allow(server), budget)
    assert body == b"a" * 1000 and response.record.size == 1000
    with pytest.raises(FetchRefusedError) as info:
        fetch(second, allow(server), budget)
    assert info.value.reason == "call_bytes"  # refused on its Content-Length, before reading
    with pytest.raises(FetchRefusedError) as info:
        fetch(chunked, allow(server), budget)
    assert info.value.reason == "call_bytes"  # refused while reading
    assert budget.bytes_used <= 1500


def test_the_fetch_count_is_capped(server):
    url = server.serve("/f", b"f")
    budget = capped(max_fetches=3)
    responses = [fetch(url, allow(server), budget)[1] for _ in range(3)]
    with pytest.raises(FetchRefusedError) as info:
        fetch(url, allow(server), budget)
    assert info.value.reason == "fetch_count"
    assert len(server.requests) == 3 and all(r.record is not None for r in responses)


def test_conflicting_content_lengths_are_refused(server):
    def two_lengths(request):
        request.send_response(200)
        request.send_header("Content-Length", "5")
        request.send_header("Content-Length", "50")
        request.end_headers()
        request.wfile.write(b"12345")

    with pytest.raises(FetchRefusedError) as info:
        fetch(server.route("/two", two_lengths), allow(server))
    assert info.value.reason == "response"


# --- the deadline: slow servers cannot hold the parent ------------------------------------------


def dribbler(server, sent, *, headers_first):
    """A handler sending one byte every 20 ms for up to 20 s: each byte well inside io_timeout."""

    def handler(request):
        out = request.wfile
        if headers_first:
            request.send_response(200)
            request.send_header("Connection", "close")
            request.end_headers()
        else:
            out.write(b"HTTP/1.1 200 OK\r\n")
        end = time.monotonic() + 20
        while not server.stopping.is_set() and time.monotonic() < end:
            out.write(b"z" if headers_first else b"X")
            out.flush()
            sent.append(1)
            time.sleep(0.02)

    return handler


@pytest.mark.parametrize("headers_first", [True, False], ids=["slow-body", "slow-headers"])
def test_a_slow_loris_server_is_cut_off_at_the_deadline(server, headers_first):
    sent = []
    url = server.route("/slow", dribbler(server, sent, headers_first=headers_first))
    with pytest.raises(FetchRefusedError) as info:
        fetch(url, allow(server), capped(io_timeout=30), deadline=Deadline(0.5))
    assert info.value.reason == "deadline" and "Sandbox(timeout=" in str(info.value)
    assert sent  # the server was dribbling, every gap far below io_timeout


def test_a_server_that_never_answers_is_cut_off_at_the_deadline():
    silent = Canary()  # accepts (the kernel does) and never says a word
    try:
        policy = FetchPolicy(allow_hosts=(f"127.0.0.1:{silent.port}",))
        with pytest.raises(FetchRefusedError) as info:
            fetch(f"http://127.0.0.1:{silent.port}/", policy, capped(io_timeout=30), deadline=Deadline(0.3))
        assert info.value.reason == "deadline"
        assert silent.connections() == 1
    finally:
        silent.close()


def test_a_lookup_that_hangs_is_cut_off_at_the_deadline():
    release, started = threading.Event(), threading.Event()

    def hanging_resolver(host, port):
        started.set()
        release.wait(30)
        return ["127.0.0.1"]

    try:
        with pytest.raises(FetchRefusedError) as info:
            fetch("http://slow-dns.test/", FetchPolicy(resolver=hanging_resolver), deadline=Deadline(0.3))
        assert info.value.reason == "deadline" and started.is_set()
    finally:
        release.set()


# --- the record and the download path ---------------------------------------------------------


def test_stream_to_file_reads_a_checked_response_and_the_record_matches(server):
    data = bytes(range(256)) * 5000
    url = server.serve("/model.pth", data)
    budget = CallBudget()
    out = io.BytesIO()
    with open_checked(url, policy=allow(server), budget=budget, deadline=Deadline(30)) as response:
        size, sha256 = _http.stream_to_file(response, out)
    assert out.getvalue() == data and size == len(data)
    assert sha256 == hashlib.sha256(data).hexdigest()
    record = response.record
    assert (record.url, record.final_url, record.size, record.sha256) == (url, url, len(data), sha256)


def test_an_error_status_is_raised_as_for_open_url(server):
    with pytest.raises(_http.HTTPStatusError) as info:
        fetch(server.url("/missing"), allow(server))
    assert info.value.status == 404


def client_sockets_to(port):
    """TCP sockets of this process connected to ``port`` (the server side is not counted)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def test_descriptors_stay_bounded_whatever_the_fetches_do(server, canaries):
    # Fetches that succeed, are refused, are cut at a cap, or fail with a status: none may leave
    # a socket to the server open in the parent.
    v4, _ = canaries
    ok = server.serve("/ok", b"ok" * 100)
    big = server.serve("/big", b"b" * 100_000, content_length=False)
    loop = server.redirect("/loop", "/loop")
    to_canary = server.redirect("/away", f"http://2130706433:{v4.port}/")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        assert client_sockets_to(server.port) == 1  # the count sees an open client socket
    for _ in range(10):
        budget = capped(max_file_bytes=1000)
        fetch(ok, allow(server), budget)
        for url in (big, loop, to_canary, server.url("/missing")):
            with pytest.raises((FetchRefusedError, _http.HTTPStatusError)):
                fetch(url, allow(server), budget)
    assert len(server.requests) == 10 * (1 + 1 + 6 + 1 + 1)  # every fetch really ran
    assert client_sockets_to(server.port) == 0
    assert v4.connections() == 0


def test_a_body_cut_at_a_cap_leaves_no_record_even_if_read_again(server):
    url = server.serve("/big", b"b" * 100_000, content_length=False)
    budget = capped(max_file_bytes=1000)
    response = open_checked(url, policy=allow(server), budget=budget, deadline=Deadline(30))
    with pytest.raises(FetchRefusedError):
        response.read()
    assert response.read(10) == b"" and response.record is None
