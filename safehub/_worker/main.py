"""The isolated worker's entry script. Standalone: standard library, torch and cloudpickle only.

safehub's parent side (``safehub/_launcher.py``) starts it as a fresh interpreter for one call
(cold)::

    python -I -B main.py --channel-fd FD --repo-dir DIR --parent-pid PID --settings JSON

or once per process as the warm path's zygote (``zygote.py``, which documents that mode; each
call's supervisor it forks runs ``supervise`` below, and everything from there on is shared)::

    python -I -B main.py --zygote --control-fd FD --parent-pid PID

It imports nothing of safehub's parent side: its sibling files (``hubconf.py``, ``confine.py``,
``weights.py``, ``objects.py``, ``zygote.py``) and ``../_protocol.py`` are loaded by path under
private ``_safehub_*`` names, and its own folder is never on ``sys.path``.

argv
    --channel-fd   an inherited AF_UNIX stream socket: the only channel to the parent
    --repo-dir     the repository folder holding hubconf.py; it goes first on sys.path
    --parent-pid   the parent's pid; a worker whose parent is already gone exits at once
    --settings     JSON: ``Sandbox.to_settings()`` plus ``repo_dir``, ``scratch_dir`` and
                   ``applied_by_parent`` (layer names the parent applied, e.g. "environment")

Environment
    Only the parent's allow-list. HOME, TMPDIR and the working directory are a private scratch
    folder (mode 0700) that the parent made and deletes after the call; where the sandbox can,
    a tmpfs of ``max_scratch_size`` covers it in the worker's mount namespace (``confine.py``).

Input (the channel, ``_protocol.py`` frames)
    One REQUEST: {"action": "list"|"help"|"load", "model": str|null, "returns": "object"|"weights"};
    for "load", one buffer: pickle of (args, kwargs). The parent is trusted, so this side
    unpickles it.

Output (the channel): exactly one frame
    RESULT {"action": "list", "entrypoints": [str, ...]}
    RESULT {"action": "help", "doc": str|null}
    RESULT {"action": "load", "returns": "object"|"weights", "transport": "memfd"|"inline",
            "sizes": [int, ...]}
           with the result in the layout described in ``safehub/_results.py`` (safetensors
           shards): one sealed memfd per size (SCM_RIGHTS; shards are written in parallel) or,
           where memfds fail, one buffer. A weights result holds tensors only
           (``weights.py``); an object result holds each torch storage's bytes and the
           cloudpickle of the object's structure (repository modules pickled by value), whose
           tensors refer to those storages (``objects.py``).
    ERROR  {"error": category, "type": str, "message": str, "traceback": str, ...} where category
           is hubconf_missing, missing_dependencies (+"missing"), entrypoint_not_found (+"model"),
           exception (the repository's code raised; +"phase": import|arguments|call),
           bad_result (the result cannot be sent as asked), or sandbox (+"layer": a required
           layer is unavailable).
    Every reply's "sandbox" field: the layers applied and missing, and with the scratch tmpfs
    "scratch": {"size": bytes, "free": bytes} after the work, so the parent can say it filled.
    stdout and stderr are the repository's own; the parent relays them, marked, with control
    characters made visible, and capped.

Processes
    The started process (P1) is a small supervisor: it watches the parent through a pidfd and
    kills the whole tree if the parent dies (where pidfds are missing it has a parent-death
    signal instead), it is the child subreaper, every descriptor but stdio and the channel
    closed, no core dumps; it forks the work process (P2), which applies the sandbox hook
    (``confine.apply_sandbox``) before any repository code runs. When P2 ends, for any reason,
    P1 kills every remaining descendant (they re-parent to it) until none is left, then mirrors
    P2's fate. A cold P1 never imports torch; a warm one is a fork of the zygote, which has.

Exit status (P1 exits with P2's code, or dies of P2's signal, re-raised with core dumps off)
    0    an answer (RESULT or ERROR) was sent
    64   bad command line
    70   the worker failed outside the repository's code (the channel broke, an internal error)
    71   the supervisor failed (prctl, fork), or the parent was already gone
    else the repository's code ended the process (os._exit(3) gives 3, a segfault SIGSEGV)
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import os
import signal
import sys
import time
from types import ModuleType
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_USAGE = 64
EXIT_SOFTWARE = 70
EXIT_SUPERVISOR = 71

_HERE = os.path.dirname(os.path.abspath(__file__))
_PROTOCOL_PATH = os.path.join(os.path.dirname(_HERE), "_protocol.py")
_ARGS = ("--channel-fd", "--repo-dir", "--parent-pid", "--settings")
_MAX_MESSAGE = 64 * 1024
_MAX_TRACEBACK = 256 * 1024
_MAX_DOC = 1024 * 1024

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


# ---------------------------------------------------------------------------------------------
# P1: the supervisor (cheap: no torch, no protocol)
# ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> NoReturn:
    if argv[:1] == ["--zygote"]:
        zygote = _load_sibling("_safehub_zygote", os.path.join(_HERE, "zygote.py"))
        zygote.main(argv[1:], sys.modules[__name__])
    try:
        opts = _parse_args(argv)
        settings = json.loads(opts["--settings"])
        channel_fd, parent_pid = int(opts["--channel-fd"]), int(opts["--parent-pid"])
    except (ValueError, KeyError) as exc:
        print(f"safehub worker: bad command line: {exc}", file=sys.stderr)
        os._exit(EXIT_USAGE)
    try:
        # The supervisor outlives its parent just long enough to kill the tree: a pidfd tells it
        # the parent is gone. Where pidfds are missing (Linux < 5.3) it dies with the parent.
        # Parent pid 0: bubblewrap stands between, and its --die-with-parent takes the tree down.
        parent_fd = _watch_parent(parent_pid) if parent_pid else None
        if parent_pid and os.getppid() != parent_pid:
            os._exit(EXIT_SUPERVISOR)  # it died before the watch took hold
    except OSError as exc:
        print(f"safehub worker: supervisor failed: {exc}", file=sys.stderr)
        os._exit(EXIT_SUPERVISOR)
    supervise(channel_fd, parent_fd, opts["--repo-dir"], settings)


def supervise(channel_fd: int, parent_fd: int | None, repo_dir: str, settings: dict[str, Any]) -> NoReturn:
    """Be P1 of one call: fork the work process, wait for it, kill what it left, mirror its end.

    A cold worker calls this from ``main``; on the warm path each supervisor the zygote forks
    calls it once its session, stdio, working folder and environment are the call's.
    ``parent_fd`` is a pidfd of the caller (None: bubblewrap or a death signal watches it).
    """
    try:
        confine = _load_sibling("_safehub_confine", os.path.join(_HERE, "confine.py"))
        if parent_fd is not None and _readable(parent_fd):
            os._exit(EXIT_SUPERVISOR)  # the caller is already gone: nobody waits for an answer
        # Orphans of the work process re-parent here, where they can be found and killed.
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        confine.close_other_fds((0, 1, 2, channel_fd) + ((parent_fd,) if parent_fd is not None else ()))
        confine.no_core_dumps()
        supervisor = os.getpid()
        worker = os.fork()
    except OSError as exc:
        print(f"safehub worker: supervisor failed: {exc}", file=sys.stderr)
        os._exit(EXIT_SUPERVISOR)
    if worker == 0:
        _run_work_process(supervisor, channel_fd, repo_dir, settings, confine)
    os.close(channel_fd)  # only the work process speaks; the parent sees EOF once it is gone
    status = _wait_for(worker, parent_fd)
    _kill_descendants()
    if status is None:
        os._exit(EXIT_SUPERVISOR)  # the parent died: nobody waits for an answer
    _mirror(status)


def _readable(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _parse_args(argv: list[str]) -> dict[str, str]:
    if len(argv) != 2 * len(_ARGS):
        raise ValueError(f"expected {' '.join(a + ' VALUE' for a in _ARGS)}")
    opts = dict(zip(argv[::2], argv[1::2]))
    if sorted(opts) != sorted(_ARGS):
        raise ValueError(f"expected the options {', '.join(_ARGS)}")
    return opts


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _watch_parent(parent_pid: int) -> int | None:
    try:
        return os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        return None


def _wait_for(worker: int, parent_fd: int | None) -> int | None:
    """The work process's wait status, or None once the parent is gone (the tree must die)."""
    if parent_fd is None:
        while True:
            pid, status = os.waitpid(-1, 0)  # also reaps orphans that re-parented here meanwhile
            if pid == worker:
                return status
    import select

    worker_fd = os.pidfd_open(worker)
    poller = select.poll()
    poller.register(parent_fd, select.POLLIN)
    poller.register(worker_fd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll(1000)}
        while True:  # reap orphans that re-parented here and ended, and perhaps the worker
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == worker:
                return status
            if pid == 0:
                break
        if parent_fd in ready:
            return None


