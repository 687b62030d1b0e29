"""Sandbox settings for an isolated call, and the environment a worker may see.

What is enforced today: the wall-clock ``timeout`` (the whole process tree is killed), the
environment allow-list (``env``), a private scratch folder for cwd, HOME and TMPDIR, every file
descriptor but the result channel and stdio closed, and caps on the worker's output. Every other
limit (``memory_limit``, ``cpu_time``, ``max_processes``, ``max_open_files``, ``max_file_size``,
``network``, ``extra_read_paths``) is validated and recorded, travels to the worker in its
settings, and is enforced from the sandbox layers on (namespaces, Landlock, seccomp, rlimits);
until then ``require`` names only the layers that exist.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidArgumentError, SandboxError

# Every layer a Sandbox can ask for, by name (DESIGN 5; the names of safehub/_worker/layers.py),
# and those applied today: "session" by the worker (confine.py), "env_scrub" by the parent.
KNOWN_LAYERS = ("session", "namespaces", "bubblewrap", "landlock", "seccomp", "rlimits", "uid_drop", "env_scrub")
ACTIVE_LAYERS = ("session", "env_scrub")

# Environment variables a worker inherits: locale, time zone, search path and thread counts.
ALLOWED_ENV = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
ALLOWED_ENV_PREFIXES = ("LC_",)
# Never handed to a worker, even when named in Sandbox(env=...): DESIGN 1 keeps it for the API host.
FORBIDDEN_ENV = ("GITHUB_TOKEN",)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_GIB = 1024**3


@dataclass(frozen=True, kw_only=True)
class Sandbox:
    """Limits for an isolated call (``isolate=Sandbox(...)``).

    Args:
        timeout: wall-clock seconds for the whole call; past it every process of the worker is
            killed and :class:`~safehub.errors.WorkerTimeoutError` is raised. Enforced.
        memory_limit: bytes of address space for the worker, or None. Enforced from the sandbox
            layers on.
        cpu_time: CPU seconds, or None. Enforced from the sandbox layers on.
        max_processes: processes and threads the worker may run. Enforced from the sandbox layers on.
        max_open_files: file descriptors. Enforced from the sandbox layers on.
        max_file_size: bytes of any file the worker writes, or None. Enforced from the sandbox
            layers on.
        network: allow network access. Refused from the sandbox layers on; until then the worker
            has the parent's network.
        extra_read_paths: more folders the worker may read. Enforced from the sandbox layers on.
        env: names of extra environment variables to pass through (the allow-list is
            :data:`ALLOWED_ENV`). Enforced. ``GITHUB_TOKEN`` is never passed.
        require: layer names (:data:`KNOWN_LAYERS`) that must be active; a call fails with
            :class:`~safehub.errors.SandboxError` rather than run with fewer.

    Example::

        safehub.load("owner/repo", "model", isolate=safehub.Sandbox(timeout=60), returns="weights")
    """

    timeout: float = 300.0
    memory_limit: int | None = 8 * _GIB
    cpu_time: float | None = None
    max_processes: int = 64
    max_open_files: int = 256
    max_file_size: int | None = None
    network: bool = False
    extra_read_paths: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    require: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _positive_number("timeout", self.timeout)
        _positive_number("cpu_time", self.cpu_time, optional=True)
        _positive_int("memory_limit", self.memory_limit, optional=True, minimum=64 * 1024**2)
        _positive_int("max_processes", self.max_processes)
        # Python itself needs a handful of descriptors before the repository opens any.
        _positive_int("max_open_files", self.max_open_files, minimum=16)
        _positive_int("max_file_size", self.max_file_size, optional=True)
        if type(self.network) is not bool:
            raise InvalidArgumentError(f"Sandbox(network=...) must be True or False, not {self.network!r}")
        object.__setattr__(self, "extra_read_paths", _read_paths(self.extra_read_paths))
        object.__setattr__(self, "env", _env_names(self.env))
        object.__setattr__(self, "require", _layers(self.require))

    def to_settings(self) -> dict[str, Any]:
        """The JSON-able settings the worker receives (and the sandbox layers will read)."""
        settings = asdict(self)
        for name in ("extra_read_paths", "env", "require"):
            settings[name] = list(settings[name])
        return settings


def missing_layers(sandbox: Sandbox, active: tuple[str, ...] = ACTIVE_LAYERS) -> list[str]:
    """Required layers this build cannot apply."""
    return [name for name in sandbox.require if name not in active]


def check_required(sandbox: Sandbox) -> None:
    """Raise SandboxError when a required layer is unavailable, before any worker starts."""
    missing = missing_layers(sandbox)
    if missing:
        raise SandboxError(
            f"Sandbox(require=...) asks for {', '.join(missing)}, which this safehub cannot apply "
            f"(active: {', '.join(ACTIVE_LAYERS)})",
            layer=missing[0],
        )


def worker_environ(sandbox: Sandbox, scratch_dir: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's whole environment: the allow-list of ``environ`` plus HOME and TMPDIR in scratch.

    Nothing else crosses: tokens, keys, AWS_*, proxies and LD_* stay in the parent.
    """
    source = os.environ if environ is None else environ
    allowed = set(ALLOWED_ENV) | set(sandbox.env)
    env = {
        name: value
        for name, value in source.items()
        if (name in allowed or name.startswith(ALLOWED_ENV_PREFIXES)) and name not in FORBIDDEN_ENV
    }
    env["HOME"] = env["TMPDIR"] = scratch_dir
    return env


def _positive_number(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"Sandbox({name}=...) must be a positive number of seconds, not {value!r}")


def _positive_int(name: str, value: Any, optional: bool = False, minimum: int = 1) -> None:
    if value is None and optional:
        return
    if type(value) is not int or value < minimum:
        raise InvalidArgumentError(f"Sandbox({name}=...) must be an int of at least {minimum}, not {value!r}")


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, frozenset, set)):
        raise InvalidArgumentError(f"Sandbox({name}=...) must be a tuple, not {value!r}")
    return tuple(value)


def _read_paths(value: Any) -> tuple[str, ...]:
    paths = []
    for item in _as_tuple("extra_read_paths", value):
        if not isinstance(item, (str, os.PathLike)) or not os.path.isabs(os.fspath(item)):
            raise InvalidArgumentError(f"Sandbox(extra_read_paths=...) holds {item!r}, not an absolute path")
        paths.append(os.path.normpath(os.fspath(item)))
    return tuple(paths)


def _env_names(value: Any) -> tuple[str, ...]:
    names = _as_tuple("env", value)
    for name in names:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise InvalidArgumentError(f"Sandbox(env=...) holds {name!r}, not an environment variable name")
        if name in FORBIDDEN_ENV:
            raise InvalidArgumentError(f"Sandbox(env=...) may not pass {name} to a worker")
    return names


def _layers(value: Any) -> tuple[str, ...]:
    names = _as_tuple("require", value)
    for name in names:
        if name not in KNOWN_LAYERS:
            raise InvalidArgumentError(f"Sandbox(require=...) holds {name!r}; layers are {', '.join(KNOWN_LAYERS)}")
    return names
