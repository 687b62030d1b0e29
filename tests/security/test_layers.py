"""Attack tests for each OS sandbox layer in ``worker/sandbox`` (landlock, seccomp, namespaces,
bubblewrap, limits), loaded by file path exactly as the worker loads them.

Every attack runs in a fresh child interpreter (``python -I -c``) that applies one layer and
then attacks; the test asserts on a canary the child cannot fake: a secret file's content, a
protected file left unchanged, a loopback listener that saw no connection, a victim process
still alive. Where cheap, the child first runs the same attack *before* applying the layer, so
a pass proves the layer is what stopped it.

Resource attacks are bounded so that even with no sandbox at all they cannot hurt a 2-core,
24 GiB machine: allocations of 1 GiB at most, fork loops of at most 40 short-lived children,
busy loops capped by wall-clock time, every child under a subprocess timeout.

A layer the machine cannot provide is skipped with the probe's own reason; nothing else skips.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from safehub import _bwrap
from safehub._worker import grants

WORKER_DIR = Path(__file__).resolve().parents[2] / "worker"
SYSTEM_PYTHON = "/usr/bin/python3.11"
NOBODY = 65534
IS_ROOT = os.geteuid() == 0

pytestmark = pytest.mark.timeout(120)


def _load(name: str):
    """A sandbox layer module of the worker, imported in this process (as ``safehub._worker.sandbox``)."""
    return importlib.import_module(f"safehub._worker.sandbox.{name}")


_PROBE: dict | None = None


def probe() -> dict:
    global _PROBE
    if _PROBE is None:
        _PROBE = {**_load("probe").probe(), "bubblewrap": _bwrap.probe()}
    return _PROBE


def require(layer: str) -> None:
    """Skip, honestly, when the machine cannot provide the layer."""
    info = probe()[layer]
    if not info["available"]:
        pytest.skip(f"{layer} unavailable: {info['detail']}")


# --- running an attack in a child interpreter --------------------------------------------------
PRELUDE = r"""
import ctypes, errno, importlib.util, json, os, socket, sys
WORKER_DIR = sys.argv[1]
ARGS = json.loads(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def load(name):
    # The worker package loaded by path, as worker/main.py loads it; then one sandbox module of it.
    if "_safehub_worker" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "_safehub_worker", os.path.join(WORKER_DIR, "__init__.py"), submodule_search_locations=[WORKER_DIR])
        package = importlib.util.module_from_spec(spec)
        sys.modules["_safehub_worker"] = package
        spec.loader.exec_module(package)
    return importlib.import_module("_safehub_worker." + (name if name == "grants" else "sandbox." + name))

def attempt(fn):
    try:
        value = fn()
    except OSError as exc:
        return {"ok": False, "errno": exc.errno, "error": repr(exc)[:300]}
    except Exception as exc:
        return {"ok": False, "errno": None, "error": repr(exc)[:300]}
    return {"ok": True, "value": repr(value)[:300]}

def sys_call(nr, *args):
    res = libc.syscall(ctypes.c_long(nr), *args)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res

