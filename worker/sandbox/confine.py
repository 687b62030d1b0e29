"""Confine the worker before any repository code runs. Standard library only.

The layers go on in two steps, in this order, each where the machine allows and
``settings.layers`` asks for it. The first two do not depend on the call but on its
:class:`Shape` (which namespaces, which memory cgroup): :func:`prepare` applies them in the
supervisor, which then forks the work process (through a small init where there is a pid
namespace), ahead of the call on the warm path (a spare worker, ``zygote.py``).
``apply_sandbox`` applies the rest in the forked, single-threaded work process, after the request
arrived and before ``hubconf.py`` is imported:

0. memory_cgroup: where the parent made one for the call (``settings.memory_cgroup``) and the
   launch command did not enter it already, the supervisor enters it before anything else, so all
   it will fork and allocate counts against ``memory_limit`` (``WorkerSettings.memory_shares``).
1. namespaces (user, net, ipc, pid, mount, uts), unless bubblewrap already made them: the
   supervisor unshares them. A new pid namespace takes effect for children only: the
   supervisor's child is a small init, pid 1 of the namespace (a fresh /proc mounted, see
   :func:`become_init`), which forks the work as pid 2. The work is not pid 1 itself: the kernel
   drops every signal a namespace's pid 1 sends itself without a handler, so it could not die of
   ``os.kill(os.getpid(), SIGSEGV)`` or ``abort()`` as it does anywhere else.
2. session (the work process): every descriptor but stdio and the channel closed, umask 077, no
   core dumps.
3. The scratch folder (part of rlimits): a tmpfs of its ``memory_shares`` size mounted over it in
   the private mount namespace (bubblewrap mounts its own), owned by the uid the work runs as,
   and the working folder entered again. As root without a mount namespace, one is made for it;
   where none can be, rlimits bounds each file to ``max_scratch_size`` instead.
4. uid_drop (root only): root is exempt from RLIMIT_NPROC and reads every file, so it becomes
   uid 65534. Folders that uid cannot traverse (``/root`` is 0700 here) are covered in a private
   mount namespace and only the paths the worker needs are bound back, read-only.
5. Its own process count (part of rlimits): RLIMIT_NPROC counts a uid's tasks per user
   namespace, so a worker still in the initial one (after the uid drop, or dropped by
   bubblewrap's setpriv) enters a user namespace of its own, where namespaces are wanted:
   other processes of uid 65534 then do not count. Else the limit is set on top of what the uid
   runs already.
6. landlock: read the system, Python, the repository and ``extra_read_paths``; write only the
   scratch folder; no TCP (unless ``network``); no signals or abstract sockets out.
7. rlimits: memory, CPU, processes, open files, file size, no core dumps; torch's thread
   counts lowered where its default pools would not fit in ``max_processes``.
8. no_capabilities: a process in a user namespace of its own holds every capability of it
   (the worker never execs, which would clear them): all are dropped once the mounts and id maps
   are made (``capabilities.py``).
9. seccomp last, since it denies calls the layers before it make (unshare, mount). Without a
   memory cgroup it also holds the worker to one address space (no new processes, no memfds),
   the half of the memory bound rlimits cannot hold (reported as ``one_address_space``).

A layer that cannot be applied is reported with the reason, never silently skipped; the worker
then checks ``settings.require``.
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any, Iterable

from dataclasses import dataclass, field

from .. import grants
from ..protocol import MemoryShares, WorkerSettings
from . import capabilities, landlock, limits, namespaces, seccomp
from .libc import check, libc

UNPRIVILEGED_UID = 65534  # "nobody"


class Report:
    """Which layers are in force, and why the others are not."""

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.missing: dict[str, str] = {}

    def as_fields(self) -> dict[str, Any]:
        return {"applied": list(self.applied), "missing": dict(self.missing)}


def close_other_fds(keep: Iterable[int]) -> None:
    """Close every file descriptor not in ``keep``."""
    # Inherited handles (a parent's sockets, files, pipes) would let the repository reach them.
    keep = set(keep)
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = list(range(_fd_ceiling()))
    for fd in open_fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


def _fd_ceiling() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if 0 < soft < 1 << 20 else 1 << 20


def no_core_dumps() -> None:
    # A core file would write the worker's memory (and whatever it read) to disk.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass(frozen=True)
class Shape:
    """What a worker's first layers depend on: the same for most calls, so a spare can have them."""

    namespaces: bool  # unshare them here (wanted, and not made by bubblewrap)
    user: bool  # with a user namespace (not root, which keeps its privileges to drop its uid)
    network: bool  # keep the host's network (no network namespace)
    cgroup: str | None  # the memory cgroup to enter (None: none, or the launch command entered it)

    def as_dict(self) -> dict[str, Any]:
        return {"namespaces": self.namespaces, "user": self.user, "network": self.network, "cgroup": self.cgroup}

    @classmethod
    def from_dict(cls, data: Any) -> Shape:
        types = {"namespaces": bool, "user": bool, "network": bool}
        if not isinstance(data, dict) or any(type(data.get(k)) is not v for k, v in types.items()):
            raise ValueError(f"not a worker shape: {data!r}")
        cgroup = data.get("cgroup")
        if cgroup is not None and type(cgroup) is not str:
            raise ValueError(f"not a cgroup: {cgroup!r}")
        return cls(data["namespaces"], data["user"], data["network"], cgroup)

    def serves(self, call: Shape) -> bool:
        """Whether a worker prepared with this shape can take a call of shape ``call``: the same
        namespaces; a call with a cgroup of its own enters it (:func:`enter_call_cgroup`)."""
        return (self.namespaces, self.user, self.network) == (call.namespaces, call.user, call.network)


