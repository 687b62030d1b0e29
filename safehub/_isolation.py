"""Run a repository's hubconf.py in a worker process and bring the answer back (DESIGN 4).

This is the parent's half: it starts a worker (``_launcher``: forked by the warm zygote, or
``safehub/_worker/main.py`` in a fresh interpreter), sends one request, reads one reply under
the sandbox's deadline, and always leaves nothing behind: the whole process tree is killed and
the scratch folder removed, in a ``finally``. Every byte from
the worker is hostile: frames are checked by ``_protocol``, results by ``_results``, and the
protocol's own errors become ``safehub.errors`` here, at one boundary.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psutil

from . import _launcher, _log, _protocol, _terminal
from ._results import decode_object, decode_weights, map_sealed_memfd
from ._sandbox import Sandbox, worker_environ
from .errors import (
    EntrypointNotFoundError,
    HubconfError,
    InvalidArgumentError,
    MissingDependenciesError,
    ProtocolError,
    RemoteError,
    ResultDecodeError,
    SafeHubError,
    SandboxError,
    WorkerCrashedError,
    WorkerError,
    WorkerTimeoutError,
)

ACTIONS = ("list", "help", "load")
RETURNS = ("object", "weights")

OUTPUT_CAP = 1024 * 1024  # bytes relayed to each of the caller's stdout and stderr per call
OUTPUT_PREFIX = "[worker] "
OUTPUT_TRUNCATED = "[worker output truncated]\n"
EXIT_GRACE_S = 2.0  # how long a worker that answered (or hung up) gets to exit by itself
MAX_PAYLOAD_BYTES = 1024**4  # a memfd is mapped lazily: this only bounds the address space
MAX_INLINE_BYTES = 2 * 1024**3  # an inline payload is read into memory
MAX_SHARDS = 8  # memfds with one result (the worker writes one per core, at most 4)
REPLY_LIMITS = _protocol.Limits(
    max_header_bytes=4 * 1024 * 1024,
    max_buffers=1,
    max_buffer_bytes=MAX_INLINE_BYTES,
    max_total_bytes=MAX_INLINE_BYTES,
    max_fds=MAX_SHARDS,
)
_MAX_TEXT = 1024 * 1024
_EXIT_MEANINGS = {
    64: "the worker's command line was refused (a safehub bug)",
    70: "the worker failed outside the repository's code (see its stderr above)",
    71: "the worker's supervisor failed, or saw its parent gone",
}


def run_isolated(
    repo_dir: Path,
    action: str,
    *,
    model: str | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    returns: str = "object",
    sandbox: Sandbox,
) -> Any:
    """Run ``list``, ``help`` or ``load`` for the hubconf.py in ``repo_dir`` in a worker.

    Args:
        repo_dir: the repository folder on disk (holds hubconf.py).
        action: "list" -> list[str] of entrypoints; "help" -> the entrypoint's docstring
            (str or None); "load" -> the entrypoint's result.
        model: the entrypoint name (help and load).
        args, kwargs: passed to the entrypoint (load). Pickled with cloudpickle in the parent.
        returns: "object" -> the result itself, unpickled here (runs the repository's code:
            trusted repositories only); "weights" -> dict[str, torch.Tensor] parsed as data,
            never unpickled.
        sandbox: the limits (``Sandbox``).

    Raises:
        HubconfError, MissingDependenciesError, EntrypointNotFoundError: as torch.hub would.
        RemoteError: the repository's code raised; ``remote_traceback`` holds the traceback.
        WorkerTimeoutError, WorkerCrashedError, ProtocolError, ResultDecodeError, SandboxError.

    Example::

        names = run_isolated(repo_dir, "list", sandbox=Sandbox())
        state = run_isolated(repo_dir, "load", model="resnet18", returns="weights", sandbox=Sandbox())
    """
    repo_dir = _check_call(repo_dir, action, model, returns, sandbox)
    request = {"action": action, "model": model, "returns": returns}
    buffers = [_dump_args(args, kwargs or {})] if action == "load" and (args or kwargs) else []
    with _Worker(repo_dir, sandbox) as worker:
        worker.send(request, buffers)
        frame = worker.receive()
        try:
            worker.finish()  # the whole answer is in: let the worker flush its output and exit
            _report_missing_layers(frame.fields.get("sandbox"))
            if frame.kind == _protocol.RESULT and (full := _scratch_full(frame.fields.get("sandbox"))):
                _log.warning(full)  # the repository went on; an exception it raised says it in its message
            return _interpret(frame, action, model, returns, repo_dir)
        finally:
            frame.close_fds()


_reported: set[tuple[str, str]] = set()


def _report_missing_layers(report: Any) -> None:
    """Warn, once per process and layer, about a layer the machine could not apply."""
    missing = report.get("missing") if isinstance(report, dict) else None
    if not isinstance(missing, dict):
        return
    for name, reason in missing.items():
        if not isinstance(name, str) or not isinstance(reason, str) or "switched off" in reason:
            continue
        if (name, reason) not in _reported:
            _reported.add((name, reason))
            _log.warning(f"sandbox layer {name[:40]} is not active on this machine: {reason[:300]} (see `safehub doctor`)")


def _scratch_full(report: Any) -> str:
    """A note when the worker's scratch tmpfs was full as it answered, else "".

    A write that fails with ENOSPC on a tmpfs leaves it full (a large write is cut short first),
    so less than 1 MiB left is the sign; the worker's figures only ever make a message.
    """
    scratch = report.get("scratch") if isinstance(report, dict) else None
    if not isinstance(scratch, dict):
        return ""
    size, free = scratch.get("size"), scratch.get("free")
    if type(size) is not int or type(free) is not int or size <= 0 or free >= 1024**2:
        return ""
    return (
        f"the worker filled its scratch folder (HOME, TMPDIR, working folder) of {size / 1024**2:.0f} MiB: "
        "writes past it fail with 'No space left on device' (Sandbox(max_scratch_size=...) sets its size)"
    )


def _check_call(repo_dir: Path, action: str, model: str | None, returns: str, sandbox: Sandbox) -> Path:
    if action not in ACTIONS:
        raise InvalidArgumentError(f"action must be one of {ACTIONS}, not {action!r}")
    if returns not in RETURNS:
        raise InvalidArgumentError(f'returns must be "object" or "weights", not {returns!r}')
    if action != "list" and not isinstance(model, str):
        raise InvalidArgumentError("Invalid input: model should be a string of function name")
    if not isinstance(sandbox, Sandbox):
        raise InvalidArgumentError(f"sandbox must be a safehub.Sandbox, not {type(sandbox).__name__}")
    repo_dir = Path(repo_dir).resolve()
    if not (repo_dir / "hubconf.py").is_file():
        # Said here, without starting a worker; the worker checks again (the folder may change).
        raise HubconfError(f"No hubconf.py in {repo_dir}", repo_dir=str(repo_dir))
    return repo_dir


def _dump_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    import cloudpickle

    try:
        # cloudpickle: a lambda or a class from the caller's __main__ goes by value.
        return cloudpickle.dumps((tuple(args), dict(kwargs)), protocol=5)
    except Exception as exc:
        raise InvalidArgumentError(f"the entrypoint's arguments cannot be pickled: {exc}") from exc


class _Worker:
    """One worker process: started on enter; on exit killed with its whole tree, scratch removed."""

    def __init__(self, repo_dir: Path, sandbox: Sandbox) -> None:
        self.repo_dir = repo_dir
        self.sandbox = sandbox
        self.proc: _launcher.WorkerProcess | None = None
        self.sock: socket.socket | None = None
        self.relays: list[_Relay] = []
        self.scratch_dir: Path | None = None
        self.deadline = 0.0

    def __enter__(self) -> _Worker:
        try:
            self._start()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._cleanup()

    def _start(self) -> None:
        # mkdtemp makes it 0700: other local users cannot read or plant files in the scratch.
        # The pid in the name lets a later call remove it if this process is killed first.
        sweep_stale_scratch()
        self.scratch_dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        try:
            settings = {
                **self.sandbox.to_settings(),
                "repo_dir": str(self.repo_dir),
                "scratch_dir": str(self.scratch_dir),
                "applied_by_parent": ["env_scrub"],
            }
            if os.geteuid() == 0 and "uid_drop" in settings["layers"]:
                # The worker drops to this uid before the repository runs: its HOME must be its own.
                os.chown(self.scratch_dir, _launcher.UNPRIVILEGED_UID, _launcher.UNPRIVILEGED_UID)
            environ = worker_environ(self.sandbox, str(self.scratch_dir))
            self.proc, self.sock = _launcher.start_worker(settings, environ, self.scratch_dir)
        except OSError as exc:
            raise WorkerError(f"could not start the worker: {exc}") from exc
        self.deadline = time.monotonic() + self.sandbox.timeout
        self.relays = [_Relay(self.proc.stdout, sys.stdout), _Relay(self.proc.stderr, sys.stderr)]
        for relay in self.relays:
            relay.start()

    def send(self, fields: dict[str, Any], buffers: list[bytes]) -> None:
        assert self.sock is not None
        with self._protocol_errors():
            _protocol.send_frame(self.sock, _protocol.REQUEST, fields, buffers, deadline=self.deadline)

    def receive(self) -> _protocol.Frame:
        assert self.sock is not None
        with self._protocol_errors():
            return _protocol.recv_frame(self.sock, deadline=self.deadline, limits=REPLY_LIMITS)

    @contextlib.contextmanager
    def _protocol_errors(self) -> Iterator[None]:
        """The one place protocol errors become safehub errors."""
        try:
            yield
        except _protocol.FrameTimeout:
            raise WorkerTimeoutError(
                f"the worker ran past its time limit of {self.sandbox.timeout:g} s and was killed",
                timeout=self.sandbox.timeout,
            ) from None
        except _protocol.FrameEOF as exc:
            raise self._hung_up(exc) from None
        except _protocol.FrameError as exc:
            raise ProtocolError(f"the worker's reply breaks the protocol: {exc}") from None

    def _hung_up(self, exc: Exception) -> WorkerError:
        """The channel closed: name how the worker ended, if it ends within the grace period."""
        assert self.proc is not None
        grace = max(0.05, min(EXIT_GRACE_S, self.deadline - time.monotonic()))
        try:
            code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return ProtocolError(f"the worker closed the channel without answering ({exc})")
        if code is None:
            message = "the worker ended before answering; the zygote that forked it did not report its exit status"
            return WorkerCrashedError(message, exit_code=None, signal_name=None)
        return crashed_error(code)

    def finish(self) -> None:
        """After an answer: let the worker exit by itself (its supervisor reaps the tree)."""
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=EXIT_GRACE_S)

    def _cleanup(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None:
            if self.proc.running():  # only a live (unreaped) pid is ours to kill
                kill_process_tree(self.proc.pid)
                with contextlib.suppress(OSError):
                    self.proc.kill()
            self.proc.wait()
        for relay in self.relays:
            relay.join(timeout=EXIT_GRACE_S)
        if self.scratch_dir is not None:
            remove_tree(self.scratch_dir)


def crashed_error(returncode: int) -> WorkerCrashedError:
    """WorkerCrashedError for a Popen returncode (negative: killed by that signal)."""
    if returncode < 0:
        name = _signal_name(-returncode)
        hint = " (out of memory, or killed from outside)" if name == "SIGKILL" else ""
        message = f"the worker died of {name}({returncode}){hint} before answering"
        return WorkerCrashedError(message, exit_code=returncode, signal_name=name)
    meaning = _EXIT_MEANINGS.get(returncode)
    message = f"the worker exited with code {returncode} before answering"
    return WorkerCrashedError(f"{message}: {meaning}" if meaning else message, exit_code=returncode, signal_name=None)


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def kill_process_tree(pid: int) -> None:
    """Stop then kill every descendant of ``pid`` until none is left, then ``pid`` itself."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for _ in range(500):
        try:
            alive = [p for p in root.children(recursive=True) if _is_alive(p)]
        except psutil.NoSuchProcess:
            break
        if not alive:
            break
        for action in ("suspend", "kill"):  # stopped first, so none forks while we go round
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    getattr(proc, action)()
        time.sleep(0.01)
    with contextlib.suppress(psutil.Error):
        root.kill()


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