def _kill_descendants() -> None:
    """SIGKILL every process below this one until none is left (they re-parent here)."""
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return  # no child at all: any live descendant would have re-parented here as one
    me = os.getpid()
    while True:
        pids = _descendants(me)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            reaped, _ = os.waitpid(-1, 0 if pids else os.WNOHANG)
            while reaped:
                reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            if not pids:
                return
            continue
        if not pids:
            time.sleep(0.001)  # a child forked after the scan: look again


def _descendants(root: int) -> list[int]:
    # /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN, so read every stat instead.
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            # The command name may hold spaces and ')'; the fields after the last ')' are fixed.
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _mirror(status: int) -> NoReturn:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is not to terminate
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else EXIT_SUPERVISOR)


def _load_sibling(name: str, path: str) -> ModuleType:
    """Load one of the worker's own files by path, under a private name (once: the zygote preloads them)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# The warm path: what the zygote imports once, before it forks
# ---------------------------------------------------------------------------------------------


def preload() -> ModuleType:
    """For the zygote: import everything a work process needs, so its forks start with it.

    torch is imported and never used: no op may run before a fork. Returns the protocol module,
    which the zygote speaks too.
    """
    confine = _load_sibling("_safehub_confine", os.path.join(_HERE, "confine.py"))
    for layer in ("namespaces", "landlock", "limits", "seccomp"):
        confine._layer(layer)
    _load_sibling("_safehub_hubconf", os.path.join(_HERE, "hubconf.py"))
    _load_sibling("_safehub_weights", os.path.join(_HERE, "weights.py"))
    _load_sibling("_safehub_objects", os.path.join(_HERE, "objects.py"))
    import pickle, select, socket, traceback  # noqa: E401, F401 - what _work imports late

    import cloudpickle  # noqa: F401
    import torch  # noqa: F401

    _python_roots()
    # torch's import left a finder per folder it looked in; each work process drops them
    # (_clean_sys_path), and freeing them there would copy every page they sit on: drop them once.
    sys.path_importer_cache.clear()

    return _load_sibling("_safehub_protocol", _PROTOCOL_PATH)


# ---------------------------------------------------------------------------------------------
# P2: the work process
# ---------------------------------------------------------------------------------------------


def _run_work_process(supervisor: int, channel_fd: int, repo_dir: str, settings: dict[str, Any], confine: ModuleType) -> NoReturn:
    code = EXIT_SOFTWARE
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the supervisor dies -> so does the work
        if os.getppid() != supervisor:
            os._exit(EXIT_SUPERVISOR)
        code = _work(channel_fd, repo_dir, settings, confine)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        # _exit: no atexit handlers or lingering threads of the repository can delay the end.
        os._exit(code)


def _work(channel_fd: int, repo_dir: str, settings: dict[str, Any], confine: ModuleType) -> int:
    import socket

    protocol = _load_sibling("_safehub_protocol", _PROTOCOL_PATH)
    hubconf = _load_sibling("_safehub_hubconf", os.path.join(_HERE, "hubconf.py"))
    sock = socket.socket(fileno=channel_fd)
    deadline = time.monotonic() + float(settings.get("timeout", 300))
    limits = protocol.Limits(max_buffers=1, max_buffer_bytes=1 << 40, max_total_bytes=1 << 40)
    try:
        request = protocol.recv_frame(sock, deadline=deadline, limits=limits)
    except protocol.FrameError as exc:
        print(f"safehub worker: no request: {exc}", file=sys.stderr)
        return EXIT_SOFTWARE
    if request.kind != protocol.REQUEST:
        print(f"safehub worker: expected a request, got {request.kind!r}", file=sys.stderr)
        return EXIT_SOFTWARE

    _load_sibling("_safehub_weights", os.path.join(_HERE, "weights.py"))  # before Landlock
    report = confine.apply_sandbox(settings, keep_fds=(0, 1, 2, channel_fd))
    missing = [layer for layer in settings.get("require", ()) if layer not in report.applied]
    if missing:
        reasons = "; ".join(f"{name}: {report.missing.get(name, 'not available')}" for name in missing)
        reply = _error("sandbox", f"required sandbox layer(s) unavailable: {reasons}", layer=missing[0])
    else:
        _clean_sys_path(repo_dir)
        reply = _answer(request.fields, request.buffers, repo_dir, hubconf)
    kind, fields, buffers, fds = reply
    fields["sandbox"] = report.as_fields()
    if "scratch_limit" in report.applied:
        fields["sandbox"]["scratch"] = _scratch_use(settings["scratch_dir"])
    try:
        protocol.send_frame(sock, kind, fields, buffers, fds)
    except (protocol.FrameError, OSError) as exc:
        print(f"safehub worker: could not send the answer: {exc}", file=sys.stderr)
        return EXIT_SOFTWARE
    finally:
        for fd in fds:
            os.close(fd)
    return EXIT_OK


Reply = tuple[str, dict[str, Any], list[bytes], list[int]]


def _scratch_use(scratch_dir: str) -> dict[str, int]:
    """The scratch tmpfs's size and what is left of it, for the parent to report a full one."""
    try:
        st = os.statvfs(scratch_dir)
    except OSError:
        return {}
    return {"size": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}