def shape_of(settings: WorkerSettings) -> Shape:
    """The shape of a call with these settings (in the process that will apply its layers)."""
    wanted = set(settings.layers)
    in_bwrap = "bubblewrap" in settings.applied_by_parent
    drop = os.geteuid() == 0 and "uid_drop" in wanted and not in_bwrap
    joined = "memory_cgroup" in settings.applied_by_parent
    return Shape(
        namespaces="namespaces" in wanted and not in_bwrap,
        # Root that will drop its uid needs no user namespace (and must keep CAP_SYS_ADMIN for the
        # mounts of the drop); anyone else gets one, which makes the other namespaces unprivileged.
        user=not drop,
        network=settings.network,
        cgroup=None if joined else settings.memory_cgroup,
    )


@dataclass
class Prepared:
    """The first layers, as the supervisor applied them; the work process inherits it (fork)."""

    shape: Shape
    applied: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    pid_ns: bool = False  # the next child is pid 1 of a new pid namespace
    cgroup: str | None = None  # the memory cgroup this process entered


def prepare(shape: Shape) -> Prepared:
    """In the supervisor: enter the shape's memory cgroup and unshare its namespaces.

    Raises OSError when the cgroup cannot be entered: the parent counted on it.
    """
    prepared = Prepared(shape)
    if shape.cgroup:
        join_memory_cgroup(shape.cgroup)  # before anything is forked or allocated
        prepared.cgroup = shape.cgroup
        prepared.applied.append("memory_cgroup")
    if shape.namespaces:
        report = Report()
        prepared.pid_ns = _attempt(report, "namespaces", lambda: namespaces.enter(
            user=shape.user, net=not shape.network, ipc=True, pid=True, mount=True, uts=True))
        prepared.applied += report.applied
        prepared.missing.update(report.missing)
    return prepared


def enter_call_cgroup(prepared: Prepared, settings: WorkerSettings) -> None:
    """In the work process: a call whose memory cgroup is not the one the supervisor entered
    (a spare prepared before the parent made it) enters its own now."""
    call = shape_of(settings).cgroup
    if call and call != prepared.cgroup:
        join_memory_cgroup(call)
        prepared.cgroup = call
        if "memory_cgroup" not in prepared.applied:
            prepared.applied.append("memory_cgroup")