SCRATCH_PREFIX = "safehub-worker-"


def sweep_stale_scratch() -> None:
    """Remove scratch folders whose caller died before its cleanup ran (killed, power cut)."""
    import re

    top = Path(tempfile.gettempdir())
    mine = {os.geteuid(), _launcher.UNPRIVILEGED_UID} if os.geteuid() == 0 else {os.geteuid()}
    try:
        names = [n for n in os.listdir(top) if n.startswith(SCRATCH_PREFIX)]
    except OSError:
        return
    for name in names:
        match = re.match(re.escape(SCRATCH_PREFIX) + r"(\d+)-", name)
        path = top / name
        try:
            if not match or path.is_symlink() or path.stat().st_uid not in mine:
                continue  # another user's, or not one of ours
        except OSError:
            continue
        if not psutil.pid_exists(int(match.group(1))):
            remove_tree(path)


def remove_tree(path: Path) -> None:
    """Remove the scratch folder, even where the worker took permissions away (never follows links)."""
    for top, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(top, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)


class _Relay(threading.Thread):
    """Copy one of the worker's pipes to the caller's stream, line by line, marked, with control
    characters made visible (``_terminal``), and capped."""

    def __init__(self, pipe: IO[bytes], target: IO[str] | None, cap: int = OUTPUT_CAP) -> None:
        super().__init__(name="safehub-worker-output", daemon=True)
        self.pipe = pipe
        self.target = target
        self.cap = cap

    def run(self) -> None:
        written = 0  # bytes relayed, as the caller's stream gets them (marked, controls made visible)
        state = _terminal.LINE_START
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character split across chunks stays whole
        try:
            while chunk := self.pipe.readline(64 * 1024):
                if self.target is None or written > self.cap:
                    continue  # keep draining, so the worker never blocks on a full pipe
                text, after = _terminal.mark_lines(decoder.decode(chunk), OUTPUT_PREFIX, state)
                size = len(text.encode())
                if written + size > self.cap:
                    written = self.cap + 1
                    self._write(("\n" if state == _terminal.MID_LINE else "") + OUTPUT_TRUNCATED)
                    continue
                written += size
                self._write(text)
                state = after
            if state == _terminal.MID_LINE and written <= self.cap:
                self._write("\n")
        finally:
            self.pipe.close()

    def _write(self, text: str) -> None:
        if self.target is None:
            return
        try:
            self.target.write(text)
            self.target.flush()
        except Exception:
            self.target = None  # the caller's stream went away: drain silently


