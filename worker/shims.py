"""What a repository fetches, asked of the parent: the worker itself has no network (DESIGN 4b).

Installed by ``work.py`` before hubconf.py is imported. It patches, where a repository reaches
them (HUB_PATTERNS.md):

- ``torch.hub.download_url_to_file``: every torch.hub download, ``load_state_dict_from_url`` and
  ``torch.utils.model_zoo.load_url`` included, even when bound at import time
  (``from torch.hub import load_state_dict_from_url``): the original looks the name up in
  torch.hub's globals at call time. The parent downloads into its cache and answers with a path
  in the call's read-only view folder; a destination elsewhere (the working folder, a
  ``model_dir``) becomes a symbolic link to it, so nothing is copied.
- ``torch.hub._get_cache_or_reload``: nested ``torch.hub.load`` / ``list`` / ``help`` of a GitHub
  repository; the parent runs its whole pipeline and answers with the repository's folder in
  the view. ``torch.hub._load_local``: ``source="local"`` only inside the repositories of this call.
- ``urllib.request.urlopen`` and ``urlretrieve`` (plain GETs); requests and httpx (GET and HEAD,
  ``http_clients.py``); huggingface_hub's ``hf_hub_download`` and ``snapshot_download``
  (``hf_hub.py``): the parent fetches; other methods and anything else that wants the network
  (raw sockets, websockets) fail with an error that names ``Sandbox(network=True)``, and starting
  a program (``curl``) fails with one that says the sandbox starts none.

Each library is patched when it is imported (a cold worker of a pure-Python hubconf never
imports torch), or at once if it already is. The environment gives torch.hub its folders:
``TORCH_HOME`` is a private folder in scratch whose ``hub`` and ``checkpoints`` lead to the view,
so ``get_dir()`` and ``_get_torch_home()`` answer as torch.hub would, the served files stay
read-only, and a repository may keep its own files beside them (fairseq's
``$TORCH_HOME/pytorch_fairseq``); ``HF_HUB_CACHE`` is the view's Hugging Face cache.
"""

from __future__ import annotations

import errno
import importlib
import importlib.abc
import io
import os
import socket
import sys
from typing import Any, Callable

_state: dict[str, Any] = {}
NO_NETWORK = (
    "the sandbox has no network: torch.hub downloads, nested hub loads and plain GETs go through "
    "safehub's parent; anything else needs isolate=safehub.Sandbox(network=True)"
)


class FetchRefused(OSError, RuntimeError):
    """The parent refused or failed a fetch; the message says why (and what would allow it).

    An OSError, as urllib's errors are, and a RuntimeError, as torch.hub's hash mismatch is, so
    a repository's own handling of a failed download still catches it."""


def install(*, ask: Callable[[str, dict[str, Any]], tuple[Any, list[Any], list[int]]], refused: type[BaseException],
            repo_dirs: list[str], view_dir: str, network: bool, scratch_dir: str | None = None) -> None:
    """Patch the fetch paths of this process; ``ask(what, args)`` asks the parent (raises ``refused``)."""
    _PATCHES.update(_patches())
    _state.update(ask=ask, refused=refused, repo_dirs=[os.path.realpath(d) for d in repo_dirs], view_dir=os.path.realpath(view_dir))
    if not network:
        socket.socket.connect = _no_network  # type: ignore[method-assign,assignment]
        socket.socket.connect_ex = _no_network  # type: ignore[method-assign,assignment]
        socket.socket.__init__ = _socket_named  # type: ignore[method-assign]
    if scratch_dir is not None:
        os.environ["TORCH_HOME"] = _torch_home(view_dir, scratch_dir)
    _patch_subprocess()
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, _PatchOnImport())


def _torch_home(view_dir: str, scratch_dir: str) -> str:
    """A TORCH_HOME of the worker's own whose served folders lead to the (read-only) view."""
    home = os.path.join(scratch_dir, "torch_home")
    os.makedirs(home, exist_ok=True)
    for place in ("hub", "checkpoints"):
        link = os.path.join(home, place)
        if not os.path.lexists(link):
            os.symlink(os.path.join(view_dir, place), link)
    return home


def ask(what: str, args: dict[str, Any]) -> tuple[Any, list[Any], list[int]]:
    """Ask the parent for ``what``; a refusal raises :class:`FetchRefused` with the parent's reason."""
    return _ask(what, args)


def _ask(what: str, args: dict[str, Any]) -> tuple[Any, list[Any], list[int]]:
    try:
        return _state["ask"](what, args)
    except _state["refused"] as exc:
        raise FetchRefused(errno.EACCES, f"safehub refused the {what}: {exc}") from None


# -- torch.hub ---------------------------------------------------------------------------------