def become_init(prepared: Prepared, status_w: int, supervisor_fd: int) -> None:
    """In the supervisor's child, pid 1 of the new pid namespace: fork the work and return in it.

    This process mounts the namespace's own /proc, forks the work (pid 2, which returns), then
    reaps every process that re-parents to it until the work ends, writes the work's wait status
    to ``status_w`` and exits: the kernel then kills whatever is left in the namespace, and waits
    for it, before the supervisor sees this process end. ``supervisor_fd``: a pidfd of the
    supervisor (this one dies with it).
    """
    libc().prctl(namespaces.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if _ended(supervisor_fd):
        os._exit(70)
    os.close(supervisor_fd)
    try:
        # A /proc of this namespace only: other processes' entries disappear.
        check(
            libc().mount(b"proc", b"/proc", b"proc", namespaces.MS_NOSUID | namespaces.MS_NODEV | namespaces.MS_NOEXEC, None),
            "mount(/proc)",
        )
    except OSError as exc:
        prepared.missing["private_proc"] = f"{exc}"
    try:
        init_fd = os.pidfd_open(os.getpid())
        work = os.fork()
    except OSError:
        os._exit(70)
    if work == 0:
        os.close(status_w)
        watch_parent(init_fd)
        return
    # Only the status pipe: no copy of the channel, the pipes or the zygote's socket here keeps
    # them open once the work is gone.
    close_other_fds((status_w,))
    while True:  # orphans of the work re-parent here and are reaped along the way
        pid, status = os.waitpid(-1, 0)
        if pid == work:
            break
    os.write(status_w, str(status).encode())
    os._exit(0)


def watch_parent(parent_fd: int) -> None:
    """In a forked child: die with the parent (``parent_fd``, its pidfd), even if it is already gone."""
    libc().prctl(namespaces.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if _ended(parent_fd):
        os._exit(70)
    os.close(parent_fd)


def _ended(pidfd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def apply_sandbox(settings: WorkerSettings, *, keep_fds: Iterable[int], prepared: Prepared) -> Report:
    """Apply every wanted, available layer after those ``prepared`` applied; return what is in force."""
    report = Report()
    wanted = set(settings.layers)
    report.applied += settings.applied_by_parent
    report.applied += [name for name in prepared.applied if name != "memory_cgroup" or settings.memory_cgroup]
    report.missing.update(prepared.missing)
    close_other_fds(keep_fds)
    os.umask(0o077)  # files the worker creates are its own, even in a shared /tmp
    no_core_dumps()
    report.applied.append("session")

    in_bwrap = "bubblewrap" in report.applied
    shares = settings.memory_shares(in_bubblewrap=in_bwrap)
    is_root = os.geteuid() == 0
    drop = is_root and "uid_drop" in wanted and not in_bwrap
    pid_ns = prepared.pid_ns
    if "namespaces" not in wanted and "namespaces" not in report.applied:
        report.missing["namespaces"] = "switched off by Sandbox(layers=...)"
    mount_ns = pid_ns
    if "rlimits" in wanted and shares.scratch and "scratch_limit" not in report.applied:
        owner = UNPRIVILEGED_UID if drop else os.getuid()
        mount_ns = _bound_scratch(report, settings, shares.scratch, in_mount_ns=mount_ns, in_bwrap=in_bwrap, owner=owner)
    if drop:
        _attempt(report, "uid_drop", lambda: _drop_root(settings, in_mount_ns=mount_ns))
    elif is_root and "uid_drop" not in report.applied:
        report.missing["uid_drop"] = "switched off by Sandbox(layers=...)"
    nproc_base = 0
    if "rlimits" in wanted:
        nproc_base = _own_process_count(report, own_user_ns="namespaces" in wanted)
    if "landlock" in wanted:
        _attempt(report, "landlock", lambda: _landlock(settings))
    if "rlimits" in wanted:
        _attempt(report, "rlimits", lambda: _rlimits(settings, shares, report, nproc_base))
    if not _in_initial_user_namespace():
        # Every capability of the namespaces entered above (mounts and id maps are done): none left.
        _attempt(report, "no_capabilities", capabilities.drop_all)
    # Without a memory cgroup, the address-space bound holds only with seccomp's half of it.
    one_space = "rlimits" in wanted and shares.one_address_space
    if "seccomp" in wanted:
        installed = _attempt(
            report, "seccomp", lambda: seccomp.install(network=settings.network, memfds=not one_space, one_address_space=one_space)
        )
        if installed and one_space:
            report.applied.append("one_address_space")
    if one_space and "one_address_space" not in report.applied:
        report.missing["one_address_space"] = "needs seccomp: new processes and memfds escape memory_limit"
    for name in ("landlock", "rlimits", "seccomp"):
        if name not in wanted:
            report.missing[name] = "switched off by Sandbox(layers=...)"
    return report


def _attempt(report: Report, name: str, apply: Any) -> bool:
    try:
        result = apply()
    except Exception as exc:  # a layer the machine refuses: report it, go on with the others
        report.missing[name] = f"{type(exc).__name__}: {exc}"
        return False
    if isinstance(result, dict) and result.get("applied") is False:
        report.missing[name] = str(result.get("reason", "not applied"))
        return False
    report.applied.append(name)
    return True


def fork_into_pid_namespace(report: Report) -> None:
    """After unsharing a pid namespace here: fork its init (:func:`become_init`), and go on in
    the work it forks (pid 2). This process, left outside, waits and mirrors the work's end."""
    status_r, status_w = os.pipe()
    me = os.pidfd_open(os.getpid())
    init = os.fork()
    if init == 0:
        os.close(status_r)
        prepared = Prepared(Shape(True, True, False, None), pid_ns=True)
        become_init(prepared, status_w, me)
        report.missing.update(prepared.missing)
        return
    os.close(status_w)
    os.close(me)
    status = read_init_status(init, status_r)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 70)


def read_init_status(init: int, status_r: int, status: int | None = None) -> int:
    """The work's wait status as its init passed it up (reaping the init unless ``status`` is its
    status already); the init's own if it was killed before it could say."""
    if status is None:
        _, status = os.waitpid(init, 0)
    told = os.read(status_r, 32)  # nothing if init was killed first
    os.close(status_r)
    return int(told) if told.isdigit() else status


def join_memory_cgroup(folder: str) -> None:
    """Move this process into the memory cgroup the parent made for the call (every later child
    is born in it). Raises OSError: the parent counted on it, so the worker must not go on."""
    with open(os.path.join(folder, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def _bound_scratch(
    report: Report, settings: WorkerSettings, size: int, *, in_mount_ns: bool, in_bwrap: bool, owner: int
) -> bool:
    """Cover the scratch folder with a tmpfs of ``size`` bytes (``memory_shares``), owned by ``owner``.

    In the private mount namespace the namespaces layer made; as root without one, in a mount
    namespace made for it. Returns whether this process is in a private mount namespace now.
    Where none can be made the rlimits layer bounds each file instead (``_rlimits``).
    """
    scratch = settings.scratch_dir
    assert size, "the caller checks that a scratch size is set"
    try:
        if in_bwrap:
            raise OSError("this bubblewrap cannot size a tmpfs (--size needs bubblewrap 0.5)")
        if not in_mount_ns:
            if os.geteuid() != 0:
                raise OSError("no private mount namespace to mount it in (user namespaces are off or refused)")
            namespaces.enter(user=False, net=False, ipc=False, mount=True)
            in_mount_ns = True
        namespaces.mount_tmpfs(scratch, size, uid=owner, gid=owner)
        os.chdir(scratch)  # the working folder still was the folder the tmpfs now covers
    except Exception as exc:  # OSError from the kernel, RuntimeError from the mount namespace guard
        report.missing["scratch_limit"] = f"{exc}; each file is bounded to max_scratch_size instead, not their total"
    else:
        report.applied.append("scratch_limit")
    return in_mount_ns


def _own_process_count(report: Report, *, own_user_ns: bool) -> int:
    """Make RLIMIT_NPROC count the worker's own tasks; return how many it must allow on top.

    The kernel counts a uid's tasks per user namespace. Where the worker runs in the initial one
    (root dropped to 65534; bubblewrap's drop through setpriv) every other process of that uid,
    machine-wide, would count against the worker's limit: so it enters a user namespace of its
    own, where namespaces are wanted. Where that is refused or not wanted, the limit is raised
    by what the uid runs already (counted in /proc; racy, but never tighter than asked).
    """
    if os.geteuid() == 0:
        return 0  # exempt: the uid drop's report says so
    if not _in_initial_user_namespace():
        report.applied.append("own_process_count")  # the namespaces layer's, or bubblewrap's
        return 0
    if own_user_ns:
        try:
            namespaces.enter(user=True, net=False, ipc=False)
            report.applied.append("own_process_count")
            return 0
        except OSError as exc:
            reason = f"{exc}"
    else:
        reason = "switched off by Sandbox(layers=...)"
    report.missing["own_process_count"] = f"no user namespace of its own ({reason}): max_processes is on top of what its uid runs"
    return limits.tasks_of_uid(os.getuid())


def _in_initial_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def _drop_root(settings: WorkerSettings, *, in_mount_ns: bool) -> dict[str, Any]:
    uid = UNPRIVILEGED_UID
    blocked: dict[str, list[str]] = {}
    # The parent made the scratch folder uid's own, where uid can reach it (the system /tmp).
    for path in grants.worker_read_paths(settings.repo_dir, settings.extra_read_paths, settings.view_dir):
        top = limits.untraversable_ancestor(path, uid)
        if top is not None:
            blocked.setdefault(top, []).append(path)
    if blocked:
        if not in_mount_ns:
            namespaces.enter(user=False, net=False, ipc=False, mount=True)
        # Outermost first, so a folder hidden later is not under one hidden before.
        old_umask = os.umask(0o022)  # the folders made for the binds must be traversable by uid
        try:
            for top in sorted(blocked, key=len):
                namespaces.hide_and_rebind(top, blocked[top], read_only=True)
        finally:
            os.umask(old_umask)
    return limits.drop_privileges(uid)


def _landlock(settings: WorkerSettings) -> dict[str, Any]:
    read = grants.system_read_paths() + grants.worker_read_paths(settings.repo_dir, settings.extra_read_paths, settings.view_dir)
    return landlock.restrict(read, [os.path.realpath(settings.scratch_dir)], allow_tcp=settings.network)


def _rlimits(settings: WorkerSettings, shares: MemoryShares, report: Report, nproc_base: int = 0) -> dict[str, Any]:
    cpu = settings.cpu_time
    file_size = settings.max_file_size
    scratch = shares.scratch
    if scratch and "scratch_limit" not in report.applied:
        file_size = scratch if file_size is None else min(file_size, scratch)  # the fallback: per file
    processes = settings.max_processes
    applied = limits.apply_rlimits(
        memory_bytes=shares.address_space,
        cpu_seconds=None if cpu is None else max(1, int(cpu + 0.999)),
        max_processes=None if processes is None else processes + nproc_base,
        max_open_files=settings.max_open_files,
        max_file_size=file_size,
    )
    try:
        applied["torch_threads"] = limits.fit_torch_threads(processes)
    except Exception as exc:  # torch's own business: the limits above hold either way
        applied["torch_threads"] = f"not fitted: {type(exc).__name__}: {exc}"
    return applied