def report(**result):
    sys.stdout.write("\nSAFEHUB-RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
"""


class Child:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.result: dict = {}
        for line in proc.stdout.splitlines():
            if line.startswith("SAFEHUB-RESULT "):
                self.result = json.loads(line[len("SAFEHUB-RESULT "):])

    def __getitem__(self, key):
        assert key in self.result, f"child reported no {key!r}: rc={self.returncode}\n{self.stdout}\n{self.stderr}"
        return self.result[key]

    def __repr__(self) -> str:
        return f"Child(rc={self.returncode}, result={self.result}, stderr={self.stderr[-2000:]!r})"


def run_child(code: str, args: dict | None = None, *, python: str | None = None, timeout: float = 60,
              prefix: list[str] | None = None, user: int | None = None, **kwargs) -> Child:
    """Run PRELUDE + code in ``python -I -c`` (optionally under ``prefix``, e.g. bwrap's argv)."""
    argv = list(prefix or []) + [python or sys.executable, "-I", "-c", PRELUDE + code,
                                 str(WORKER_DIR), json.dumps(args or {})]
    if user is not None:
        kwargs.update(user=user, group=user, extra_groups=[])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    return Child(proc)


def denied(outcome: dict, *errnos: int) -> bool:
    return not outcome["ok"] and (not errnos or outcome["errno"] in errnos)


# --- canaries ------------------------------------------------------------------------------------
@pytest.fixture
def tcp_listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.setblocking(False)
    try:
        yield srv
    finally:
        srv.close()


def connections_seen(srv: socket.socket) -> int:
    seen = 0
    while True:
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            return seen
        conn.close()
        seen += 1


@pytest.fixture
def udp_listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.setblocking(False)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def victim():
    """A process outside the sandbox that the attacker tries to signal or trace."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def shared_tmp():
    """A temporary tree every uid can traverse (tmp_path lives under a 0700 folder)."""
    root = tempfile.mkdtemp(prefix="safehub-sec-", dir="/tmp")
    os.chmod(root, 0o755)
    try:
        yield Path(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


SECRET = "canary-" + uuid.uuid4().hex


@pytest.fixture
def layout(shared_tmp):
    """home/ with a secret, repo/ with a protected file, scratch/ writable by everyone."""
    home = shared_tmp / "home"
    repo = shared_tmp / "repo"
    scratch = shared_tmp / "scratch"
    for d in (home, repo, scratch):
        d.mkdir()
        d.chmod(0o755)
    (home / "secret.txt").write_text(SECRET)
    (home / "secret.txt").chmod(0o644)
    (repo / "hubconf.py").write_text("dependencies = []\n")
    (repo / "hubconf.py").chmod(0o644)
    scratch.chmod(0o777)
    return {"root": shared_tmp, "home": home, "repo": repo, "scratch": scratch}


# --- the probe -----------------------------------------------------------------------------------
def test_probe_reports_every_layer():
    result = probe()
    assert tuple(result) == _load("probe").LAYERS + ("bubblewrap",)  # the worker's layers, then the parent's
    for name, info in result.items():
        assert set(info) == {"available", "detail"}, name
        assert isinstance(info["available"], bool) and isinstance(info["detail"], str) and info["detail"], name
    assert result["landlock"]["available"] == (_load("landlock").abi_version() > 0)


# --- Landlock ------------------------------------------------------------------------------------
LANDLOCK_APPLY = r"""
ll = load("landlock")
read = load("grants").system_read_paths() + load("grants").python_read_paths()
applied = ll.restrict(read, ARGS["write"], allow_tcp=ARGS.get("allow_tcp", False))
"""


def test_landlock_denies_reading_outside_read_paths(layout):
    require("landlock")
    code = r"""
secret = ARGS["secret"]
before = attempt(lambda: open(secret).read())
""" + LANDLOCK_APPLY + r"""
after = attempt(lambda: open(secret).read())
listing = attempt(lambda: os.listdir(os.path.dirname(secret)))
control = attempt(lambda: len(open(os.path.join(os.path.dirname(os.__file__), "os.py")).read()))
import decimal  # a module not loaded before: the interpreter's own tree stays readable
report(before=before, after=after, listing=listing, control=control, applied=applied)
"""
    child = run_child(code, {"secret": str(layout["home"] / "secret.txt"), "write": [str(layout["scratch"])]})
    assert child.returncode == 0, child
    assert child["applied"]["applied"] and child["applied"]["abi"] >= 1
    assert child["before"]["ok"]
    assert denied(child["after"], 13), child
    assert denied(child["listing"], 13), child
    assert child["control"]["ok"], child
    assert SECRET not in json.dumps(child["after"]) + child.stdout.split("SAFEHUB-RESULT")[0]


def test_landlock_denies_writing_outside_scratch(layout):
    require("landlock")
    protected = layout["home"] / "protected.txt"
    protected.write_text("original")
    protected.chmod(0o666)
    code = r"""
home, scratch = ARGS["home"], ARGS["scratch"]
protected = os.path.join(home, "protected.txt")
""" + LANDLOCK_APPLY + r"""
def move_out():
    src = os.path.join(scratch, "moved.txt")
    open(src, "w").write("x")
    os.rename(src, os.path.join(home, "moved.txt"))
report(
    create=attempt(lambda: open(os.path.join(home, "new.txt"), "w").write("pwned")),
    append=attempt(lambda: open(protected, "a").write("pwned")),
    truncate=attempt(lambda: os.truncate(protected, 0)),
    unlink=attempt(lambda: os.unlink(protected)),
    mkdir=attempt(lambda: os.mkdir(os.path.join(home, "d"))),
    symlink=attempt(lambda: os.symlink("/etc/passwd", os.path.join(home, "l"))),
    rename_out=attempt(move_out),
    scratch=attempt(lambda: open(os.path.join(scratch, "ok.txt"), "w").write("fine")),
)
"""
    child = run_child(code, {"home": str(layout["home"]), "scratch": str(layout["scratch"]),
                             "write": [str(layout["scratch"])]})
    assert child.returncode == 0, child
    for attack in ("create", "append", "truncate", "unlink", "mkdir", "symlink"):
        assert denied(child[attack], 13), (attack, child)
    assert denied(child["rename_out"], 13, 18), child  # EACCES or EXDEV
    assert child["scratch"]["ok"], child
    assert protected.read_text() == "original"
    assert sorted(p.name for p in layout["home"].iterdir()) == ["protected.txt", "secret.txt"]
    assert (layout["scratch"] / "ok.txt").read_text() == "fine"


def test_landlock_denies_tcp(layout, tcp_listener):
    require("landlock")
    if _load("landlock").abi_version() < 4:
        pytest.skip("landlock unavailable for TCP: ABI < 4")
    port = tcp_listener.getsockname()[1]
    code = r"""
port = ARGS["port"]
def connect():
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        return "connected"
def bind():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()
before = attempt(bind)
""" + LANDLOCK_APPLY + r"""
report(before=before, connect=attempt(connect), bind=attempt(bind))
"""
    child = run_child(code, {"port": port, "write": [str(layout["scratch"])]})
    assert child.returncode == 0, child
    assert child["before"]["ok"]
    assert denied(child["connect"], 13), child
    assert denied(child["bind"], 13), child
    assert connections_seen(tcp_listener) == 0


def test_landlock_scopes_signals(layout, victim):
    require("landlock")
    if _load("landlock").abi_version() < 6:
        pytest.skip("landlock unavailable for signal scoping: ABI < 6")
    code = LANDLOCK_APPLY + r"""
import signal
report(
    parent=attempt(lambda: os.kill(os.getppid(), 0)),
    victim=attempt(lambda: os.kill(ARGS["victim"], signal.SIGKILL)),
    self_signal=attempt(lambda: os.kill(os.getpid(), 0)),
)
"""
    child = run_child(code, {"victim": victim.pid, "write": [str(layout["scratch"])]})
    assert child.returncode == 0, child
    assert denied(child["parent"], 1), child
    assert denied(child["victim"], 1), child
    assert child["self_signal"]["ok"], child
    assert victim.poll() is None, "the victim was killed"


def test_landlock_scopes_abstract_unix_sockets(layout):
    require("landlock")
    if _load("landlock").abi_version() < 6:
        pytest.skip("landlock unavailable for abstract unix scoping: ABI < 6")
    name = "\0safehub-test-" + uuid.uuid4().hex
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(name)
        srv.listen(4)
        srv.setblocking(False)
        code = LANDLOCK_APPLY + r"""
def connect():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(ARGS["name"])
def pair():
    a, b = socket.socketpair()
    a.sendall(b"x"); data = b.recv(1); a.close(); b.close()
    return data
report(connect=attempt(connect), socketpair=attempt(pair))
"""
        child = run_child(code, {"name": name, "write": [str(layout["scratch"])]})
        assert child.returncode == 0, child
        assert denied(child["connect"], 1), child
        assert child["socketpair"]["ok"], child
        assert connections_seen(srv) == 0


# --- seccomp -------------------------------------------------------------------------------------
SECCOMP_LOAD = r"""
sc = load("seccomp")
import platform
NR = sc._ARCHES[platform.machine()][1]
"""
SECCOMP_INSTALL = r"""
applied = sc.install(network=ARGS.get("network", False))
"""
SECCOMP_APPLY = SECCOMP_LOAD + SECCOMP_INSTALL


def test_seccomp_denies_exec(layout):
    require("seccomp")
    canary = layout["scratch"] / "exec-canary"
    code = r"""
import subprocess
canary = ARGS["canary"]
before = attempt(lambda: subprocess.run(["/bin/true"], check=True).returncode)
""" + SECCOMP_APPLY + r"""
report(
    before=before,
    subprocess=attempt(lambda: subprocess.run(["/bin/sh", "-c", "echo pwned > " + canary])),
    posix_spawn=attempt(lambda: os.waitpid(os.posix_spawn("/bin/sh", ["sh", "-c", "echo pwned > " + canary], {}), 0)),
    execve=attempt(lambda: os.execv("/bin/sh", ["sh", "-c", "echo pwned > " + canary])),
    execveat=attempt(lambda: sys_call(NR["execveat"], -100, b"/bin/true", None, None, 0)),
)
"""
    child = run_child(code, {"canary": str(canary)})
    assert child.returncode == 0, child
    assert child["before"]["ok"], child
    for attack in ("subprocess", "posix_spawn", "execve", "execveat"):
        assert denied(child[attack], 1), (attack, child)
    assert not canary.exists()


def test_seccomp_denies_udp_raw_and_packet_sockets(udp_listener):
    require("seccomp")
    port = udp_listener.getsockname()[1]
    code = r"""
SOCK_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
def udp_send():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"leak", ("127.0.0.1", ARGS["port"]))
def make(*a):
    with socket.socket(*a):
        return "created"
before = attempt(lambda: make(socket.AF_INET, socket.SOCK_DGRAM))
""" + SECCOMP_APPLY + r"""
def pair():
    a, b = socket.socketpair(); a.close(); b.close()
report(
    before=before,
    udp=attempt(udp_send),
    udp_flags=attempt(lambda: make(socket.AF_INET, socket.SOCK_DGRAM | SOCK_FLAGS)),
    udp6=attempt(lambda: make(socket.AF_INET6, socket.SOCK_DGRAM)),
    raw=attempt(lambda: make(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
    packet=attempt(lambda: make(17, socket.SOCK_RAW, 0)),
    netlink=attempt(lambda: make(16, socket.SOCK_RAW, 0)),
    tcp=attempt(lambda: make(socket.AF_INET, socket.SOCK_STREAM)),
    unix=attempt(pair),
)
"""
    child = run_child(code, {"port": port})
    assert child.returncode == 0, child
    assert child["before"]["ok"], child
    for attack in ("udp", "udp_flags", "udp6", "raw"):
        assert denied(child[attack], 1), (attack, child)
    for attack in ("packet", "netlink"):
        assert denied(child[attack], 97), (attack, child)  # EAFNOSUPPORT
    assert child["tcp"]["ok"] and child["unix"]["ok"], child
    with pytest.raises(BlockingIOError):
        udp_listener.recvfrom(64)


def test_seccomp_network_mode_keeps_tcp_and_dns_udp(udp_listener):
    require("seccomp")
    port = udp_listener.getsockname()[1]
    code = SECCOMP_APPLY + r"""
def udp_send():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return s.sendto(b"dns?", ("127.0.0.1", ARGS["port"]))
def make(*a):
    with socket.socket(*a):
        return "created"
report(udp=attempt(udp_send), raw=attempt(lambda: make(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
       packet=attempt(lambda: make(17, socket.SOCK_RAW, 0)), tcp=attempt(lambda: make(socket.AF_INET, socket.SOCK_STREAM)))
"""
    child = run_child(code, {"port": port, "network": True})
    assert child.returncode == 0, child
    assert child["udp"]["ok"] and child["tcp"]["ok"], child
    assert denied(child["raw"], 1) and denied(child["packet"], 97), child
    assert udp_listener.recvfrom(64)[0] == b"dns?"


def test_seccomp_denies_ptrace_and_memory_access(victim):
    require("seccomp")
    code = SECCOMP_LOAD + r"""
PTRACE_ATTACH = 16
class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
local = IOVec(ctypes.cast(buf, ctypes.c_void_p), 8)
remote = IOVec(ctypes.cast(buf, ctypes.c_void_p), 8)
def vm_read(pid):
    return sys_call(NR["process_vm_readv"], ctypes.c_int(pid), ctypes.byref(local), ctypes.c_ulong(1),
                    ctypes.byref(remote), ctypes.c_ulong(1), ctypes.c_ulong(0))
before = attempt(lambda: vm_read(os.getpid()))
""" + SECCOMP_INSTALL + r"""
report(
    before=before,
    attach=attempt(lambda: sys_call(NR["ptrace"], ctypes.c_long(PTRACE_ATTACH), ctypes.c_long(ARGS["victim"]), None, None)),
    vm_read_self=attempt(lambda: vm_read(os.getpid())),
    vm_read_parent=attempt(lambda: vm_read(os.getppid())),
    pidfd_getfd=attempt(lambda: sys_call(NR["pidfd_getfd"], ctypes.c_int(0), ctypes.c_int(0), ctypes.c_uint(0))),
)
"""
    child = run_child(code, {"victim": victim.pid})
    assert child.returncode == 0, child
    assert child["before"]["ok"], child
    for attack in ("attach", "vm_read_self", "vm_read_parent", "pidfd_getfd"):
        assert denied(child[attack], 1), (attack, child)
    with open(f"/proc/{victim.pid}/status") as f:
        assert "TracerPid:\t0" in f.read()


def test_seccomp_denies_namespace_and_mount_tricks():
    require("seccomp")
    code = SECCOMP_LOAD + r"""
CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17
def raw_clone(flags):
    pid = sys_call(NR["clone"], ctypes.c_ulong(flags), None, None, None, None)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
def unshare_user():
    return sys_call(NR["unshare"], ctypes.c_ulong(CLONE_NEWUSER))
before = attempt(lambda: raw_clone(CLONE_NEWUSER | SIGCHLD))
""" + SECCOMP_INSTALL + r"""
clone3_args = ctypes.create_string_buffer(88)
def fork_works():
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
import threading
ran = []
t = threading.Thread(target=lambda: ran.append(1)); t.start(); t.join()
report(
    before=before,
    unshare=attempt(unshare_user),
    clone_newuser=attempt(lambda: raw_clone(CLONE_NEWUSER | SIGCHLD)),
    clone_newnet=attempt(lambda: raw_clone(CLONE_NEWNET | SIGCHLD)),
    clone3=attempt(lambda: sys_call(NR["clone3"], clone3_args, ctypes.c_size_t(88))),
    setns=attempt(lambda: sys_call(NR["setns"], ctypes.c_int(0), ctypes.c_int(0))),
    mount=attempt(lambda: sys_call(NR["mount"], b"none", b"/tmp", b"tmpfs", ctypes.c_ulong(0), None)),
    fsopen=attempt(lambda: sys_call(NR["fsopen"], b"tmpfs", ctypes.c_uint(0))),
    fork=attempt(fork_works),
    thread=bool(ran),
)
"""
    child = run_child(code)
    assert child.returncode == 0, child
    assert child["before"]["ok"], child
    for attack in ("unshare", "clone_newuser", "clone_newnet", "setns", "mount", "fsopen"):
        assert denied(child[attack], 1), (attack, child)
    assert denied(child["clone3"], 38), child  # ENOSYS, so glibc falls back to clone
    assert child["fork"] == {"ok": True, "value": "7"}
    assert child["thread"] is True


def test_seccomp_denies_kernel_attack_surface():
    require("seccomp")
    code = SECCOMP_LOAD + r"""
params = ctypes.create_string_buffer(120)
before = attempt(lambda: os.close(sys_call(NR["io_uring_setup"], ctypes.c_uint(1), params)))
""" + SECCOMP_INSTALL + r"""
import fcntl, termios
ADDR_NO_RANDOMIZE = 0x0040000
attr = ctypes.create_string_buffer(128)
report(
    before=before,
    io_uring_setup=attempt(lambda: sys_call(NR["io_uring_setup"], ctypes.c_uint(1), params)),
    io_uring_enter=attempt(lambda: sys_call(NR["io_uring_enter"], ctypes.c_uint(0), 0, 0, 0, None, 0)),
    bpf=attempt(lambda: sys_call(NR["bpf"], ctypes.c_int(0), attr, ctypes.c_uint(128))),
    perf_event_open=attempt(lambda: sys_call(NR["perf_event_open"], attr, 0, -1, -1, 0)),
    userfaultfd=attempt(lambda: sys_call(NR["userfaultfd"], ctypes.c_int(0))),
    keyctl=attempt(lambda: sys_call(NR["keyctl"], ctypes.c_int(0), ctypes.c_long(-3), 0)),
    personality=attempt(lambda: sys_call(NR["personality"], ctypes.c_ulong(ADDR_NO_RANDOMIZE))),
    personality_query=attempt(lambda: sys_call(NR["personality"], ctypes.c_ulong(0xFFFFFFFF))),
    tiocsti=attempt(lambda: fcntl.ioctl(0, termios.TIOCSTI, b"x")),
    init_module=attempt(lambda: sys_call(NR["finit_module"], ctypes.c_int(0), b"", ctypes.c_int(0))),
    kexec=attempt(lambda: sys_call(NR["kexec_file_load"], -1, -1, 0, None, 0)),
)
"""
    child = run_child(code, stdin=subprocess.DEVNULL)
    assert child.returncode == 0, child
    assert child["before"]["ok"], f"io_uring already blocked without seccomp: {child}"
    for attack in ("io_uring_setup", "io_uring_enter", "bpf", "perf_event_open", "userfaultfd", "keyctl",
                   "personality", "tiocsti", "init_module", "kexec"):
        assert denied(child[attack], 1), (attack, child)
    assert child["personality_query"]["ok"], child


def test_seccomp_kills_x32_and_foreign_abi():
    require("seccomp")
    import platform

    if platform.machine() not in ("x86_64", "amd64"):
        pytest.skip("seccomp x32 check applies to x86_64 only")
    code = SECCOMP_APPLY + r"""
report(installed=True)
libc.syscall(ctypes.c_long(0x40000000 | 39))  # getpid through the x32 numbering
report(survived=True)
"""
    child = run_child(code)
    assert child["installed"] is True
    assert "survived" not in child.result
    assert child.returncode == -signal.SIGSYS, child


# --- namespaces ----------------------------------------------------------------------------------
def test_network_namespace_cuts_loopback(tcp_listener):
    require("namespaces")
    code = r"""
ns = load("namespaces")
def connect():
    with socket.create_connection(("127.0.0.1", ARGS["port"]), timeout=5):
        return "connected"
before = attempt(connect)
entered = ns.enter(user=True, net=True, ipc=True)
report(before=before, after=attempt(connect), entered=entered, uid=os.getuid())
"""
    child = run_child(code, {"port": tcp_listener.getsockname()[1]})
    assert child.returncode == 0, child
    assert child["before"]["ok"], child
    assert connections_seen(tcp_listener) == 1  # the control connection, and only it
    assert denied(child["after"], 101, 111), child  # ENETUNREACH (lo is down) or refused
    assert child["entered"]["namespaces"] == ["user", "net", "ipc"]
    assert child["uid"] == os.getuid()
    assert connections_seen(tcp_listener) == 0


def test_namespaces_work_for_an_unprivileged_uid(tcp_listener):
    require("namespaces")
    if not IS_ROOT:
        pytest.skip("namespaces: this run is already unprivileged (covered by the test above)")
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"namespaces: no {SYSTEM_PYTHON} for a uid that cannot read this interpreter")
    code = r"""
ns = load("namespaces")
entered = ns.enter(user=True, net=True, ipc=True, pid=True, mount=True)
def connect():
    with socket.create_connection(("127.0.0.1", ARGS["port"]), timeout=5):
        return "connected"
report(entered=entered, uid=os.getuid(), after=attempt(connect))
"""
    child = run_child(code, {"port": tcp_listener.getsockname()[1]}, python=SYSTEM_PYTHON, user=NOBODY)
    assert child.returncode == 0, child
    assert child["uid"] == NOBODY
    assert denied(child["after"]), child
    assert connections_seen(tcp_listener) == 0


def test_pid_namespace_hides_the_parent():
    require("namespaces")
    code = r"""
ns, confine = load("namespaces"), load("confine")
ns.enter(user=True, net=True, ipc=True, pid=True, mount=True)
confine.fork_into_pid_namespace(confine.Report())  # only the work returns: pid 2, under a small init
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
report(pid=os.getpid(), pids=pids, parent_visible=os.path.exists("/proc/%d" % ARGS["test_pid"]),
       kill_parent=attempt(lambda: os.kill(ARGS["test_pid"], 0)))
os._exit(5)
"""
    child = run_child(code, {"test_pid": os.getpid()})
    assert child.returncode == 5, child  # the process left outside mirrors the work's end
    assert child["pid"] == 2
    assert child["pids"] == [1, 2]
    assert child["parent_visible"] is False
    assert denied(child["kill_parent"], 3)  # ESRCH: no such process in this namespace


def test_pid1_exit_kills_everything_it_started(shared_tmp):
    require("namespaces")
    marker = shared_tmp / "orphan-alive"
    code = r"""
import time
ns, confine = load("namespaces"), load("confine")
ns.enter(user=True, net=True, ipc=True, pid=True, mount=True)
confine.fork_into_pid_namespace(confine.Report())
if os.fork() == 0:          # an orphan-to-be that outlives the work if it can
    os.setsid()
    time.sleep(1.5)
    open(ARGS["marker"], "w").write("alive")
    os._exit(0)
report(forked=True)
os._exit(0)                 # the work ends: its init (pid 1) exits, and the kernel kills the namespace
"""
    child = run_child(code, {"marker": str(marker)})
    assert child.returncode == 0, child
    assert child["forked"]
    time.sleep(2.5)
    assert not marker.exists(), "a process outlived pid 1 of its namespace"


# --- bubblewrap ----------------------------------------------------------------------------------
BWRAP_ATTACK = r"""
import signal
out = {"uid": os.getuid(), "pid": os.getpid(), "cwd": os.getcwd()}
out["secret"] = attempt(lambda: open(ARGS["secret"]).read())
out["home_listing"] = attempt(lambda: os.listdir(ARGS["home"]))
out["repo_write"] = attempt(lambda: open(os.path.join(ARGS["repo"], "hubconf.py"), "a").write("pwned"))
out["repo_create"] = attempt(lambda: open(os.path.join(ARGS["repo"], "new.py"), "w").write("pwned"))
out["scratch_write"] = attempt(lambda: open(os.path.join(ARGS["scratch"], "ok.txt"), "w").write("fine"))
def connect():
    with socket.create_connection(("127.0.0.1", ARGS["port"]), timeout=5):
        return "connected"
out["connect"] = attempt(connect)
out["parent_visible"] = os.path.exists("/proc/%d" % ARGS["test_pid"])
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["root_listing"] = sorted(os.listdir("/"))
out["cap_eff"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
out["cap_prm"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapPrm")][0]
out["setuid0"] = attempt(lambda: os.setuid(0))
out["nested_userns"] = attempt(lambda: sys_call(272 if os.uname().machine == "x86_64" else 97, ctypes.c_ulong(0x10000000)))
import decimal, email.mime.text  # lazily imported modules: the interpreter is fully readable
report(**out)
"""


def _bwrap_args(layout, listener) -> dict:
    return {"secret": str(layout["home"] / "secret.txt"), "home": str(layout["home"]),
            "repo": str(layout["repo"]), "scratch": str(layout["scratch"]),
            "port": listener.getsockname()[1], "test_pid": os.getpid()}


def _assert_bwrap_confined(child: Child, layout, listener, *, uid: int, nested_userns_blocked: bool = True) -> None:
    assert child.returncode == 0, child
    assert child["uid"] == uid
    assert denied(child["secret"], 2), child  # the home folder does not exist inside
    assert denied(child["home_listing"], 2), child
    # EROFS, or EACCES first when the sandbox uid may not write the file anyway
    assert denied(child["repo_write"], 30, 13) and denied(child["repo_create"], 30, 13), child
    assert child["scratch_write"]["ok"], child
    assert denied(child["connect"]), child
    assert child["parent_visible"] is False and child["pid"] == 2 and max(child["pids"]) <= 3, child
    # /home exists inside only when the interpreter lives there (a venv in a user's home).
    python_under_home = any(p.startswith("/home/") for p in grants.python_read_paths())
    assert ("home" in child["root_listing"]) == python_under_home, child
    assert child["cap_eff"] == child["cap_prm"] == "0000000000000000", child
    if nested_userns_blocked:
        assert denied(child["nested_userns"]), child
    assert SECRET not in child.stdout
    assert (layout["repo"] / "hubconf.py").read_text() == "dependencies = []\n"
    assert not (layout["repo"] / "new.py").exists()
    assert (layout["scratch"] / "ok.txt").read_text() == "fine"
    assert connections_seen(listener) == 0


def test_bwrap_confines_a_worker_run_by_this_user(layout, tcp_listener):
    require("bubblewrap")
    argv = _bwrap.bwrap_argv(layout["repo"], layout["scratch"], env={"PATH": "/usr/bin:/bin", "HOME": str(layout["scratch"])})
    child = run_child(BWRAP_ATTACK, _bwrap_args(layout, tcp_listener), prefix=argv)
    _assert_bwrap_confined(child, layout, tcp_listener, uid=os.getuid())


def test_bwrap_root_drops_to_an_unprivileged_uid(layout, tcp_listener):
    require("bubblewrap")
    if not IS_ROOT:
        pytest.skip("bubblewrap: the root-to-uid drop needs a root test run")
    if shutil.which("setpriv") is None:
        pytest.skip("bubblewrap: setpriv (util-linux) not installed for the in-sandbox drop")
    os.chown(layout["scratch"], NOBODY, NOBODY)
    layout["scratch"].chmod(0o700)  # private to the worker's uid
    argv = _bwrap.bwrap_argv(layout["repo"], layout["scratch"], uid=NOBODY, env={"PATH": "/usr/bin:/bin"})
    child = run_child(BWRAP_ATTACK, _bwrap_args(layout, tcp_listener), prefix=argv)
    # No user namespace in this mode (it would keep the kernel uid at 0), so bwrap cannot
    # forbid nested ones: the seccomp layer does, inside the worker.
    _assert_bwrap_confined(child, layout, tcp_listener, uid=NOBODY, nested_userns_blocked=False)
    assert denied(child["setuid0"], 1), child
    assert (layout["scratch"] / "ok.txt").stat().st_uid == NOBODY  # a real drop: the kernel sees 65534


def test_bwrap_run_by_an_unprivileged_user(layout, tcp_listener):
    require("bubblewrap")
    if not IS_ROOT:
        pytest.skip("bubblewrap: already covered unprivileged by the first bwrap test")
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"bubblewrap: no {SYSTEM_PYTHON} for a uid that cannot read this interpreter")
    os.chown(layout["scratch"], NOBODY, NOBODY)
    # Built as that user would build it: only a Python it can read (the system one) is bound.
    argv = _bwrap.bwrap_argv(layout["repo"], layout["scratch"], python_prefixes=["/usr"], env={"PATH": "/usr/bin:/bin"})
    child = run_child(BWRAP_ATTACK, _bwrap_args(layout, tcp_listener), prefix=argv, python=SYSTEM_PYTHON, user=NOBODY)
    _assert_bwrap_confined(child, layout, tcp_listener, uid=NOBODY)


SCRATCH_FILL = r"""
out = {"uid": os.getuid(), "cwd": os.getcwd()}
st = os.statvfs(ARGS["scratch"])
out["size"] = st.f_blocks * st.f_frsize
written = 0
def fill():
    global written
    for i in range(16):  # 4 MiB files: 64 MiB at most
        with open(os.path.join(ARGS["scratch"], "part-%d.bin" % i), "wb") as f:
            f.write(b"\0" * (4 << 20))
        written += 4
out["fill"] = attempt(fill)
out["written"] = written
out["mode"] = oct(os.stat(ARGS["scratch"]).st_mode & 0o7777)
report(**out)
"""


def _assert_scratch_bounded(child: Child, layout, size: int) -> None:
    assert child.returncode == 0, child
    assert child["size"] == size, child
    assert denied(child["fill"], errno.ENOSPC) and child["written"] <= size >> 20, child
    assert os.listdir(layout["scratch"]) == []  # all of it in the sandbox's tmpfs, none on the disk


def test_bwrap_scratch_is_a_sized_tmpfs(layout):
    require("bubblewrap")
    if not _bwrap.bwrap_features().get("size"):
        pytest.skip("bubblewrap: this bwrap has no --size")
    argv = _bwrap.bwrap_argv(layout["repo"], layout["scratch"], scratch_size=16 << 20, env={"PATH": "/usr/bin:/bin"})
    _assert_scratch_bounded(run_child(SCRATCH_FILL, {"scratch": str(layout["scratch"])}, prefix=argv), layout, 16 << 20)


def test_bwrap_scratch_tmpfs_is_writable_after_the_root_drop(layout):
    require("bubblewrap")
    if not IS_ROOT or shutil.which("setpriv") is None:
        pytest.skip("bubblewrap: the root-to-uid drop needs a root test run and setpriv")
    argv = _bwrap.bwrap_argv(layout["repo"], layout["scratch"], uid=NOBODY, scratch_size=16 << 20, env={"PATH": "/usr/bin:/bin"})
    child = run_child(SCRATCH_FILL, {"scratch": str(layout["scratch"])}, prefix=argv)
    _assert_scratch_bounded(child, layout, 16 << 20)
    assert child["uid"] == NOBODY


def test_scratch_tmpfs_in_a_private_mount_namespace(layout):
    """The direct path: a tmpfs over the scratch folder, owned by the uid the work runs as, entered again."""
    require("namespaces")
    code = r"""
ns, lim = load("namespaces"), load("limits")
os.chdir(ARGS["scratch"])
if os.geteuid() == 0:
    ns.enter(user=False, net=False, ipc=False, mount=True)
    ns.mount_tmpfs(ARGS["scratch"], 16 << 20, uid=65534, gid=65534)
    lim.drop_privileges(65534)
else:
    ns.enter(user=True, net=False, ipc=False, mount=True)
    ns.mount_tmpfs(ARGS["scratch"], 16 << 20, uid=os.getuid(), gid=os.getgid())
before = os.listdir(".")  # still the covered folder: the host's
os.chdir(ARGS["scratch"])
""" + SCRATCH_FILL.replace('out = {"uid"', 'out = {"before": before, "uid"')
    open(layout["scratch"] / "host-file", "w").close()
    child = run_child(code, {"scratch": str(layout["scratch"])})
    assert child["before"] == ["host-file"] and child["mode"] == "0o700", child
    os.unlink(layout["scratch"] / "host-file")
    _assert_scratch_bounded(child, layout, 16 << 20)
    assert child["uid"] == (NOBODY if IS_ROOT else os.getuid())


def test_mount_tmpfs_refuses_the_hosts_mount_namespace(layout):
    ns = _load("namespaces")
    before = os.stat(layout["scratch"]).st_dev
    # The guard refuses where it can see the parent's namespace; a user the kernel refuses anyway.
    with pytest.raises((RuntimeError, PermissionError), match="mount namespace|not permitted"):
        ns.mount_tmpfs(str(layout["scratch"]), 1 << 20, uid=os.getuid(), gid=os.getgid())
    assert os.stat(layout["scratch"]).st_dev == before


# --- rlimits -------------------------------------------------------------------------------------
RLIMITS_APPLY = r"""
lim = load("limits")
applied = lim.apply_rlimits(**ARGS["limits"])
"""


def test_rlimit_memory_stops_a_large_allocation():
    require("rlimits")
    code = RLIMITS_APPLY + r"""
import mmap
def alloc():
    block = bytearray(1 << 30)  # 1 GiB against a 512 MiB limit
    return len(block)
def mapping():
    m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    m.close()
report(applied=applied, alloc=attempt(alloc), mapping=attempt(mapping), small=attempt(lambda: len(bytearray(16 << 20))))
"""
    child = run_child(code, {"limits": {"memory_bytes": 512 << 20}})
    assert child.returncode == 0, child
    assert child["applied"]["RLIMIT_AS"] == [512 << 20, 512 << 20]
    assert not child["alloc"]["ok"] and "MemoryError" in child["alloc"]["error"], child
    assert denied(child["mapping"], 12), child  # ENOMEM: shared mappings count in RLIMIT_AS
    assert child["small"]["ok"], child


def test_rlimit_file_size_caps_a_written_file(shared_tmp):
    require("rlimits")
    target = shared_tmp / "big.bin"
    code = RLIMITS_APPLY + r"""
def write():
    with open(ARGS["target"], "wb") as f:
        for _ in range(4):
            f.write(b"\0" * (1 << 20))
report(write=attempt(write))
"""
    child = run_child(code, {"target": str(target), "limits": {"max_file_size": 1 << 20}})
    assert child.returncode == 0, child
    assert denied(child["write"], 27), child  # EFBIG, not a SIGXFSZ death: CPython ignores it
    assert target.stat().st_size <= 1 << 20


def test_rlimit_open_files():
    require("rlimits")
    code = RLIMITS_APPLY + r"""
fds = []
def exhaust():
    for _ in range(200):
        fds.append(os.open("/dev/null", os.O_RDONLY))
outcome = attempt(exhaust)
report(outcome=outcome, opened=len(fds), core=list(__import__("resource").getrlimit(__import__("resource").RLIMIT_CORE)))
"""
    child = run_child(code, {"limits": {"max_open_files": 32}})
    assert child.returncode == 0, child
    assert denied(child["outcome"], 24), child  # EMFILE
    assert child["opened"] < 32
    assert child["core"] == [0, 0]


def test_rlimit_cpu_kills_a_busy_loop():
    require("rlimits")
    code = RLIMITS_APPLY + r"""
import time
report(started=True)
deadline = time.monotonic() + 10  # bounded even if the limit never fires
while time.monotonic() < deadline:
    pass
report(survived=True)
"""
    child = run_child(code, {"limits": {"cpu_seconds": 1}}, timeout=30)
    assert child["started"] is True
    assert "survived" not in child.result
    assert child.returncode in (-signal.SIGXCPU, -signal.SIGKILL), child


FORK_BOMB = r"""
import resource, time
r, w = os.pipe()
kids, failure = [], None
for _ in range(40):  # bounded: at most 40 children, each gone when this process exits
    try:
        pid = os.fork()
    except OSError as exc:
        failure = exc.errno
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    kids.append(pid)
os.close(w)
for pid in kids:
    os.waitpid(pid, 0)
report(forked=len(kids), failure=failure, uid=os.getuid(), limit=list(resource.getrlimit(resource.RLIMIT_NPROC)))
"""


def test_rlimit_nproc_stops_a_fork_loop_for_an_unprivileged_uid():
    require("rlimits")
    if IS_ROOT:
        require("uid_drop")
        drop = "dropped = lim.drop_privileges(%d)\n" % NOBODY
    else:
        drop = ""
    code = "lim = load('limits')\n" + drop + "applied = lim.apply_rlimits(max_processes=8)\n" + FORK_BOMB
    child = run_child(code)
    assert child.returncode == 0, child
    assert child["uid"] != 0
    assert child["failure"] == 11, child  # EAGAIN
    assert child["forked"] < 8, child


def test_rlimit_nproc_counts_a_user_namespace_on_its_own():
    """Pins why a worker enters a user namespace of its own: the kernel counts RLIMIT_NPROC per
    uid and user namespace, so outside one every other process of the uid (another worker of
    uid 65534, a daemon running as nobody) eats the limit."""
    require("rlimits")
    require("namespaces")
    if IS_ROOT:
        require("uid_drop")
    code = r"""
import time
lim, ns = load("limits"), load("namespaces")
uid = 65534 if os.geteuid() == 0 else os.getuid()
hogs = []
for _ in range(12):  # other processes of the uid, outside the worker
    pid = os.fork()
    if pid == 0:
        if os.geteuid() == 0:
            lim.drop_privileges(uid)
        time.sleep(20)
        os._exit(0)
    hogs.append(pid)
time.sleep(0.3)
result = {}
for own in (False, True):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if os.geteuid() == 0:
            lim.drop_privileges(uid)
        if own:
            ns.enter(user=True, net=False, ipc=False)
        base = 0 if own else lim.tasks_of_uid(uid)
        lim.apply_rlimits(max_processes=8 + base)
        n = 0
        try:
            for _ in range(20):
                if os.fork() == 0:
                    time.sleep(2)
                    os._exit(0)
                n += 1
        except OSError:
            pass
        os.write(w, str(n).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    result["own" if own else "on_top"] = int(os.read(r, 16))
for pid in hogs:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
report(**result)
"""
    child = run_child(code)
    assert child.returncode == 0, child
    # 8 tasks: the worker and 7 children, however many others of its uid run
    assert child["own"] == 7, child
    # On top of what the uid runs: racy by a task or two (this test process, of the same uid, may
    # start a thread between the count and the forks), far from the 12 tasks it would lose
    # without the count.
    assert child["on_top"] >= 5, child


FIT_THREADS = r"""
lim = load("limits")
if ARGS["torch_first"]:  # the warm path: torch imported before the sandbox goes on
    import torch
fit = lim.fit_torch_threads(ARGS["max_processes"], cpus=ARGS["cpus"])
import torch
report(fit=fit, threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"))
"""


def _fit_threads(max_processes: int, cpus: int, torch_first: bool, omp: str | None = None) -> Child:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    args = {"max_processes": max_processes, "cpus": cpus, "torch_first": torch_first}
    return run_child(FIT_THREADS, args, env=env)


@pytest.mark.parametrize("torch_first", [False, True], ids=["cold", "warm"])
def test_a_max_processes_too_small_for_torch_lowers_its_threads(torch_first):
    # (18 - 16) // 2 = 1 thread per pool, where a 96-CPU machine's torch would start 96.
    child = _fit_threads(18, 96, torch_first)
    assert child.returncode == 0, child
    assert child["fit"] == 1 and child["threads"] == 1, child
    assert child["omp"] == (None if torch_first else "1"), child


def test_torch_threads_are_left_alone_when_they_fit_or_are_chosen():
    from safehub._sandbox import default_max_processes

    assert _fit_threads(default_max_processes(96), 96, torch_first=False)["fit"] is None
    chosen = _fit_threads(18, 96, torch_first=False, omp="3")
    assert chosen["fit"] is None and chosen["omp"] == "3", chosen


def test_rlimit_nproc_does_not_bind_uid_0():
    """Pins why the uid drop exists: the kernel exempts uid 0 from RLIMIT_NPROC, also inside a
    user namespace whose ids map to 0 (what ``bwrap --uid`` run by root gives)."""
    require("rlimits")
    if not IS_ROOT:
        pytest.skip("rlimits: the uid-0 exemption can only be shown by a root test run")
    code = r"""
lim = load("limits")
if ARGS["userns"]:
    assert libc.unshare(0x10000000) == 0
    open("/proc/self/setgroups", "w").write("deny")
    open("/proc/self/uid_map", "w").write("65534 0 1")
    open("/proc/self/gid_map", "w").write("65534 0 1")
lim.apply_rlimits(max_processes=5)
""" + FORK_BOMB.replace("range(40)", "range(12)")
    for userns in (False, True):
        child = run_child(code, {"userns": userns})
        assert child.returncode == 0, child
        assert child["forked"] == 12 and child["failure"] is None, (userns, child)
        assert child["uid"] == (NOBODY if userns else 0)


# --- uid drop ------------------------------------------------------------------------------------
def test_uid_drop_cannot_be_undone(shared_tmp):
    require("uid_drop")
    private = shared_tmp / "private"
    private.mkdir(mode=0o700)
    (private / "key").write_text(SECRET)
    (private / "key").chmod(0o600)
    code = r"""
lim = load("limits")
before = attempt(lambda: open(ARGS["key"]).read())
dropped = lim.drop_privileges(65534)
report(before_ok=before["ok"], dropped=dropped, ids=[os.getresuid(), os.getresgid(), os.getgroups()],
       setuid=attempt(lambda: os.setuid(0)), seteuid=attempt(lambda: os.seteuid(0)),
       setgroups=attempt(lambda: os.setgroups([0])), key=attempt(lambda: open(ARGS["key"]).read()))
"""
    child = run_child(code, {"key": str(private / "key")})
    assert child.returncode == 0, child
    assert child["before_ok"] is True
    assert child["ids"] == [[NOBODY] * 3, [NOBODY] * 3, []]
    assert child["dropped"]["cap_eff"] == 0
    for attempt_name in ("setuid", "seteuid", "setgroups"):
        assert denied(child[attempt_name], 1), (attempt_name, child)
    assert denied(child["key"], 13), child
    assert SECRET not in child.stdout


def test_uid_drop_after_hiding_root_keeps_the_interpreter_importable(shared_tmp):
    require("uid_drop")
    if not os.path.realpath(sys.base_prefix).startswith("/root/"):
        pytest.skip("uid_drop: the interpreter is not under /root here; nothing to rebind")
    code = r"""
ns = load("namespaces")
lim = load("limits")
entered = ns.enter(user=False, net=True, ipc=True, mount=True)
kept = ns.hide_and_rebind("/root", [sys.base_prefix])
dropped = lim.drop_privileges(65534)
import decimal, email.mime.text, xml.dom.minidom  # not imported before the drop
report(kept=kept, listing=sorted(os.listdir("/root")), uid=os.getuid(),
       write=attempt(lambda: open(os.path.join(sys.base_prefix, "pwned"), "w")))
"""
    child = run_child(code)
    assert child.returncode == 0, child
    assert child["uid"] == NOBODY
    assert child["listing"] == [".pyenv"]
    assert denied(child["write"], 13, 30), child
    assert not os.path.exists(os.path.join(sys.base_prefix, "pwned"))


# --- all layers, in the worker's order -------------------------------------------------------------
def test_all_layers_together(layout, tcp_listener, victim):
    for layer in ("namespaces", "landlock", "seccomp", "rlimits"):
        require(layer)
    code = r"""
import subprocess, signal
ns = load("namespaces"); ll = load("landlock"); sc = load("seccomp"); lim = load("limits")
applied = {}
applied["namespaces"] = ns.enter(user=True, net=True, ipc=True)
applied["landlock"] = ll.restrict(load("grants").system_read_paths() + load("grants").python_read_paths() + [ARGS["repo"]], [ARGS["scratch"]])
applied["rlimits"] = lim.apply_rlimits(memory_bytes=2 << 30, cpu_seconds=30, max_open_files=256, max_file_size=64 << 20)
applied["seccomp"] = sc.install()
def connect():
    with socket.create_connection(("127.0.0.1", ARGS["port"]), timeout=5):
        return "connected"
import decimal
report(
    secret=attempt(lambda: open(ARGS["secret"]).read()),
    repo_read=attempt(lambda: open(os.path.join(ARGS["repo"], "hubconf.py")).read()),
    repo_write=attempt(lambda: open(os.path.join(ARGS["repo"], "hubconf.py"), "a").write("pwned")),
    scratch=attempt(lambda: open(os.path.join(ARGS["scratch"], "ok.txt"), "w").write("fine")),
    connect=attempt(connect),
    exec=attempt(lambda: subprocess.run(["/bin/true"])),
    kill=attempt(lambda: os.kill(ARGS["victim"], signal.SIGKILL)),
    udp=attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
    layers=sorted(applied),
)
"""
    child = run_child(code, {"secret": str(layout["home"] / "secret.txt"), "repo": str(layout["repo"]),
                             "scratch": str(layout["scratch"]), "port": tcp_listener.getsockname()[1],
                             "victim": victim.pid})
    assert child.returncode == 0, child
    assert denied(child["secret"], 13)
    assert child["repo_read"]["ok"]
    assert denied(child["repo_write"], 13)
    assert child["scratch"]["ok"]
    assert denied(child["connect"])
    assert denied(child["exec"], 1)
    assert denied(child["kill"], 1)
    assert denied(child["udp"], 1)
    assert victim.poll() is None
    assert connections_seen(tcp_listener) == 0
    assert (layout["repo"] / "hubconf.py").read_text() == "dependencies = []\n"
