"""What each sandbox layer can do on this machine, found cheaply; feeds ``safehub doctor``.

Standard library only. Probes that must *apply* something
(a user namespace) do it in a forked child that exits at once, so the calling process is never
changed.

``probe()`` returns ``{layer: {"available": bool, "detail": str}}`` for the layers of
DESIGN section 5 that the worker applies: session, namespaces, landlock, seccomp, rlimits,
uid_drop, env_scrub. The parent runs it in a fresh worker interpreter (``main.py --probe``) for
``safehub doctor``; the zygote calls it for namespaces. A layer that is not needed here (uid_drop when not running as root) is reported
unavailable with the reason in ``detail``.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from . import landlock, limits, namespaces, seccomp
from .libc import prctl

__all__ = ["LAYERS", "probe"]

# bubblewrap is the parent's to probe (safehub/_bwrap.py): the worker runs inside it, never it.
LAYERS = ("session", "namespaces", "landlock", "seccomp", "rlimits", "uid_drop", "env_scrub")


def _in_child(fn: Callable[[], object], timeout: float = 5.0) -> tuple[bool, str]:
    """Run ``fn()`` in a forked child; (True, "") if it returned, else (False, the error)."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            fn()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported, not handled
            try:
                os.write(w, f"{type(exc).__name__}: {exc}".encode()[:500])
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    try:
        chunks = []
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return ok, b"".join(chunks).decode(errors="replace")


def _linux() -> bool:
    return sys.platform.startswith("linux")


def _probe_session() -> dict[str, Any]:
    if not _linux():
        return {"available": False, "detail": "needs Linux (prctl)"}

    def session() -> None:
        os.setsid()
        for option, arg in ((1, 9), (36, 1)):  # PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER
            prctl(option, arg)

    ok, err = _in_child(session)
    if not ok:
        return {"available": False, "detail": f"session setup failed: {err}"}
    return {
        "available": True,
        "detail": "setsid; a supervisor (child subreaper) that kills the whole tree when the call ends or the parent dies; every fd but the result channel closed",
    }


def _probe_namespaces() -> dict[str, Any]:
    if not _linux():
        return {"available": False, "detail": "needs Linux"}
    ns = namespaces
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            max_ns = int(f.read())
    except (OSError, ValueError):
        max_ns = -1
    if max_ns == 0:
        err = "user.max_user_namespaces is 0"
    else:
        ok, err = _in_child(lambda: ns.enter(user=True, net=True, ipc=True, pid=True, mount=True))
        if ok:
            return {"available": True, "detail": "unprivileged user+net+ipc+pid+mount namespaces work (unshare in a fork)"}
    # ENOSPC (a max_user_namespaces of 0 somewhere up the chain), EPERM or EACCES (Ubuntu 24.04's
    # AppArmor rule, Docker's default seccomp profile, a container runtime): the same meaning.
    restricted = f"user namespaces are disabled or restricted on this machine ({err})"
    if os.geteuid() == 0:
        ok_root, err_root = _in_child(lambda: ns.enter(user=False, net=True, ipc=True, pid=True, mount=True))
        if ok_root:
            return {"available": True, "restricted": True,
                    "detail": f"net+ipc+pid+mount as root only; {restricted}"}
    return {"available": False, "restricted": True, "detail": restricted}


def _probe_landlock() -> dict[str, Any]:
    ll = landlock
    abi = ll.abi_version()
    if abi <= 0:
        return {"available": False, "detail": "Landlock unsupported (kernel < 5.13, not enabled at boot, or not Linux)"}
    parts = ["filesystem"]
    if abi >= 4:
        parts.append("TCP bind/connect")
    if abi >= 6:
        parts.append("signal and abstract-unix scoping")
    missing = []
    if abi < 2:
        missing.append("REFER")
    if abi < 3:
        missing.append("TRUNCATE")
    if abi < 4:
        missing.append("TCP")
    if abi < 5:
        missing.append("IOCTL_DEV")
    if abi < 6:
        missing.append("scopes")
    detail = f"ABI {abi}: " + ", ".join(parts)
    if missing:
        detail += "; not handled: " + ", ".join(missing)
    return {"available": True, "detail": detail}


def _probe_seccomp() -> dict[str, Any]:
    sc = seccomp
    if not sc.supported():
        import platform

        return {"available": False, "detail": f"no syscall table for {platform.machine()} (x86_64, aarch64 only)"}
    mode = sc.current_mode()
    if mode < 0:
        return {"available": False, "detail": "kernel built without seccomp"}
    if not sc.action_available(sc.SECCOMP_RET_ERRNO):
        return {"available": False, "detail": "seccomp filter mode unavailable"}
    kill = "KILL_PROCESS" if sc.action_available(sc.SECCOMP_RET_KILL_PROCESS) else "KILL_THREAD"
    already = " (this process is already filtered)" if mode == 2 else ""
    import platform

    name, number = sc.newest_known()
    return {
        "available": True,
        "detail": f"allow-list filter on {platform.machine()}, {kill}{already}; the newest call it knows is "
        f"{name} ({number}, Linux 6.17), kernel {platform.release()}: any later call is refused (ENOSYS)",
    }


def _probe_rlimits() -> dict[str, Any]:
    try:
        import resource  # noqa: F401
    except ImportError:
        return {"available": False, "detail": "no resource module"}
    # The scratch tmpfs needs a mount namespace: the parent's report adds it where one exists.
    if os.geteuid() == 0:
        return {"available": True, "detail": "AS, CPU, NOFILE, FSIZE, CORE; NPROC binds only after a uid drop (uid 0 is exempt)"}
    return {"available": True, "detail": f"AS, CPU, NPROC (per uid {os.getuid()}, threads count), NOFILE, FSIZE, CORE"}


def _probe_uid_drop(target_uid: int = 65534) -> dict[str, Any]:
    if not _linux():
        return {"available": False, "detail": "needs Linux"}
    if os.geteuid() != 0:
        return {"available": False, "detail": f"not needed: running as uid {os.geteuid()}, RLIMIT_NPROC binds"}
    lim = limits
    ok, err = _in_child(lambda: lim.drop_privileges(target_uid))
    if not ok:
        return {"available": False, "detail": f"drop to {target_uid} failed: {err}"}
    blocked = limits.untraversable_ancestor(sys.base_prefix, target_uid)
    if blocked:
        return {
            "available": True,
            "detail": f"root drops the worker to uid {target_uid}; {blocked}, which that uid cannot traverse, "
            "is covered in a private mount namespace with only the interpreter and repository bound back",
        }
    return {"available": True, "detail": f"root can drop to uid {target_uid}; the interpreter is readable by it"}


def _probe_env_scrub() -> dict[str, Any]:
    return {"available": True, "detail": "allow-listed environment; HOME and TMPDIR in scratch (pure Python)"}


_PROBES = {
    "session": _probe_session,
    "namespaces": _probe_namespaces,
    "landlock": _probe_landlock,
    "seccomp": _probe_seccomp,
    "rlimits": _probe_rlimits,
    "uid_drop": _probe_uid_drop,
    "env_scrub": _probe_env_scrub,
}


def probe(layers: Iterable[str] = LAYERS) -> dict[str, Any]:
    """``{layer: {"available": bool, "detail": str}}`` for the requested layers.

    A probe that fails unexpectedly reports the layer unavailable with the error, never raises.
    """
    out = {}
    for name in layers:
        try:
            out[name] = _PROBES[name]()
        except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not crash
            out[name] = {"available": False, "detail": f"probe failed: {type(exc).__name__}: {exc}"}
    return out