def _interpret(frame: _protocol.Frame, action: str, model: str | None, returns: str, repo_dir: Path) -> Any:
    """Check the reply against the request and decode it; nothing in it is executed but an object result."""
    if frame.kind == _protocol.ERROR:
        raise _remote_failure(frame.fields, model, repo_dir)
    if frame.kind != _protocol.RESULT:
        raise ProtocolError(f"the worker sent a {frame.kind!r} frame, expected a result")
    fields = frame.fields
    if fields.get("action") != action:
        raise ProtocolError(f"the worker answered {fields.get('action')!r} to a {action!r} request")
    if action in ("list", "help") and (frame.buffers or frame.fds):
        raise ProtocolError(f"the worker's {action} answer carries unexpected data")
    if action == "list":
        names = fields.get("entrypoints")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ProtocolError("the worker's entrypoint list is not a list of str")
        return names
    if action == "help":
        doc = fields.get("doc")
        if doc is not None and not isinstance(doc, str):
            raise ProtocolError("the worker's docstring is not a str")
        return doc
    if fields.get("returns") != returns:
        # E.g. a pickle where weights were asked: refused before a byte of it is looked at.
        raise ProtocolError(f"the worker answered returns={fields.get('returns')!r} to returns={returns!r}")
    # Tensors are views on the private mappings, which live as long as they do: never closed here.
    shards = _payload(frame)
    if returns == "weights":
        return decode_weights(shards)
    return decode_object(shards)


