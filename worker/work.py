"""P2 of a call: the work process. It confines itself, then holds the call's conversation.

It reads the CALL (``protocol.py``), applies the sandbox (``sandbox/confine.py``) before any
repository code runs, imports hubconf.py from a clean ``sys.path``, lists, documents or calls one
entrypoint, and ends the conversation with one RESULT or ERROR. Meanwhile the repository's code
may need something only the parent can give (a fetch, issue 10's broker): :class:`Channel` asks
for it with ASK and waits for the ANSWER or REFUSE.

Input: CALL {"action": "list"|"help"|"load", "model": str|null, "returns": "object"|"weights"|"remote"}
(``returns`` matters to a load only); for "load", one buffer: pickle of (args, kwargs). The
parent is trusted, so this side unpickles it.

Output: exactly one final frame
    RESULT {"action": "list", "entrypoints": [str, ...]}
    RESULT {"action": "help", "doc": str|null}
    RESULT {"action": "load", "returns": "object"|"weights", "transport": "memfd"|"inline",
            "sizes": [int, ...]}
           with the result in the layout described in ``safehub/_results.py`` (safetensors
           shards): one sealed memfd per size (SCM_RIGHTS; shards are written in parallel) or,
           where memfds fail, one buffer. A weights result holds tensors only (``weights.py``);
           an object result holds each torch storage's bytes and the cloudpickle of the
           object's structure (repository modules pickled by value), whose tensors refer to
           those storages (``objects.py``).
    RESULT {"action": "load", "returns": "remote", "methods": [str, ...], "class": str}: the model
           stays here and the conversation goes on with the parent's calls on it (``remote.py``).
    ERROR  {"error": category, "type": str, "message": str, "traceback": str, ...} where category
           is hubconf_missing, hubconf_unreadable (the sandbox cannot read it), missing_dependencies
           (+"missing"), entrypoint_not_found (+"model"),
           exception (the repository's code raised; +"phase": import|arguments|call),
           bad_result (the result cannot be sent as asked), or sandbox (+"layer": a required
           layer is unavailable).
    Each carries "sandbox": {"applied": [...], "missing": {layer: reason}}, and with the scratch
    tmpfs "scratch": {"size": bytes, "free": bytes} after the work, so the parent can say it filled.
    The parent maps each category to its error in one table (``safehub/_run/conversation.py``).
    stdout and stderr are the repository's own; the parent relays them, marked, with control
    characters made visible, and capped.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from typing import Any, Callable, NamedTuple, NoReturn

from . import failures, hubconf, protocol, repo_view, shims
from .failures import error as _error, exception as _exception, format_traceback as _format_traceback
from .layout import DTYPE_NAMES, OBJECT_METADATA, WEIGHTS_METADATA
from .protocol import EXIT_MEMORY, EXIT_OK, EXIT_SOFTWARE, WorkerSettings
from .sandbox import confine

_MAX_DOC = 1024 * 1024
# The call's arguments are the parent's (trusted) pickle; an answer is small, or fds.
_CALL_LIMITS = protocol.Limits(max_buffers=1, max_buffer_bytes=1 << 40, max_total_bytes=1 << 40)
_ANSWER_LIMITS = protocol.Limits(max_buffers=4, max_buffer_bytes=1 << 30, max_total_bytes=1 << 30, max_fds=4)


def preload() -> None:
    """For the zygote: import everything a work process needs, so its forks start with it.

    torch is imported and never used: no op may run before a fork.
    """
    from . import hf_hub, http_clients, objects, remote, weights  # noqa: F401 - imported late by _encode and shims
    from .sandbox import seccomp
    import pickle, select, socket, traceback  # noqa: E401, F401 - what _work imports late

    import cloudpickle  # noqa: F401
    import torch  # noqa: F401

    _python_roots()
    seccomp.preload()
    # torch's import left a finder per folder it looked in; each work process drops them
    # (_clean_sys_path), and freeing them there would copy every page they sit on: drop them once.
    sys.path_importer_cache.clear()


class Call(NamedTuple):
    """What the work process needs of its call: the settings, and the channel to the parent."""

    settings: WorkerSettings
    channel_fd: int


def run_work_process(take: Callable[[confine.Prepared], Call], prepared: confine.Prepared) -> NoReturn:
    """Be the work process: take the call, confine this process, hold the conversation, exit with its code.

    ``take`` gives the call (a spare worker waits for it there); ``prepared``: the layers the
    supervisor applied before it forked this process.
    """
    code = EXIT_SOFTWARE
    try:
        call = take(prepared)
        code = _work(call.channel_fd, call.settings, prepared)
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        # Outside the repository's code there is no channel to say why: the exit code says it,
        # so the caller hears of the sandbox's memory limit, not of a safehub failure.
        if failures.limit_behind(exc) == "memory_limit":
            code = EXIT_MEMORY
    finally:
        _flush()
        # _exit: no atexit handlers or lingering threads of the repository can delay the end.
        os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def channel_spin(settings: WorkerSettings) -> float:
    """How long the call's channel looks for a frame before it sleeps (``protocol.SPIN_S``): not
    at all under a CPU time limit, whose budget a remote model's looks between calls would spend."""
    return protocol.SPIN_S if settings.cpu_time is None else 0.0


