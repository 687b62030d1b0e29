"""The fetch policy's pure parts: URL checks, address kinds, allow-list entries, Sandbox fields.

No sockets here: lookups go through injected resolvers. The attacks against real listeners are
in ``tests/security/test_egress.py``.
"""

from __future__ import annotations

import ipaddress
import pickle

import pytest

from safehub import constants
from safehub._egress.connection import FetchPolicy
from safehub._egress.limits import DEFAULT_LIMITS, CallBudget, Deadline, Limits
from safehub._egress.policy import (
    address_refusal,
    check_url,
    github_allow_hosts,
    is_github_endpoint,
    normalize_allow_hosts,
    resolve_checked,
)
from safehub._sandbox import Sandbox
from safehub.errors import DownloadError, FetchRefusedError, InvalidArgumentError, NetworkError


def test_a_plain_url_is_parsed_into_its_target():
    target = check_url("https://Download.PyTorch.org/models/resnet18-f37072fd.pth?x=1#frag")
    assert (target.scheme, target.host, target.port) == ("https", "download.pytorch.org", 443)
    assert target.request_target == "/models/resnet18-f37072fd.pth?x=1"  # the fragment is not sent
    assert target.url == "https://download.pytorch.org/models/resnet18-f37072fd.pth?x=1"
    assert not target.allowed and target.literal is None
    assert check_url("http://example.com").request_target == "/"
    assert check_url("http://example.com:8080/a").url == "http://example.com:8080/a"


def test_host_names_are_normalized():
    assert check_url("http://example.com./").host == "example.com"  # trailing dot
    assert check_url("http://b\u00fccher.example/").host == "xn--bcher-kva.example"  # IDNA
    assert check_url("http://\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com/").host == "example.com"  # fullwidth
    assert check_url("http://[2606:4700:0:0::1]/").host == "2606:4700::1"
    assert check_url("http://93.184.215.14/").literal == ipaddress.ip_address("93.184.215.14")
    # Odd numeric spellings are not literals: the resolver reads them, and its answer is checked.
    assert check_url("http://2130706433/").literal is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/f", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://example.com/", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("//example.com/f", "scheme"),
        ("http://user:pass@example.com/", "url"),
        ("http://user@example.com/", "url"),
        ("http://a@b@example.com/", "url"),
        ("http://example.com\\@evil.com/", "url"),
        ("http://exa mple.com/", "url"),
        ("http://example.com/a b", "url"),
        ("http://example.com/\r\nX-Injected: 1", "url"),
        ("http://example.com/\x00", "url"),
        ("http://example.com/caf\u00e9", "url"),
        ("http://example.com/\"quoted\"", "url"),
        ("http://example.com:0/", "url"),
        ("http://example.com:99999/", "url"),
        ("http://example.com:port/", "url"),
        ("http:///path", "url"),
        ("http://exa..mple.com/", "url"),
        ("http://-_-/", "url"),
        ("http://[fe80::1%25eth0]/", "url"),
        ("http://[not-v6]/", "url"),
        ("http://" + "a" * 64 + ".com/", "url"),
        ("http://localhost/", "host"),
        ("http://LocalHost./", "host"),
        ("http://evil.localhost/", "host"),
        (b"http://example.com/", "url"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url, reason):
    with pytest.raises(FetchRefusedError) as info:
        check_url(url)
    assert info.value.reason == reason


def test_long_urls_are_refused():
    url = "https://example.com/" + "a" * DEFAULT_LIMITS.max_url_chars
    with pytest.raises(FetchRefusedError) as info:
        check_url(url)
    assert info.value.reason == "url" and "longer than" in str(info.value) and len(str(info.value)) < 600


def test_allow_list_entries_match_host_and_optional_port():
    assert check_url("http://127.0.0.1:8080/", allow_hosts=("127.0.0.1:8080",)).allowed
    assert check_url("http://127.0.0.1:9/", allow_hosts=("127.0.0.1",)).allowed
    assert not check_url("http://127.0.0.1:9/", allow_hosts=("127.0.0.1:8080",)).allowed
    assert not check_url("http://2130706433:8080/", allow_hosts=("127.0.0.1:8080",)).allowed
    assert check_url("http://mirror.local/", allow_hosts=("Mirror.Local.:80",)).allowed
    assert check_url("http://[::1]:8080/", allow_hosts=("[::1]:8080",)).allowed
    assert check_url("http://localhost:5000/", allow_hosts=("localhost",)).allowed
    assert check_url("https://mirror.local/", allow_hosts=("mirror.local:443",)).allowed