def _answer(request: dict[str, Any], buffers: list[bytes], repo_dir: str, hubconf: ModuleType) -> Reply:
    action, model, returns = request.get("action"), request.get("model"), request.get("returns")
    # Only modules imported from here on can be the repository's: looking at just those spares a
    # forked worker the copy of every page it shares with the zygote that walking them all costs.
    preloaded = set(sys.modules) if returns == "object" else set()
    try:
        module = hubconf.import_hubconf(repo_dir)
    except hubconf.HubconfMissing as exc:
        return _error("hubconf_missing", str(exc))
    except BaseException as exc:
        return _exception("import", exc)
    try:
        if action == "list":
            return _result({"action": "list", "entrypoints": [str(n) for n in hubconf.list_entrypoints(module)]})
        entry = hubconf.get_entrypoint(module, model)
    except hubconf.MissingDependencies as exc:
        return _error("missing_dependencies", str(exc), missing=[str(m) for m in exc.missing])
    except hubconf.EntrypointNotFound as exc:
        return _error("entrypoint_not_found", str(exc), model=str(model))
    except BaseException as exc:
        return _exception("import", exc)
    if action == "help":
        doc = entry.__doc__
        doc = doc if doc is None or isinstance(doc, str) else str(doc)
        return _result({"action": "help", "doc": doc[:_MAX_DOC] if doc else doc})
    try:
        import pickle

        args, kwargs = pickle.loads(buffers[0]) if buffers else ((), {})
    except BaseException as exc:
        return _exception("arguments", exc)
    try:
        value = entry(*args, **kwargs)
    except BaseException as exc:
        return _exception("call", exc)
    try:
        return _encode(value, returns, repo_dir, preloaded)
    except BaseException as exc:
        message = str(exc) if type(exc).__name__ == "NotWeights" else f"the result cannot be sent: {type(exc).__name__}: {exc}"
        return _error("bad_result", message, type=type(exc).__name__, traceback=_format_traceback(exc))


