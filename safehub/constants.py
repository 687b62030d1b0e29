"""Every environment variable safehub reads and every default, in one place.

Environment-backed names are computed on each access (module ``__getattr__``), so a test that
sets a variable with ``monkeypatch.setenv`` takes effect at once and nothing is cached at import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# torch.hub's names and files, kept so caches and trust decisions are shared.
MODULE_HUBCONF = "hubconf.py"
VAR_DEPENDENCY = "dependencies"
TRUSTED_LIST_NAME = "trusted_list"
# torch.hub trusts these owners without asking; see SECURITY.md for why safehub keeps them.
TRUSTED_REPO_OWNERS = ("facebookresearch", "facebookincubator", "pytorch", "fairinternal")

# Defaults.
DEFAULT_GITHUB_URL = "https://github.com"
DEFAULT_GITHUB_API_URL = "https://api.github.com"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
HTTP_TIMEOUT_S = 30.0
READ_CHUNK = 1024 * 1024
USER_AGENT = "safehub"

# Caps on a repository archive (an archive past them is refused, not truncated).
MAX_ARCHIVE_BYTES = 2 * 1024**3
MAX_EXTRACTED_BYTES = 4 * 1024**3
MAX_ARCHIVE_MEMBERS = 100_000

# Pagination: GitHub's own maximum page size, and a ceiling on pages we follow.
API_PAGE_SIZE = 100
API_MAX_PAGES = 100
# How many branches a commit is compared against before it is called a fork commit.
MAX_BRANCHES_COMPARED = 20

# The fetch broker's caps (DESIGN 4b) are safehub._egress.limits.Limits, beside the code.

# safehub's own state inside the hub dir: metadata and locks, hidden from torch.hub.
STATE_DIR_NAME = ".safehub"
LOCK_LOG_EVERY_S = 5.0


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in ("1", "true", "yes", "on")


def _read_token_file() -> str | None:
    path = _env("HF_TOKEN_PATH") or os.path.join(__getattr__("HF_HOME"), "token")
    try:
        with open(os.path.expanduser(path)) as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


_COMPUTED: dict[str, Callable[[], Any]] = {
    "SAFEHUB_GITHUB_URL": lambda: (_env("SAFEHUB_GITHUB_URL") or DEFAULT_GITHUB_URL).rstrip("/"),
    "SAFEHUB_GITHUB_API_URL": lambda: (_env("SAFEHUB_GITHUB_API_URL") or DEFAULT_GITHUB_API_URL).rstrip("/"),
    "SAFEHUB_OFFLINE": lambda: _env_flag("SAFEHUB_OFFLINE"),
    # Isolated calls fork their workers from a warm zygote unless this is 0/false/no/off.
    "SAFEHUB_WARM": lambda: (_env("SAFEHUB_WARM") or "1").strip().lower() not in ("0", "false", "no", "off"),
    # Hosts ("host" or "host:port", comma-separated) the fetch broker may reach even on a
    # loopback or private address: a local mirror, a test server. Validated where it is used.
    "SAFEHUB_ALLOW_HOSTS": lambda: tuple(
        entry.strip() for entry in (_env("SAFEHUB_ALLOW_HOSTS") or "").split(",") if entry.strip()
    ),
    # SAFEHUB_GITHUB_TOKEN wins, so a job can give safehub a token other tools do not see.
    # The per-user folder for what readers of the cache write (views, digest memos); see _cache.runtime_dir.
    "SAFEHUB_RUNTIME_DIR": lambda: _env("SAFEHUB_RUNTIME_DIR"),
    # Read-only hub dirs consulted, in order, before the writable one (colon-separated).
    "SAFEHUB_SHARED_HUB_DIRS": lambda: tuple(
        os.path.abspath(os.path.expanduser(entry)) for entry in (_env("SAFEHUB_SHARED_HUB_DIRS") or "").split(":") if entry.strip()
    ),
    "GITHUB_TOKEN": lambda: _env("SAFEHUB_GITHUB_TOKEN") or _env("GITHUB_TOKEN"),
    # The Hugging Face Hub, read as huggingface_hub reads them, so both share one cache and endpoint.
    "HF_ENDPOINT": lambda: (_env("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/"),
    "HF_HUB_OFFLINE": lambda: _env_flag("HF_HUB_OFFLINE"),
    "HF_HOME": lambda: os.path.expanduser(
        _env("HF_HOME") or os.path.join(_env("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    ),
    "HF_HUB_CACHE": lambda: os.path.expanduser(
        _env("HF_HUB_CACHE") or _env("HUGGINGFACE_HUB_CACHE") or os.path.join(__getattr__("HF_HOME"), "hub")
    ),
    # HF_TOKEN (or the file `hf auth login` writes): sent to HF_ENDPOINT's own host only, never to a worker.
    "HF_TOKEN": lambda: _env("HF_TOKEN") or _env("HUGGING_FACE_HUB_TOKEN") or _read_token_file(),
    "TORCH_HOME": lambda: os.path.expanduser(
        _env("TORCH_HOME") or os.path.join(_env("XDG_CACHE_HOME") or "~/.cache", "torch")
    ),
}


def __getattr__(name: str) -> Any:
    try:
        return _COMPUTED[name]()
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