def _payload(frame: _protocol.Frame) -> list[Any]:
    """The result's shards: each memfd checked for its seals and mapped, or the one inline buffer."""
    fields = frame.fields
    sizes, transport = fields.get("sizes"), fields.get("transport")
    if type(sizes) is not list or not 1 <= len(sizes) <= MAX_SHARDS or not all(type(n) is int and n >= 0 for n in sizes):
        raise ProtocolError(f"the worker's result sizes {str(sizes)[:100]} are not 1 to {MAX_SHARDS} counts of bytes")
    if transport == "memfd" and len(frame.fds) == len(sizes) and not frame.buffers:
        if sum(sizes) > MAX_PAYLOAD_BYTES:
            raise ResultDecodeError(f"the worker's result of {sum(sizes)} bytes is more than the cap of {MAX_PAYLOAD_BYTES}")
        shards: list[Any] = []
        try:
            for fd, size in zip(frame.fds, sizes):
                shards.append(map_sealed_memfd(fd, max_bytes=MAX_PAYLOAD_BYTES))
                if len(shards[-1]) != size:
                    raise ResultDecodeError(f"the worker's memfd holds {len(shards[-1])} bytes, not the {size} announced")
        except BaseException:
            for shard in shards:
                shard.close()  # no tensor is on them yet
            raise
        return shards
    if transport == "inline" and len(frame.buffers) == len(sizes) == 1 and not frame.fds:
        if len(frame.buffers[0]) != sizes[0]:
            raise ResultDecodeError(f"the worker's result holds {len(frame.buffers[0])} bytes, not {sizes[0]}")
        return [frame.buffers[0]]
    raise ProtocolError(f"the worker's result transport {str(transport)[:40]!r} does not match what came with it")