def test_normalize_allow_hosts():
    assert normalize_allow_hosts(
        ["Mirror.Local.", "127.0.0.1:8080", "[::1]", "[0:0::1]:80", "::1", "b\u00fccher.example:81"], source="X"
    ) == ("mirror.local", "127.0.0.1:8080", "[::1]", "[::1]:80", "[::1]", "xn--bcher-kva.example:81")


@pytest.mark.parametrize(
    "entry",
    ["", " ", "http://mirror.local", "mirror.local/path", "user@mirror.local", "*.example.com", "mirror.local:0",
     "mirror.local:65536", "mirror.local:http", "a:b:c", "[::1]x", "[::1]:", "exa mple", 8080, None],
)
def test_bad_allow_host_entries_are_refused_naming_the_source(entry):
    with pytest.raises(InvalidArgumentError) as info:
        normalize_allow_hosts([entry], source="SAFEHUB_ALLOW_HOSTS")
    assert "SAFEHUB_ALLOW_HOSTS" in str(info.value)


PUBLIC = ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:82a::200e",
          "::ffff:8.8.8.8", "64:ff9b::808:808"]
REFUSED = {
    "127.0.0.1": "loopback", "127.255.255.254": "loopback", "::1": "loopback", "::ffff:127.0.0.1": "loopback",
    "64:ff9b::7f00:1": "loopback", "10.1.2.3": "private", "172.31.255.255": "private", "192.168.0.1": "private",
    "fd00::1": "private", "fc00::1": "private", "169.254.169.254": "link-local", "fe80::1": "link-local",
    "100.64.0.1": "shared", "100.127.255.255": "shared", "0.0.0.0": "unspecified", "0.1.2.3": "unspecified",
    "::": "unspecified", "224.0.0.251": "multicast", "239.255.255.250": "multicast", "ff02::1": "multicast",
    "240.0.0.1": "reserved", "255.255.255.255": "reserved", "::127.0.0.1": "reserved", "4000::1": "reserved",
    "192.0.2.1": "documentation", "198.51.100.1": "documentation", "203.0.113.1": "documentation",
    "2001:db8::1": "documentation", "198.18.0.1": "benchmarking", "192.0.0.8": "IETF", "2001::1": "IETF",
    "2002:7f00:1::": "6to4", "192.88.99.1": "6to4", "fec0::1": "site-local",
}


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("address", "kind"), REFUSED.items())
def test_special_addresses_are_refused_and_named(address, kind):
    assert kind in address_refusal(ipaddress.ip_address(address))


def test_resolve_checked_needs_every_answer_public():
    target = check_url("http://mirror.example/")
    deadline = Deadline(10)
    assert resolve_checked(target, resolver=lambda h, p: ["8.8.8.8", "::ffff:8.8.8.8", "1.1.1.1"], deadline=deadline) == (
        ipaddress.ip_address("8.8.8.8"),
        ipaddress.ip_address("1.1.1.1"),
    )
    for answers in (["8.8.8.8", "10.0.0.1"], ["::1"], ["fe80::1%eth0"], ["not an address"]):
        with pytest.raises(FetchRefusedError) as info:
            resolve_checked(target, resolver=lambda h, p, a=answers: a, deadline=deadline)
        assert info.value.reason == "address"
    with pytest.raises(FetchRefusedError) as info:
        resolve_checked(target, resolver=lambda h, p: [], deadline=deadline)
    assert info.value.reason == "resolve"


def test_resolve_checked_skips_the_address_check_for_allowed_hosts_only():
    allowed = check_url("http://mirror.local:8080/", allow_hosts=("mirror.local",))
    assert resolve_checked(allowed, resolver=lambda h, p: ["127.0.0.1"], deadline=Deadline(10)) == (
        ipaddress.ip_address("127.0.0.1"),
    )


def test_literal_hosts_are_not_looked_up():
    def resolver(host, port):
        raise AssertionError("a literal needs no lookup")

    target = check_url("http://8.8.8.8/")
    assert resolve_checked(target, resolver=resolver, deadline=Deadline(10)) == (ipaddress.ip_address("8.8.8.8"),)