def _work(channel_fd: int, settings: WorkerSettings, prepared: confine.Prepared) -> int:
    import socket

    global _channel
    sock = protocol.Wire(socket.socket(fileno=channel_fd), spin=channel_spin(settings))  # the call's frames, both ways
    deadline = time.monotonic() + settings.timeout
    try:
        call = protocol.check_message(sock.receive(deadline=deadline, limits=_CALL_LIMITS), (protocol.CALL,))
    except protocol.FrameError as exc:
        print(f"safehub worker: no call: {exc}", file=sys.stderr)
        return EXIT_SOFTWARE

    from . import weights  # noqa: F401 - before Landlock

    confine.enter_call_cgroup(prepared, settings)
    report = confine.apply_sandbox(settings, keep_fds=(0, 1, 2, channel_fd), prepared=prepared)
    missing = [layer for layer in settings.require if layer not in report.applied]
    if missing:
        reasons = "; ".join(f"{name}: {report.missing.get(name, 'not available')}" for name in missing)
        reply = _error("sandbox", f"required sandbox layer(s) unavailable: {reasons}", layer=missing[0])
    else:
        # A private, writable view of the repository (repo_view.py): the cache stays read-only.
        view = repo_view.writable_view(settings.repo_dir, settings.scratch_dir)
        if view:
            failures.SHOWN_AS[view] = settings.repo_dir
        _clean_sys_path(view or settings.repo_dir)
        _channel = Channel(sock, deadline)
        repo_dirs = [view, settings.repo_dir] if view else [settings.repo_dir]
        if settings.view_dir:
            # From here on, what the repository fetches is asked of the parent (shims.py).
            repo_dirs.append(os.path.join(settings.view_dir, "repos"))
            shims.install(ask=_channel.ask, refused=Refused, repo_dirs=list(repo_dirs), view_dir=settings.view_dir, network=settings.network,
                          scratch_dir=settings.scratch_dir)
        reply = _answer(call.fields, call.buffers, repo_dirs)
    kind, fields, buffers, fds = reply
    fields["sandbox"] = report.as_fields()
    if "scratch_limit" in report.applied:
        fields["sandbox"]["scratch"] = _scratch_use(settings.scratch_dir)
    _flush()  # before the answer: the parent relays what was written, then may return at once
    try:
        sock.send_and_close(kind, fields, buffers, fds, deadline=deadline)
    except (protocol.FrameError, OSError) as exc:
        print(f"safehub worker: could not send the answer: {exc}", file=sys.stderr)
        return EXIT_SOFTWARE
    # returns="remote": the model stays here, and the parent's calls on it follow (remote.py).
    remote = sys.modules.get(f"{__package__}.remote")  # imported only when a load asked for returns="remote"
    return remote.serve(sock, settings, _channel) if remote is not None and remote.holding() and _channel is not None else EXIT_OK


class Refused(Exception):
    """The parent refused what the worker asked for; the message is the parent's reason."""


