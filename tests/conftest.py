"""Test-wide guards: a private hub dir per test, a clean environment, no network but loopback."""

from __future__ import annotations

import ipaddress
import socket

import pytest

pytest_plugins = ["tests.fixtures_github", "tests.fixtures_hf"]

# Where GitHub would be if a test forgot the emulator: a closed loopback port, so it fails fast.
_NOWHERE = "http://127.0.0.1:9"
_SCRUBBED = ("GITHUB_TOKEN", "SAFEHUB_GITHUB_TOKEN", "SAFEHUB_ALLOW_HOSTS", "SAFEHUB_OFFLINE", "SAFEHUB_SHARED_HUB_DIRS",
             "TORCH_HUB", "XDG_CACHE_HOME",
             "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


@pytest.fixture(autouse=True)
def hub_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own TORCH_HOME (so its own hub dir) and no stray configuration."""
    from safehub import _cache

    torch_home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    # Views and digest memos of this test's calls, apart from every other test's (mktemp: 0700).
    monkeypatch.setenv("SAFEHUB_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAFEHUB_GITHUB_URL", _NOWHERE)
    monkeypatch.setenv("SAFEHUB_GITHUB_API_URL", _NOWHERE)
    # The Hugging Face cache too (HF_HUB_CACHE is HF_HOME/hub), and no Hub but a test's stand-in.
    monkeypatch.setenv("HF_HOME", str(torch_home.parent / f"{torch_home.name}-hf"))
    monkeypatch.setenv("HF_ENDPOINT", _NOWHERE)
    monkeypatch.setattr(_cache, "_hub_dir", None)
    return torch_home / "hub"


@pytest.fixture(params=["cold", "warm"])
def worker_start(request, monkeypatch):
    """How isolated calls start their workers in this test: "cold" (a fresh interpreter per
    call) or "warm" (forked by the zygote). Tests that must hold on both paths use it."""
    monkeypatch.setenv("SAFEHUB_WARM", "1" if request.param == "warm" else "0")
    if request.param == "warm":
        import safehub

        if not safehub.warmup():
            pytest.skip("the warm zygote cannot start on this machine")
    return request.param


def _is_loopback(address) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths and abstract names
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Refuse, in the test process, any connection that leaves the machine."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def connect(self, address):
        if not _is_loopback(address):
            raise ConnectionRefusedError(f"tests may not reach {address!r}: use the GitHub emulator")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _is_loopback(address):
            raise ConnectionRefusedError(f"tests may not reach {address!r}: use the GitHub emulator")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
