"""Sandbox settings for an isolated call, and the environment a worker may see.

A ``Sandbox`` is plain data: it is validated here, becomes the worker's typed settings
(``worker_settings``: ``safehub._worker.protocol.WorkerSettings``), and the worker applies them
(``worker/sandbox/confine.py``). The parent applies its own share: the environment allow-list
(``worker_environ``), the private scratch folder, the wall-clock timeout and the whole-tree kill
(``safehub/_run/``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._worker import ENTRY_SCRIPT
from ._worker.protocol import WorkerSettings
from .errors import InvalidArgumentError

# Every layer by name (DESIGN 5; the names of worker/sandbox/probe.py, and bubblewrap). The first two are
# always on; the others are applied wherever the machine allows, unless Sandbox(layers=...)
# narrows them (to measure or test a degraded machine).
ALWAYS_ON_LAYERS = ("session", "env_scrub")
OPTIONAL_LAYERS = ("namespaces", "bubblewrap", "landlock", "seccomp", "rlimits", "uid_drop")
KNOWN_LAYERS = ALWAYS_ON_LAYERS + OPTIONAL_LAYERS

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
    # The user's non-secret Hugging Face Hub settings: a mirror or test endpoint, offline mode.
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
)
ALLOWED_ENV_PREFIXES = ("LC_",)
# Never handed to a worker, even when named in Sandbox(env=...): DESIGN 1 keeps it for the API host.
FORBIDDEN_ENV = ("GITHUB_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_GIB = 1024**3


@dataclass(frozen=True, kw_only=True)
class Sandbox:
    """Limits for an isolated call (``isolate=Sandbox(...)``).

    Args:
        timeout: wall-clock seconds for the whole call; past it every process of the worker is
            killed and :class:`~safehub.errors.WorkerTimeoutError` is raised. Enforced. For a
            remote model (``returns="remote"``), the load and each call on it have this long.
        idle_timeout: a remote model only: seconds its worker may wait between calls; past it
            the worker is ended, and later calls raise :class:`~safehub.errors.RemoteClosedError`.
            None (default): no limit. Enforced.
        lifetime: a remote model only: seconds its worker may live, calls included, from the
            load on; past it the worker is ended (a running call raises
            :class:`~safehub.errors.RemoteClosedError`). None (default): no limit. Enforced.
        memory_limit: bytes of memory for everything the sandbox holds (its processes,
            memfds, scratch tmpfs, pipes), or None for no bound; also each process's address
            space. A memory cgroup per worker where the caller may make one (root, or a
            delegated cgroup); else the limit is split and the worker held to one address
            space (no fork, no memfds; SECURITY.md). ``safehub doctor`` says which. Enforced
            from the sandbox layers on.
        cpu_time: CPU seconds, or None. Enforced from the sandbox layers on.
        max_processes: processes and threads the worker may run at once (``RLIMIT_NPROC``
            counts every thread). The default fits the machine: 64 plus two per CPU (see
            ``Sandbox().max_processes``), room for torch's intra-op and inter-op pools, a thread
            per core each, and still a bound on a fork bomb. A value too small for torch's
            default pools makes the worker lower torch's thread counts to fit, unless
            ``OMP_NUM_THREADS`` is passed. Counted in the worker's own user namespace, so other
            processes of its uid do not count; where it has none, on top of what its uid runs
            when it starts. Enforced from the sandbox layers on.
        max_open_files: file descriptors. Enforced from the sandbox layers on.
        max_file_size: bytes of any file the worker writes, or None. Enforced from the sandbox
            layers on.
        max_scratch_size: bytes the worker may write in all, or None for no bound. Its scratch
            folder (HOME, TMPDIR and working folder, the only place it may write) is a tmpfs of
            this size in the worker's private mount namespace: past it writes fail with ENOSPC,
            the call says so, and nothing the worker writes reaches the disk. The pages are
            memory, counted within ``memory_limit`` (without a memory cgroup the tmpfs gets at
            most a quarter of it), freed when the call ends. The default is 4 GiB, or a quarter
            of the machine's memory if less. Where no
            mount namespace can be made (no user namespaces, not root) it bounds each file
            only, and the call warns. Enforced from the sandbox layers on.
        network: allow network access. Refused from the sandbox layers on; until then the worker
            has the parent's network.
        extra_read_paths: more folders the worker may read. Enforced from the sandbox layers on.
        env: names of extra environment variables to pass through (the allow-list is
            :data:`ALLOWED_ENV`). Enforced. ``GITHUB_TOKEN`` is never passed.
        require: layer names (:data:`KNOWN_LAYERS`) that must be active; a call fails with
            :class:`~safehub.errors.SandboxError` rather than run with fewer.
        fetch: let the parent fetch URLs the repository's code asks for (DESIGN 4b); False
            refuses every fetch.
        allow_hosts: ``host`` or ``host:port`` entries the parent may fetch from although they
            resolve to a loopback or private address (a local mirror); added to
            ``SAFEHUB_ALLOW_HOSTS``. Everything else must resolve to public addresses only.
        layers: None (default) applies every layer this machine offers. A tuple of
            :data:`OPTIONAL_LAYERS` applies only those (the always-on layers stay): for
            testing and measuring a degraded machine, e.g. ``layers=("landlock", "seccomp",
            "rlimits", "uid_drop")`` for a machine without user namespaces.

    Example::

        safehub.load("owner/repo", "model", isolate=safehub.Sandbox(timeout=60), returns="weights")
    """

    timeout: float = 300.0
    idle_timeout: float | None = None
    lifetime: float | None = None
    memory_limit: int | None = 8 * _GIB
    cpu_time: float | None = None
    max_processes: int = field(default_factory=lambda: default_max_processes())
    max_open_files: int = 256
    max_file_size: int | None = None
    max_scratch_size: int | None = field(default_factory=lambda: default_max_scratch_size())
    network: bool = False
    extra_read_paths: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    layers: tuple[str, ...] | None = None
    fetch: bool = True
    allow_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _positive_number("timeout", self.timeout)
        _positive_number("idle_timeout", self.idle_timeout, optional=True)
        _positive_number("lifetime", self.lifetime, optional=True)
        _positive_number("cpu_time", self.cpu_time, optional=True)
        _positive_int("memory_limit", self.memory_limit, optional=True, minimum=64 * 1024**2)
        _positive_int("max_processes", self.max_processes)
        # Python itself needs a handful of descriptors before the repository opens any.
        _positive_int("max_open_files", self.max_open_files, minimum=16)
        _positive_int("max_file_size", self.max_file_size, optional=True)
        # A worker writes a little itself (Python's caches are off, but a repository's HOME is there).
        _positive_int("max_scratch_size", self.max_scratch_size, optional=True, minimum=1024**2)
        if type(self.network) is not bool:
            raise InvalidArgumentError(f"Sandbox(network=...) must be True or False, not {self.network!r}")
        if type(self.fetch) is not bool:
            raise InvalidArgumentError(f"Sandbox(fetch=...) must be True or False, not {self.fetch!r}")
        from ._egress.policy import normalize_allow_hosts  # here: `import safehub` stays quick

        allow_hosts = _as_tuple("allow_hosts", self.allow_hosts)
        object.__setattr__(self, "allow_hosts", normalize_allow_hosts(allow_hosts, source="Sandbox(allow_hosts=...)"))
        object.__setattr__(self, "extra_read_paths", _read_paths(self.extra_read_paths))
        object.__setattr__(self, "env", _env_names(self.env))
        object.__setattr__(self, "require", _layers("require", self.require, KNOWN_LAYERS))
        if self.layers is not None:
            object.__setattr__(self, "layers", _layers("layers", self.layers, OPTIONAL_LAYERS))
            off = [name for name in self.require if name not in self.layers + ALWAYS_ON_LAYERS]
            if off:
                raise InvalidArgumentError(
                    f"Sandbox(require=...) asks for {', '.join(off)}, which Sandbox(layers=...) switches off"
                )

    def wanted_layers(self) -> tuple[str, ...]:
        """The layers to apply where available (always-on ones included)."""
        return ALWAYS_ON_LAYERS + (OPTIONAL_LAYERS if self.layers is None else self.layers)

    def worker_settings(self, repo_dir: str, scratch_dir: str) -> WorkerSettings:
        """What the worker is told: these limits and layers, its folders, and what the parent applies itself."""
        return WorkerSettings(
            repo_dir=repo_dir,
            scratch_dir=scratch_dir,
            timeout=float(self.timeout),
            layers=self.wanted_layers(),
            require=self.require,
            applied_by_parent=("env_scrub",),
            memory_limit=self.memory_limit,
            cpu_time=None if self.cpu_time is None else float(self.cpu_time),
            max_processes=self.max_processes,
            max_open_files=self.max_open_files,
            max_file_size=self.max_file_size,
            max_scratch_size=self.max_scratch_size,
            network=self.network,
            extra_read_paths=self.extra_read_paths,
        )


def default_max_processes(cpus: int | None = None) -> int:
    """``Sandbox().max_processes`` on a machine with ``cpus`` CPUs (default: this one's).

    64, plus two per CPU: torch starts one intra-op thread per core and, when asked for
    inter-op parallelism, one more per core; ``RLIMIT_NPROC`` counts every thread. The 64 are
    for the rest: the worker's own processes, Python threads, data-loader workers.
    """
    if cpus is None:
        cpus = os.cpu_count() or 1
        with contextlib.suppress(AttributeError, OSError):
            cpus = max(cpus, len(os.sched_getaffinity(0)))
    return 64 + 2 * max(1, int(cpus))


def default_max_scratch_size(memory: int | None = None) -> int:
    """``Sandbox().max_scratch_size`` on a machine with ``memory`` bytes of RAM (default: this one's).

    4 GiB (a large checkpoint, or an archive unpacked), but never more than a quarter of the
    machine's memory, since the scratch tmpfs lives in memory: 256 MiB at least.
    """
    if memory is None:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = 16 * _GIB
    return max(256 * 1024**2, min(4 * _GIB, int(memory) // 4))


def sandbox_report(sandbox: Sandbox | None = None) -> dict[str, dict[str, Any]]:
    """Which sandbox layers an isolated call gets on this machine, and why the others are missing.

    Returns ``{layer: {"active": bool, "available": bool, "detail": str}}`` for every layer of
    :data:`KNOWN_LAYERS`: ``available`` says what the machine offers, ``active`` whether a call
    with ``sandbox`` (default ``Sandbox()``) gets it. ``safehub doctor`` prints the same.

    Example::

        missing = [name for name, layer in safehub.sandbox_report().items() if not layer["active"]]
    """
    from . import _bwrap

    wanted = (sandbox or Sandbox()).wanted_layers()
    report: dict[str, dict[str, Any]] = {}
    found_layers = _probe_worker_layers()
    found_layers["bubblewrap"] = _bwrap.probe()
    for name in KNOWN_LAYERS:
        found = found_layers.get(name, {"available": False, "detail": "not probed"})
        available = bool(found.get("available"))
        active = available and name in wanted
        if name == "bubblewrap":
            active = active and "namespaces" in wanted
        if name == "namespaces" and not available and "bubblewrap" in wanted:
            active = bool(report.get("bubblewrap", {}).get("active"))
        report[name] = {"active": active, "available": available, "detail": str(found.get("detail", ""))}
        if found.get("restricted"):
            report[name]["restricted"] = True
    # The scratch folder is a sized tmpfs only inside a mount namespace; elsewhere it is a plain
    # folder, and RLIMIT_FSIZE bounds each file to max_scratch_size (worker/sandbox/confine.py).
    if "rlimits" in report:
        mounts = report.get("namespaces", {}).get("active") or report.get("bubblewrap", {}).get("active")
        report["rlimits"]["detail"] += ("; scratch a sized tmpfs in the worker's mount namespace" if mounts else
                                        "; scratch a plain folder (no mount namespace here): each file is "
                                        "bounded to max_scratch_size, not their total")
    return report


def _probe_worker_layers() -> dict[str, dict[str, Any]]:
    """The worker's own probe (``worker/sandbox/probe.py``), run in a fresh worker interpreter.

    A subprocess rather than an import: the parent imports no sandbox code, and the probe's
    throwaway children fork from a small, single-threaded interpreter.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-B", ENTRY_SCRIPT, "--probe"], capture_output=True, timeout=60, env=worker_environ(Sandbox(), "/nonexistent")
        )
        found = json.loads(done.stdout) if done.returncode == 0 else None
        why = f"exit code {done.returncode}: {done.stderr.decode(errors='replace').strip()[-300:]}"
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        found, why = None, str(exc)
    if not isinstance(found, dict):
        return {name: {"available": False, "detail": f"the worker's probe failed ({why})"} for name in KNOWN_LAYERS}
    return found


def worker_environ(
    sandbox: Sandbox, scratch_dir: str, environ: Mapping[str, str] | None = None, *, torch_home: str | None = None
) -> dict[str, str]:
    """The worker's whole environment: the allow-list of ``environ`` plus HOME and TMPDIR in scratch,
    and TORCH_HOME on the call's view of the cache (where torch.hub looks for what it fetched),
    with HF_HOME and HF_HUB_CACHE on the view's Hugging Face cache (no token file there).

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
    if torch_home is not None:
        env["TORCH_HOME"] = torch_home
        env["HF_HOME"] = os.path.join(torch_home, "huggingface")
        env["HF_HUB_CACHE"] = os.path.join(torch_home, "huggingface", "hub")
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


def _layers(what: str, value: Any, known: tuple[str, ...]) -> tuple[str, ...]:
    names = _as_tuple(what, value)
    for name in names:
        if name not in known:
            raise InvalidArgumentError(f"Sandbox({what}=...) holds {name!r}; layers are {', '.join(known)}")
    return names
