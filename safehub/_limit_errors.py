"""When a limit of the sandbox, not the repository, made a worker fail: the one place that says so.

The worker names the Sandbox setting behind a failure it sees (``worker/failures.py``: an
allocation refused under ``memory_limit``, a library that could not be mapped, too many open
files, a thread or process refused under ``max_processes``, a full scratch tmpfs, a file past
``max_file_size``); the parent sees the signals (SIGXCPU: ``cpu_time``; SIGXFSZ: ``max_file_size``).
:func:`limit_error` turns either into :class:`~safehub.errors.SandboxLimitError` carrying the
setting and its value as facts, with the Python API's advice in its message
(``Sandbox(memory_limit=...)``); the command line says the same with its options
(``cli/_errors.py``: ``--memory-limit``).
"""

from __future__ import annotations

from typing import Any

from .errors import SandboxLimitError

# setting -> (what it limits, in a sentence; how its value reads)
LIMITS: dict[str, tuple[str, str]] = {
    "memory_limit": ("memory limit", "size"),
    "max_processes": ("limit on processes and threads", "count"),
    "max_open_files": ("limit on open files", "count"),
    "max_scratch_size": ("scratch folder (HOME, TMPDIR, working folder)", "size"),
    "max_file_size": ("limit on the size of a file", "size"),
    "cpu_time": ("CPU time limit", "seconds"),
}
# Signals only a limit sends to a worker.
SIGNAL_LIMITS = {"SIGXCPU": "cpu_time", "SIGXFSZ": "max_file_size"}


def _shown(value: Any, kind: str) -> str:
    if value is None:
        return "none"
    if kind == "size":
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value >= size:
                return f"{value / size:.3g} {unit}"
        return f"{value} bytes"
    return f"{value:g} s" if kind == "seconds" else str(value)


def limit_error(setting: str, sandbox: Any, detail: str, **facts: Any) -> SandboxLimitError:
    """The error for a failure caused by the sandbox's ``setting``; ``detail`` says what failed."""
    what, kind = LIMITS[setting]
    value = getattr(sandbox, setting, None)
    return SandboxLimitError(
        f"the sandbox's {what} of {_shown(value, kind)} was hit: {detail}. This is the sandbox's limit, "
        f"not a fault of the repository: raise it with Sandbox({setting}=...).",
        limit=setting,
        value=value,
        **facts,
    )


def known_limit(name: Any) -> str:
    """``name`` if it is a setting this module can speak of (the worker's word is data), else ""."""
    return name if isinstance(name, str) and name in LIMITS else ""