class Channel:
    """The worker's end of the call's conversation: ask the parent for something, wait for the answer.

    One question at a time (a lock serializes threads of the repository); the answer must carry
    the question's id. The parent may also end the call instead of answering: the worker is then
    killed, so a question never outlives its call.
    """

    def __init__(self, sock: protocol.Wire, deadline: float) -> None:
        import threading

        self.sock = sock  # the call's channel (its Wire: the socket is ``sock.sock``)
        self.deadline = deadline
        self.lock = threading.Lock()
        self.next_id = 1

    def ask(self, what: str, args: dict[str, Any]) -> tuple[Any, list[protocol.Received], list[int]]:
        """(the answer's value, its buffers, its fds: the caller owns them), or raise Refused."""
        with self.lock:
            ask_id, self.next_id = self.next_id, self.next_id + 1
            self.sock.send(protocol.ASK, {"id": ask_id, "what": what, "args": args}, deadline=self.deadline)
            frame = self.sock.receive(deadline=self.deadline, limits=_ANSWER_LIMITS)
        try:
            protocol.check_message(frame, (protocol.ANSWER, protocol.REFUSE))
            if frame.fields["id"] != ask_id:
                raise protocol.FrameError(f"an answer to question {frame.fields['id']} where {ask_id} was asked")
        except protocol.FrameError:
            frame.close_fds()
            raise
        if frame.kind == protocol.REFUSE:
            raise Refused(frame.fields["reason"])
        return frame.fields["value"], frame.buffers, frame.fds


_channel: Channel | None = None


def channel() -> Channel:
    """The running call's channel (the fetch shims ask through it)."""
    if _channel is None:
        raise RuntimeError("no call is running in this process")
    return _channel


Reply = tuple[str, dict[str, Any], list[bytes], list[int]]


def _scratch_use(scratch_dir: str) -> dict[str, int]:
    """The scratch tmpfs's size and what is left of it, for the parent to report a full one."""
    try:
        st = os.statvfs(scratch_dir)
    except OSError:
        return {}
    return {"size": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}


def _answer(request: dict[str, Any], buffers: list[protocol.Received], repo_dirs: list[str]) -> Reply:
    repo_dir = repo_dirs[0]
    action, model, returns = request.get("action"), request.get("model"), request.get("returns")
    # Only modules imported from here on can be the repository's: looking at just those spares a
    # forked worker the copy of every page it shares with the zygote that walking them all costs.
    preloaded = set(sys.modules) if returns == "object" else set()
    try:
        module = hubconf.import_hubconf(repo_dir)
    except hubconf.HubconfUnreadable as exc:
        return _error("hubconf_unreadable", str(exc))
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
        return _error("entrypoint_not_found", str(exc), model=str(model), suggestions=[str(s) for s in exc.suggestions])
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
        return _encode(value, returns, repo_dirs, preloaded)
    except BaseException as exc:
        message = str(exc) if type(exc).__name__ in ("NotWeights", "NotOneModel") else f"the result cannot be sent: {type(exc).__name__}: {exc}"
        return _error("bad_result", message, type=type(exc).__name__, traceback=_format_traceback(exc))


def _encode(value: Any, returns: Any, repo_dirs: list[str], preloaded: set[str]) -> Reply:
    from . import weights
    fields: dict[str, Any] = {"action": "load", "returns": returns}
    if returns == "remote":
        from . import remote

        return _result({**fields, **remote.hold(value)})
    if returns == "weights":
        parts, metadata = weights.weights_parts(weights.collect_tensors(value)), WEIGHTS_METADATA
    elif returns == "object":
        import cloudpickle

        from . import objects

        _register_repo_modules(cloudpickle, repo_dirs, [m for n, m in list(sys.modules.items()) if n not in preloaded])
        # The structure is pickled; every storage's bytes travel beside it, never through pickle.
        parts, metadata = objects.dumps(value, DTYPE_NAMES), OBJECT_METADATA
    else:
        raise ValueError(f"unknown returns={returns!r}")
    transport, buffers, fds = weights.encode_shards(parts, metadata)
    return _result({**fields, **transport}, buffers=buffers, fds=fds)


def _register_repo_modules(cloudpickle: Any, repo_dirs: list[str], modules: list[Any]) -> None:
    """Pickle every one of ``modules`` loaded from the repositories (nested ones too) by value, so
    the parent never imports them."""
    prefixes = tuple(os.path.realpath(d) + os.sep for d in repo_dirs)
    real_folders: dict[str, str] = {}  # one realpath per folder: torch alone brings a thousand modules

    def in_repo(place: Any) -> bool:
        if not isinstance(place, str):
            return False
        folder, name = os.path.split(place)
        if folder not in real_folders:
            real_folders[folder] = os.path.realpath(folder)
        return os.path.join(real_folders[folder], name).startswith(prefixes)

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