def test_a_failed_lookup_is_a_network_error():
    def resolver(host, port):
        raise OSError(-2, "Name or service not known")

    with pytest.raises(NetworkError) as info:
        resolve_checked(check_url("http://nowhere.example/"), resolver=resolver, deadline=Deadline(10))
    assert "nowhere.example" in str(info.value)


def test_github_endpoints_come_from_the_configuration(monkeypatch):
    monkeypatch.setenv("SAFEHUB_GITHUB_URL", "http://127.0.0.1:8001")
    monkeypatch.setenv("SAFEHUB_GITHUB_API_URL", "http://[::1]:8002/api/v3")
    assert github_allow_hosts() == ("127.0.0.1:8001", "[::1]:8002")
    assert is_github_endpoint("http://127.0.0.1:8001/owner/repo/zipball/main")
    assert is_github_endpoint("http://[::1]:8002/repos/o/r")
    assert not is_github_endpoint("http://127.0.0.1:8002/")
    assert not is_github_endpoint("not a url")
    monkeypatch.setenv("SAFEHUB_GITHUB_URL", "https://github.com")
    monkeypatch.setenv("SAFEHUB_GITHUB_API_URL", "https://api.github.com")
    assert github_allow_hosts() == ("github.com:443", "api.github.com:443")
    assert FetchPolicy().allowed_hosts() == ("github.com:443", "api.github.com:443")


def test_safehub_allow_hosts_is_read_at_call_time(monkeypatch):
    assert constants.SAFEHUB_ALLOW_HOSTS == ()
    monkeypatch.setenv("SAFEHUB_ALLOW_HOSTS", " mirror.local:8080, ,127.0.0.1 ")
    assert constants.SAFEHUB_ALLOW_HOSTS == ("mirror.local:8080", "127.0.0.1")
    policy = FetchPolicy.for_sandbox(Sandbox(allow_hosts=("[::1]:9000",), fetch=False))
    assert policy.allow_hosts == ("mirror.local:8080", "127.0.0.1", "[::1]:9000") and not policy.enabled
    monkeypatch.setenv("SAFEHUB_ALLOW_HOSTS", "http://mirror.local")
    with pytest.raises(InvalidArgumentError, match="SAFEHUB_ALLOW_HOSTS"):
        FetchPolicy.for_sandbox(Sandbox())


def test_sandbox_fetch_fields():
    sandbox = Sandbox()
    assert sandbox.fetch is True and sandbox.allow_hosts == ()
    sandbox = Sandbox(allow_hosts=["Mirror.Local:8080", "127.0.0.1"], fetch=False)
    assert sandbox.allow_hosts == ("mirror.local:8080", "127.0.0.1") and sandbox.fetch is False
    for kwargs in ({"fetch": "no"}, {"fetch": 1}, {"allow_hosts": "mirror.local"}, {"allow_hosts": ("http://x",)}):
        with pytest.raises(InvalidArgumentError, match=next(iter(kwargs))):
            Sandbox(**kwargs)


def test_fetch_refused_error_pickles_and_is_a_download_error():
    error = FetchRefusedError("Refusing to fetch http://x/: no.", url="http://x/", reason="address", address="127.0.0.1")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is FetchRefusedError and str(again) == str(error)
    assert (again.url, again.reason, again.address) == ("http://x/", "address", "127.0.0.1")
    assert isinstance(again, DownloadError) and isinstance(again, RuntimeError)


def test_budget_and_deadline():
    budget = CallBudget(Limits(max_call_bytes=10, max_fetches=1))
    budget.start_fetch("u")
    with pytest.raises(FetchRefusedError, match="fetches"):
        budget.start_fetch("u")
    budget.charge("u", 6)
    with pytest.raises(FetchRefusedError) as info:
        budget.check_length("u", 5)
    assert info.value.reason == "call_bytes" and budget.remaining_bytes() == 4
    with pytest.raises(FetchRefusedError):
        budget.charge("u", 5)
    assert budget.bytes_used == 6
    assert Deadline(60).timeout(5, "u") == 5
    expired = Deadline(0)
    with pytest.raises(FetchRefusedError) as info:
        expired.timeout(5, "u")
    assert info.value.reason == "deadline"