def _patch_torch_hub(hub: Any) -> None:
    original_load_local = hub._load_local

    def download_url_to_file(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        dst = os.path.abspath(os.path.expanduser(dst))
        if not os.path.isdir(os.path.dirname(dst)):
            raise FileNotFoundError(errno.ENOENT, "No such directory", os.path.dirname(dst))
        _fetch_to(url, dst, hash_prefix, bool(progress))

    def _get_cache_or_reload(github: str, force_reload: bool, trust_repo: Any, calling_fn: str = "load",
                             verbose: bool = True, skip_validation: bool = False) -> str:
        value, _, _ = _ask("repo", {"github": str(github), "force_reload": bool(force_reload), "trust_repo": _trust(trust_repo),
                                    "skip_validation": bool(skip_validation), "calling_fn": str(calling_fn)})
        path = _served_path(value)
        _state["repo_dirs"].append(os.path.realpath(path))
        return path

    def _load_local(hubconf_dir: str, model: Any, *args: Any, **kwargs: Any) -> Any:
        # source="local": a folder of this call's repositories only, never another path of the machine.
        real = os.path.realpath(hubconf_dir)
        if not any(real == d or real.startswith(d + os.sep) for d in _state["repo_dirs"]):
            raise PermissionError(errno.EACCES, f"safehub: a nested source='local' load must stay inside the repository's own folder, not {hubconf_dir}")
        return original_load_local(hubconf_dir, model, *args, **kwargs)

    hub.download_url_to_file = download_url_to_file
    hub._get_cache_or_reload = _get_cache_or_reload
    hub._load_local = _load_local
    # load_state_dict_from_url writes 'Downloading: "<url>" to <the view's path>' before it asks,
    # even for a file the cache has: the parent says what really happens (a download with its
    # progress bar, or the cached file), so torch.hub's own line would only mislead.
    hub.sys = _TorchHubSys()


class _TorchHubSys:
    """``sys`` as torch.hub's functions see it: the same, but their "Downloading:" lines are dropped."""

    def __getattr__(self, name: str) -> Any:
        return getattr(sys, name)

    @property
    def stdout(self) -> Any:
        return _WithoutDownloadLine(sys.stdout)

    @property
    def stderr(self) -> Any:
        return _WithoutDownloadLine(sys.stderr)


class _WithoutDownloadLine:
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if isinstance(text, str) and text.startswith('Downloading: "'):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _trust(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, str)) else str(value)


def _fetch_to(url: str, dst: str, hash_prefix: str | None, progress: bool) -> None:
    """Have the parent fetch ``url`` for ``dst``, as torch.hub's download_url_to_file would write it.

    A destination in one of the view's checkpoints folders is the parent's file of that name. Any
    other (the working folder, a model_dir) is kept in ``hub/checkpoints`` under the URL's own
    name, as load_state_dict_from_url names it, and ``dst`` becomes a link to it.
    """
    import urllib.parse

    folder, name = os.path.realpath(os.path.dirname(dst)), os.path.basename(dst)
    places = {os.path.join(_state["view_dir"], place): place for place in ("hub/checkpoints", "checkpoints")}
    place = places.get(folder)
    if place is None:
        place, name = "hub/checkpoints", os.path.basename(urllib.parse.urlsplit(str(url)).path) or name
    value, _, _ = _ask("fetch", {"url": str(url), "name": name, "place": place, "hash_prefix": hash_prefix, "progress": progress})
    served = _served_path(value)
    if os.path.realpath(dst) != os.path.realpath(served):
        _link(served, dst)


def served_path(value: Any) -> str:
    return _served_path(value)


def link(served: str, dst: str) -> None:
    _link(served, dst)


def _served_path(value: Any) -> str:
    """The path the parent answered with, which must lie in this call's view folder."""
    path = value.get("path") if isinstance(value, dict) else None
    # The entry's folder, not the entry: a view entry may be a link to a file granted to this call.
    where = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)) if isinstance(path, str) else ""
    if not isinstance(path, str) or not where.startswith(_state["view_dir"] + os.sep):
        raise OSError(errno.EPROTO, "safehub: the parent's answer names no file of the call's view")
    return path


def _link(served: str, dst: str) -> None:
    """``dst`` becomes a link to the served file, as torch.hub's move would make it the file."""
    tmp = f"{dst}.safehub-link"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.symlink(served, tmp)
    except OSError as exc:
        raise OSError(exc.errno, f"safehub: cannot place the downloaded file at {dst}: {exc.strerror} "
                                 "(the worker writes only in its scratch folder)") from None
    os.replace(tmp, dst)


# -- urllib and requests -----------------------------------------------------------------------


def fetch(url: str, method: str = "GET") -> tuple[dict[str, Any], bytes]:
    """The parent's answer to a GET or HEAD: (status, url and headers; body). Every client's shim uses it."""
    value, _, fds = _ask("get", {"url": str(url), "method": method})
    try:
        with os.fdopen(os.dup(fds[0]), "rb") as body_file:
            body = body_file.read()
    finally:
        for fd in fds:
            os.close(fd)
    return value, body