def _encode(value: Any, returns: Any, repo_dir: str, preloaded: set[str]) -> Reply:
    weights = sys.modules["_safehub_weights"]
    fields: dict[str, Any] = {"action": "load", "returns": returns}
    if returns == "weights":
        parts, metadata = weights.weights_parts(weights.collect_tensors(value)), weights.WEIGHTS_METADATA
    elif returns == "object":
        import cloudpickle

        objects = sys.modules.get("_safehub_objects") or _load_sibling("_safehub_objects", os.path.join(_HERE, "objects.py"))
        _register_repo_modules(cloudpickle, repo_dir, [m for n, m in list(sys.modules.items()) if n not in preloaded])
        # The structure is pickled; every storage's bytes travel beside it, never through pickle.
        parts, metadata = objects.dumps(value, weights.DTYPE_NAMES), objects.OBJECT_METADATA
    else:
        raise ValueError(f"unknown returns={returns!r}")
    try:
        shards = weights.parts_to_memfds(parts, metadata)
    except OSError:  # no memfd here (or a sandbox forbids it): send the bytes inline, as one shard
        payload = weights.parts_to_bytes(parts, metadata)
        return _result({**fields, "transport": "inline", "sizes": [len(payload)]}, buffers=[payload])
    return _result({**fields, "transport": "memfd", "sizes": [size for _, size in shards]}, fds=[fd for fd, _ in shards])