def _remote_failure(fields: dict[str, Any], model: str | None, repo_dir: Path) -> SafeHubError:
    category = fields.get("error")
    message, remote_type = _text(fields.get("message")), _text(fields.get("type"))
    remote_traceback = _text(fields.get("traceback"))
    if category == "hubconf_missing":
        return HubconfError(f"No hubconf.py in {repo_dir}", repo_dir=str(repo_dir))
    if category == "missing_dependencies":
        missing = fields.get("missing")
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            return ProtocolError("the worker's list of missing dependencies is not a list of str")
        return MissingDependenciesError(f"Missing dependencies: {', '.join(missing)}", missing=missing)
    if category == "entrypoint_not_found":
        return EntrypointNotFoundError(f"Cannot find callable {model} in hubconf", model=model)
    if category == "exception":
        phase = fields.get("phase")
        where = {
            "import": "hubconf.py raised while being imported",
            "arguments": "the worker could not unpickle the entrypoint's arguments",
            "call": f"the entrypoint {model!r} raised",
        }.get(phase if isinstance(phase, str) else "", "the repository's code raised")
        full = _scratch_full(fields.get("sandbox"))
        return RemoteError(
            f"{where}: {remote_type}: {message}" + (f" ({full})" if full else ""),
            remote_type=remote_type,
            remote_traceback=remote_traceback,
        )
    if category == "bad_result":
        return ResultDecodeError(message, remote_type=remote_type, remote_traceback=remote_traceback)
    if category == "sandbox":
        return SandboxError(message, layer=_text(fields.get("layer")))
    return ProtocolError(f"the worker sent an error of unknown category {category!r}")


def _text(value: Any) -> str:
    return value[:_MAX_TEXT] if isinstance(value, str) else ""