class _Response(io.BytesIO):
    """Enough of http.client.HTTPResponse for code that reads a GET's body and headers."""

    def __init__(self, value: dict[str, Any], body: bytes) -> None:
        super().__init__(body)
        import email.message

        self.status = self.code = int(value.get("status", 200))
        self.reason = ""
        self.url = str(value.get("url", ""))
        self.headers = self.msg = email.message.Message()
        for key, item in (value.get("headers") or {}).items():
            self.headers[str(key)] = str(item)

    def getcode(self) -> int:
        return self.status

    def geturl(self) -> str:
        return self.url

    def info(self) -> Any:
        return self.headers

    def getheader(self, name: str, default: Any = None) -> Any:
        return self.headers.get(name, default)

    def getheaders(self) -> list[tuple[str, str]]:
        return list(self.headers.items())


def _urlopen(url: Any, data: Any = None, timeout: Any = None, *args: Any, **kwargs: Any) -> _Response:
    import urllib.error
    import urllib.request

    method = url.get_method() if isinstance(url, urllib.request.Request) else ("POST" if data is not None else "GET")
    full_url = url.full_url if isinstance(url, urllib.request.Request) else str(url)
    if method != "GET":
        raise urllib.error.URLError(f"safehub: only GETs go through the parent, not urllib {method} {full_url}; {NO_NETWORK}")
    return _Response(*fetch(full_url))


def _urlretrieve(url: str, filename: str | None = None, reporthook: Any = None, data: Any = None) -> tuple[str, Any]:
    if filename is None or data is not None:
        # No destination (a temporary file) or a POST: the body comes through _urlopen's rules.
        with _urlopen(url, data) as response:
            import tempfile

            fd, filename = tempfile.mkstemp()
            with os.fdopen(fd, "wb") as out:
                out.write(response.read())
            return filename, response.headers
    _fetch_to(str(url), os.path.abspath(filename), None, False)
    return filename, {}


def _no_network(self: socket.socket, address: Any) -> Any:
    if self.family == socket.AF_UNIX:
        return _REAL_CONNECT(self, address)  # seccomp decides; the message of a refusal stays the kernel's
    raise PermissionError(errno.EACCES, f"safehub: no connection to {address!r}: {NO_NETWORK}")


_REAL_CONNECT = socket.socket.connect
_REAL_SOCKET_INIT = socket.socket.__init__


def _socket_named(self: socket.socket, *args: Any, **kwargs: Any) -> None:
    """A socket seccomp refuses (UDP, raw, a new AF_UNIX one) fails with a message, not a bare EPERM."""
    try:
        _REAL_SOCKET_INIT(self, *args, **kwargs)
    except PermissionError as exc:
        raise PermissionError(exc.errno, f"safehub: no socket of this kind ({args[:2]!r}) in the sandbox: {NO_NETWORK}") from None


def _patch_subprocess() -> None:
    """A program the repository starts (curl, wget, git) fails with a message, not a bare EPERM."""
    import subprocess

    real = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def execute_child(self: Any, args: Any, executable: Any, *rest: Any, **kwargs: Any) -> Any:
        try:
            return real(self, args, executable, *rest, **kwargs)
        except (PermissionError, OSError) as exc:
            if exc.errno not in (errno.EPERM, errno.EACCES):
                raise
            shown = args if isinstance(args, (str, bytes)) else " ".join(map(str, args))
            raise PermissionError(exc.errno, f"safehub: the sandbox starts no programs ({str(shown)[:200]}): downloads go "
                                             "through torch.hub, huggingface_hub, requests, httpx or urllib, which the parent "
                                             "serves; a repository that must run programs needs isolate=False") from None

    subprocess.Popen._execute_child = execute_child  # type: ignore[attr-defined]


def _patch_urllib(request: Any) -> None:
    request.urlopen = _urlopen
    request.urlretrieve = _urlretrieve


def _patches() -> dict[str, Callable[[Any], None]]:
    from . import hf_hub, http_clients

    return {"urllib.request": _patch_urllib, "torch.hub": _patch_torch_hub, "requests": http_clients.patch_requests,
            "httpx": http_clients.patch_httpx, "httpx2": http_clients.patch_httpx,
            "huggingface_hub.file_download": hf_hub.patch_file_download,
            "huggingface_hub._snapshot_download": hf_hub.patch_snapshot_download}


# Patched when imported (urllib.request and torch.hub cost milliseconds a worker may not need).
_PATCHES: dict[str, Callable[[Any], None]] = {}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patch torch.hub and requests the moment they are imported (the worker imports neither itself)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, _PATCHES[fullname])
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, patch: Callable[[Any], None]) -> None:
        self.loader = loader
        self.patch = patch

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.patch(module)