def _register_repo_modules(cloudpickle: ModuleType, repo_dir: str, modules: list[Any]) -> None:
    """Pickle every one of ``modules`` loaded from the repository by value, so the parent never imports it."""
    prefix = os.path.realpath(repo_dir) + os.sep
    real_folders: dict[str, str] = {}  # one realpath per folder: torch alone brings a thousand modules

    def in_repo(place: Any) -> bool:
        if not isinstance(place, str):
            return False
        folder, name = os.path.split(place)
        if folder not in real_folders:
            real_folders[folder] = os.path.realpath(folder)
        return os.path.join(real_folders[folder], name).startswith(prefix)

    for module in modules:
        try:
            places = [getattr(module, "__file__", None), *(getattr(module, "__path__", None) or ())]
            if any(in_repo(p) for p in places):
                cloudpickle.register_pickle_by_value(module)
        except Exception:
            continue  # an alias under another name (its own entry registers it) or an odd module


def _clean_sys_path(repo_dir: str) -> None:
    """sys.path = the repository, then only standard library and site-packages entries."""
    roots, stdlib_zip = _python_roots()

    def allowed(entry: Any) -> bool:
        if not isinstance(entry, str) or not entry:
            return False  # '' is the working directory
        real = os.path.realpath(entry)
        return real == stdlib_zip or any(real == r or real.startswith(r + os.sep) for r in roots)

    # Anything else (the caller's cwd, a checkout, other repositories) could shadow a module.
    sys.path[:] = [repo_dir] + [entry for entry in sys.path if allowed(entry) and entry != repo_dir]
    # An editable install of safehub maps the package back to its source tree through a finder.
    sys.meta_path[:] = [f for f in sys.meta_path if not _module_name(f).startswith("__editable__")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not _module_name(h).startswith("__editable__")]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()


@functools.lru_cache(maxsize=1)
def _python_roots() -> tuple[frozenset[str], str]:
    """(the standard library and site-packages folders, the stdlib zip), as real paths.

    Cached: sysconfig takes milliseconds, and the zygote computes it once for all its forks.
    """
    import site
    import sysconfig

    roots = set(site.getsitepackages())
    for base, platbase in ((sys.prefix, sys.exec_prefix), (sys.base_prefix, sys.base_exec_prefix)):
        paths = sysconfig.get_paths(vars={"base": base, "platbase": platbase, "installed_base": base, "installed_platbase": platbase})
        roots.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    stdlib_zip = os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}{sys.version_info[1]}.zip")
    return frozenset(os.path.realpath(r) for r in roots), os.path.realpath(stdlib_zip)


def _module_name(obj: Any) -> str:
    name = getattr(obj, "__module__", None) or type(obj).__module__
    return name if isinstance(name, str) else ""


def _result(fields: dict[str, Any], buffers: list[bytes] | None = None, fds: list[int] | None = None) -> Reply:
    return ("result", fields, buffers or [], fds or [])


def _error(category: str, message: str, **facts: Any) -> Reply:
    fields = {"error": category, "type": facts.pop("type", ""), "message": _cap(message, _MAX_MESSAGE)}
    fields["traceback"] = _cap(facts.pop("traceback", ""), _MAX_TRACEBACK, keep_tail=True)
    fields.update(facts)
    return ("error", fields, [], [])


def _exception(phase: str, exc: BaseException) -> Reply:
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type(exc).__name__}>"
    return _error("exception", message, type=type(exc).__name__, traceback=_format_traceback(exc), phase=phase)


def _format_traceback(exc: BaseException) -> str:
    """The traceback as text, starting at the repository's frames (the worker's own are noise)."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _is_worker_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        return f"<traceback unavailable for {type(exc).__name__}>"


def _is_worker_frame(filename: str) -> bool:
    return filename.startswith(_HERE + os.sep) or filename.startswith("<frozen importlib")


def _cap(text: Any, limit: int, keep_tail: bool = False) -> str:
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return text
    return "[...]\n" + text[-limit:] if keep_tail else text[:limit] + "[...]"


if __name__ == "__main__":
    main(sys.argv[1:])
