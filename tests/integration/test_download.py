"""download_url_to_file and load_state_dict_from_url against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import filelock
import pytest
import torch

from safehub import _download, constants
from safehub._download import download_url_to_file, load_state_dict_from_url
from safehub.errors import (
    ArchiveError,
    DownloadError,
    HashMismatchError,
    IncompleteDownloadError,
    InvalidArgumentError,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- a small loopback server ----------------------------------------------------------------


@dataclass
class Route:
    body: bytes
    status: int = 200
    cut_after: int | None = None  # send only this many bytes of the body, then close
    delay_s: float = 0.0  # wait before answering, so parallel callers overlap


class Server:
    """Serves ``routes`` by path and counts every GET."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def record(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1

    def reset(self) -> None:
        self.routes.clear()
        self.hits.clear()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler_for(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            server.record(self.path)
            route = server.routes.get(self.path, Route(b"not found", status=404))
            time.sleep(route.delay_s)
            self.send_response(route.status)
            self.send_header("Content-Length", str(len(route.body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if route.cut_after is None:
                self.wfile.write(route.body)
            else:
                self.wfile.write(route.body[: route.cut_after])
                self.wfile.flush()
                self.close_connection = True

        def log_message(self, *args) -> None:
            pass  # keep test output clean

    return Handler


@pytest.fixture(scope="module")
def _server():
    server = Server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def server(_server):
    _server.reset()
    return _server


# --- helpers -------------------------------------------------------------------------------


def checkpoint_bytes(obj, *, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def state_dict() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "bias": torch.ones(3)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


class NotWeights:
    """A pickled object that is not a tensor: weights_only must refuse it."""


# --- download_url_to_file ------------------------------------------------------------------


def test_download_success(server, tmp_path, capsys):
    body = os.urandom(300_000)
    dst = tmp_path / "file.bin"
    download_url_to_file(server.add("/file.bin", Route(body)), str(dst), progress=True)
    assert dst.read_bytes() == body
    assert leftovers(tmp_path) == []
    captured = capsys.readouterr()
    assert captured.out == ""  # the progress bar goes to stderr only


def test_hash_prefix_ok(server, tmp_path):
    body = b"payload" * 1000
    digest = hashlib.sha256(body).hexdigest()
    dst = tmp_path / "file.bin"
    download_url_to_file(server.add("/f", Route(body)), str(dst), hash_prefix=digest[:10], progress=False)
    assert dst.read_bytes() == body


def test_hash_prefix_mismatch_leaves_dst_untouched(server, tmp_path):
    body = b"payload" * 1000
    dst = tmp_path / "file.bin"
    dst.write_bytes(b"the old, good file")
    with pytest.raises(HashMismatchError) as info:
        download_url_to_file(server.add("/f", Route(body)), str(dst), hash_prefix="00000000", progress=False)
    assert isinstance(info.value, RuntimeError)  # what torch.hub callers catch
    assert info.value.expected == "00000000"
    assert info.value.actual == hashlib.sha256(body).hexdigest()
    assert dst.read_bytes() == b"the old, good file"
    assert leftovers(tmp_path) == []


def test_cut_off_body(server, tmp_path):
    url = server.add("/cut", Route(os.urandom(1000), cut_after=500))
    dst = tmp_path / "file.bin"
    with pytest.raises(IncompleteDownloadError) as info:
        download_url_to_file(url, str(dst), progress=False)
    assert (info.value.expected, info.value.received) == (1000, 500)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_404(server, tmp_path):
    dst = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="check the URL") as info:
        download_url_to_file(server.url("/missing"), str(dst), progress=False)
    assert info.value.status == 404
    assert info.value.url == server.url("/missing")
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_missing_folder_is_not_created(server, tmp_path):
    with pytest.raises(FileNotFoundError):
        download_url_to_file(server.add("/f", Route(b"x")), str(tmp_path / "no" / "f.bin"), progress=False)
    assert not (tmp_path / "no").exists()
    assert server.hits["/f"] == 0


def test_keyboard_interrupt_removes_the_partial_file(server, tmp_path, monkeypatch):
    def interrupted(response, out, **kwargs):
        out.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(_download._http, "stream_to_file", interrupted)
    dst = tmp_path / "file.bin"
    with pytest.raises(KeyboardInterrupt):
        download_url_to_file(server.add("/f", Route(b"x" * 100)), str(dst), progress=False)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_waiting_for_the_lock_is_logged(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(constants, "LOCK_LOG_EVERY_S", 0.05)
    url = server.add("/f", Route(b"x" * 100))
    dst = tmp_path / "file.bin"
    holder = filelock.FileLock(f"{dst}.lock")
    holder.acquire()
    errors: list[BaseException] = []

    def download() -> None:
        try:
            download_url_to_file(url, str(dst), progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=download)
    with caplog.at_level(logging.INFO, logger="safehub"):
        try:
            thread.start()
            time.sleep(0.3)
            assert not dst.exists()  # still waiting
        finally:
            holder.release()
            thread.join(timeout=10)
    assert errors == []
    assert dst.read_bytes() == b"x" * 100
    assert any("waiting for lock on" in r.getMessage() for r in caplog.records)


# --- load_state_dict_from_url --------------------------------------------------------------


def test_load_state_dict(server, tmp_path, capsys):
    sd = state_dict()
    url = server.add("/models/net.pth", Route(checkpoint_bytes(sd)))
    assert_same(load_state_dict_from_url(url, model_dir=str(tmp_path), progress=False), sd)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f'Downloading: "{url}" to {tmp_path / "net.pth"}' in captured.err
    # A second call reads the cache.
    assert_same(load_state_dict_from_url(url, model_dir=str(tmp_path), progress=False), sd)
    assert server.hits["/models/net.pth"] == 1


def test_default_model_dir_is_hub_checkpoints(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    from safehub import _cache

    monkeypatch.setattr(_cache, "_hub_dir", None, raising=False)
    url = server.add("/net.pth", Route(checkpoint_bytes(state_dict())))
    load_state_dict_from_url(url, progress=False)
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "net.pth").is_file()


def test_check_hash(server, tmp_path):
    body = checkpoint_bytes(state_dict())
    prefix = hashlib.sha256(body).hexdigest()[:8]
    good = server.add(f"/net-{prefix}.pth", Route(body))
    assert_same(load_state_dict_from_url(good, model_dir=str(tmp_path), check_hash=True, progress=False), state_dict())

    bad = server.add("/other-deadbeef.pth", Route(body))
    with pytest.raises(HashMismatchError):
        load_state_dict_from_url(bad, model_dir=str(tmp_path), check_hash=True, progress=False)
    assert not (tmp_path / "other-deadbeef.pth").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("file_name", ["", ".", "..", "../evil.pth", "sub/evil.pth", "/tmp/evil.pth", "a\\b", "a\0b"])
def test_file_name_must_be_plain(server, tmp_path, file_name):
    url = server.add("/net.pth", Route(checkpoint_bytes(state_dict())))
    with pytest.raises(InvalidArgumentError, match="plain file name"):
        load_state_dict_from_url(url, model_dir=str(tmp_path / "m"), file_name=file_name, progress=False)
    assert server.hits["/net.pth"] == 0
    assert not (tmp_path / "evil.pth").exists()


@pytest.mark.parametrize("file_name", ["net.pth.lock", "net.pth.1.abc.partial"])
def test_file_names_of_safehub_files_are_reserved(server, tmp_path, file_name):
    url = server.add("/net.pth", Route(checkpoint_bytes(state_dict())))
    with pytest.raises(InvalidArgumentError, match="reserved"):
        load_state_dict_from_url(url, model_dir=str(tmp_path), file_name=file_name, progress=False)


def test_file_name_from_a_url_without_one(server, tmp_path):
    with pytest.raises(InvalidArgumentError, match="file_name="):
        load_state_dict_from_url(server.url("/models/"), model_dir=str(tmp_path), progress=False)


def test_file_name_is_used(server, tmp_path):
    url = server.add("/download?id=7", Route(checkpoint_bytes(state_dict())))
    load_state_dict_from_url(url, model_dir=str(tmp_path), file_name="mine.pth", progress=False)
    assert (tmp_path / "mine.pth").is_file()


def test_weights_only_by_default(server, tmp_path):
    url = server.add("/obj.pth", Route(checkpoint_bytes({"w": torch.ones(1), "obj": NotWeights()})))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state_dict_from_url(url, model_dir=str(tmp_path), progress=False)
    # Opting out, as with torch.hub, loads it.
    loaded = load_state_dict_from_url(url, model_dir=str(tmp_path), progress=False, weights_only=False)
    assert isinstance(loaded["obj"], NotWeights)


def test_legacy_zip_format(server, tmp_path):
    sd = state_dict()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("legacy.pth", checkpoint_bytes(sd, legacy=True))
    url = server.add("/legacy.zip", Route(buf.getvalue()))
    with pytest.warns(FutureWarning, match="old format"):
        loaded = load_state_dict_from_url(url, model_dir=str(tmp_path), progress=False)
    assert_same(loaded, sd)
    assert (tmp_path / "legacy.pth").is_file()


def test_legacy_zip_with_a_path_is_refused(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../escaped.pth", checkpoint_bytes(state_dict(), legacy=True))
    model_dir = tmp_path / "m"
    url = server.add("/evil.zip", Route(buf.getvalue()))
    with pytest.warns(FutureWarning), pytest.raises(ArchiveError, match="escaped"):
        load_state_dict_from_url(url, model_dir=str(model_dir), progress=False)
    assert not (tmp_path / "escaped.pth").exists()


def test_threads_download_once(server, tmp_path):
    sd = state_dict()
    url = server.add("/net.pth", Route(checkpoint_bytes(sd), delay_s=0.3))
    results: list = []

    def load() -> None:
        results.append(load_state_dict_from_url(url, model_dir=str(tmp_path), progress=False))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(results) == 8
    for r in results:
        assert_same(r, sd)
    assert server.hits["/net.pth"] == 1


_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    ready, go, url, model_dir = sys.argv[1:5]
    from safehub._download import load_state_dict_from_url
    open(ready, "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    sd = load_state_dict_from_url(url, model_dir=model_dir, progress=False)
    print(json.dumps({k: v.tolist() for k, v in sd.items()}))
    """
)


@pytest.mark.slow
def test_processes_download_once(server, tmp_path):
    sd = state_dict()
    url = server.add("/shared.pth", Route(checkpoint_bytes(sd), delay_s=0.3))
    model_dir = tmp_path / "models"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    procs: list[subprocess.Popen] = []
    try:
        for i in range(8):
            args = [sys.executable, "-c", _CHILD, str(tmp_path / f"ready{i}"), str(go), url, str(model_dir)]
            procs.append(
                subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            )
        _wait_for([tmp_path / f"ready{i}" for i in range(8)], procs, timeout_s=30)
        go.touch()  # all eight start their download at once
        outputs = [p.communicate(timeout=120) for p in procs]  # eight torch imports on a loaded machine
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for p, (_out, err) in zip(procs, outputs):
        assert p.returncode == 0, err.decode()
    expected = {k: v.tolist() for k, v in sd.items()}
    assert all(json.loads(out) == expected for out, _ in outputs)
    assert server.hits["/shared.pth"] == 1
    assert sum(b"Downloading:" in err for _, err in outputs) == 1
    assert leftovers(model_dir) == []


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        crashed = [p for p in procs if p.poll() is not None]
        if crashed:
            raise AssertionError(f"a child exited early: {crashed[0].communicate()[1].decode()}")
        if time.monotonic() > deadline:
            raise AssertionError("children did not start in time")
        time.sleep(0.02)
