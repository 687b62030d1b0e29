"""huggingface_hub in the sandbox: ``hf_hub_download`` and ``snapshot_download`` asked of the parent.

Installed by ``shims.py`` when ``huggingface_hub.file_download`` and
``huggingface_hub._snapshot_download`` are imported, before anything can bind the functions:
``from huggingface_hub import hf_hub_download`` (timm, transformers) and huggingface_hub's own
modules (``HfApi.hf_hub_download``, the model mixins) all get these. The two public functions are
the seam because their signatures hold across huggingface_hub's releases, while its HTTP layer
does not (requests, then httpx, then httpx2).

The parent fetches into the user's Hugging Face cache (``safehub/_egress/hf.py``) and answers with the
file's path in the call's read-only view, laid out as a Hugging Face cache
(``$HF_HUB_CACHE/models--org--name/snapshots/<commit>/<path>``), so the worker's own
huggingface_hub finds the files too (``try_to_load_from_cache``, ``local_files_only=True``). A file
the Hub or the cache lacks raises huggingface_hub's own error (``EntryNotFoundError``, ...), so a
repository's fallbacks (timm: safetensors first, then the .bin) behave as they do outside.

Accepted and honoured: ``subfolder``, ``repo_type``, ``revision``, ``local_files_only``,
``force_download``, ``endpoint``, ``allow_patterns``/``ignore_patterns``, ``local_dir`` (the file is
linked there). ``cache_dir`` is accepted, and the file stays in the user's cache (the sandbox
decides nothing about where the parent writes); ``token`` is ignored (the parent uses the user's).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from . import shims

_ERRORS = {  # the parent's kind -> huggingface_hub's exception classes, newest name first
    "entry_not_found": ("RemoteEntryNotFoundError", "EntryNotFoundError"),
    "revision_not_found": ("RevisionNotFoundError",),
    "repository_not_found": ("RepositoryNotFoundError",),
    "gated": ("GatedRepoError", "RepositoryNotFoundError"),
    "local_entry_not_found": ("LocalEntryNotFoundError",),
    "http": ("HfHubHTTPError",),
}
_STATUS = {"entry_not_found": 404, "revision_not_found": 404, "repository_not_found": 401, "gated": 403}


def hf_hub_download(repo_id: str, filename: str, *, subfolder: str | None = None, repo_type: str | None = None,
                    revision: Any = None, cache_dir: Any = None, local_dir: Any = None, force_download: bool = False,
                    local_files_only: bool = False, endpoint: str | None = None, **_ignored: Any) -> str:
    """huggingface_hub's ``hf_hub_download``, fetched by safehub's parent (see the module docstring)."""
    value = _ask("hf_file", {"repo_id": repo_id, "filename": filename, "subfolder": subfolder, "repo_type": repo_type,
                             "revision": _revision(revision), "local_files_only": bool(local_files_only),
                             "force_download": bool(force_download), "endpoint": endpoint})
    path = shims.served_path(value)
    if local_dir is None:
        return path
    target = os.path.join(os.fspath(local_dir), *(f"{subfolder}/{filename}" if subfolder else filename).split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shims.link(path, target)
    return target


def snapshot_download(repo_id: str, *, repo_type: str | None = None, revision: Any = None, cache_dir: Any = None,
                      local_dir: Any = None, local_files_only: bool = False, force_download: bool = False,
                      allow_patterns: Any = None, ignore_patterns: Any = None, endpoint: str | None = None,
                      **_ignored: Any) -> str:
    """huggingface_hub's ``snapshot_download``, fetched by safehub's parent (see the module docstring)."""
    value = _ask("hf_snapshot", {"repo_id": repo_id, "repo_type": repo_type, "revision": _revision(revision),
                                 "local_files_only": bool(local_files_only), "force_download": bool(force_download),
                                 "allow_patterns": _patterns(allow_patterns), "ignore_patterns": _patterns(ignore_patterns),
                                 "endpoint": endpoint})
    folder = shims.served_path(value)
    if local_dir is None:
        return folder
    for top, _, names in os.walk(folder):
        for name in names:
            target = os.path.join(os.fspath(local_dir), os.path.relpath(os.path.join(top, name), folder))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shims.link(os.path.join(top, name), target)
    return os.fspath(local_dir)


def patch_file_download(module: Any) -> None:
    module.hf_hub_download = hf_hub_download


def patch_snapshot_download(module: Any) -> None:
    module.snapshot_download = snapshot_download


def _ask(what: str, args: dict[str, Any]) -> Any:
    value, _, _ = shims.ask(what, args)
    if isinstance(value, dict) and "error" in value:
        raise _hub_error(str(value.get("error")), str(value.get("message", "")))
    return value


def _revision(revision: Any) -> str | None:
    # huggingface_hub 2 passes a ResolvedRevision (its commit in .resolved) where a str was.
    return None if revision is None else str(getattr(revision, "resolved", revision))


def _patterns(patterns: Any) -> list[str] | None:
    if patterns is None:
        return None
    return [str(patterns)] if isinstance(patterns, str) else [str(p) for p in patterns]


def _hub_error(kind: str, message: str) -> BaseException:
    """huggingface_hub's own exception for ``kind``, built whichever release is installed."""
    import importlib

    try:
        hub_errors = importlib.import_module("huggingface_hub.errors")
    except ImportError:  # releases before errors.py kept them in utils
        hub_errors = importlib.import_module("huggingface_hub.utils")
    for name in _ERRORS.get(kind, ("HfHubHTTPError",)):
        cls = getattr(hub_errors, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return _build(cls, message, _STATUS.get(kind, 500))
    return shims.FetchRefused(errno.ENOENT, message)


def _build(cls: type[BaseException], message: str, status: int) -> BaseException:
    make: Any = cls  # constructors differ between releases: an HTTP error takes the response, others not
    for kwargs in ({"response": _Response(status)}, {}):
        try:
            return make(message, **kwargs)
        except TypeError:
            continue
    error = cls.__new__(cls)  # a constructor of another shape: the class and message still hold
    BaseException.__init__(error, message)
    return error


class _Response:
    """What huggingface_hub's HTTP errors read off a response; there was no response here (the parent fetched)."""

    def __init__(self, status: int) -> None:
        self.status_code = status
        self.headers: dict[str, str] = {}
        self.request = None
        self.url = ""
        self.text = ""
        self.content = b""

    def json(self) -> Any:
        return {}
