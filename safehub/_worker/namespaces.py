"""Linux namespaces for the worker: entered directly (unshare) or through bubblewrap.

Standard library only (ctypes); the worker loads this file by path, so it imports nothing of
safehub.

Two ways in:

- :func:`enter` calls ``unshare(2)`` in the current process. ``CLONE_NEWUSER`` needs a
  single-threaded process (EINVAL otherwise): call it in a child forked from the zygote (a
  fork is single-threaded even when torch started threads in the parent), or in a cold worker
  before anything starts a thread. A user namespace makes the rest unprivileged: network, IPC,
  UTS, mount and pid namespaces then need no root.
- :func:`bwrap_argv` builds a bubblewrap command around a cold worker: an empty root on a
  tmpfs with only the system, the Python installation, the repository (read-only) and the
  scratch folder (read-write) bound in.

A new pid namespace applies to *children* only; :func:`run_as_pid1` forks the workload into it.

What a network namespace gives: only a loopback device, and down: ``connect`` to any address,
loopback included, fails with ENETUNREACH; nothing on the host's loopback is reachable.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import subprocess
import sys

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "bwrap_argv",
    "bwrap_features",
    "enter",
    "hide_and_rebind",
    "minimal_etc",
    "mount_tmpfs",
    "python_paths",
    "run_as_pid1",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = None
# The mount namespace this process (or the one it was forked from) left through enter(mount=True).
_mount_ns_left: int | None = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        for name in ("unshare", "mount", "prctl"):
            getattr(_libc, name).restype = ctypes.c_int
    return _libc


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter(
    user: bool = True,
    net: bool = True,
    ipc: bool = True,
    pid: bool = False,
    mount: bool = False,
    *,
    uts: bool = False,
    cgroup: bool = False,
    map_root: bool = False,
) -> dict:
    """Move this process into new namespaces, all with one ``unshare(2)``.

    Args:
        user: a new user namespace; the current uid/gid are mapped to themselves inside (or to
            0 with ``map_root``). Needed for the others unless the caller is root.
        net: a new network namespace: loopback only, and down.
        ipc: a new System V IPC / POSIX message queue namespace.
        pid: a new pid namespace *for the children*: see :func:`run_as_pid1`.
        mount: a new mount namespace, made private (nothing propagates back to the host).
        uts, cgroup: host name and cgroup view.
        map_root: map the current ids to 0 inside (the process then holds every capability of
            its own namespace; keep it off unless something inside must mount).

    Returns:
        A dict: ``applied``, ``namespaces`` (names entered), ``uid``/``gid`` inside,
        ``uid_map``.

    Raises:
        OSError: EINVAL (more than one thread and ``user``), EPERM (user namespaces disabled,
            or no privilege without ``user``), ENOSPC (user.max_user_namespaces reached).
    """
    flags = 0
    names = []
    for wanted, flag, name in (
        (user, CLONE_NEWUSER, "user"),
        (net, CLONE_NEWNET, "net"),
        (ipc, CLONE_NEWIPC, "ipc"),
        (pid, CLONE_NEWPID, "pid"),
        (mount, CLONE_NEWNS, "mount"),
        (uts, CLONE_NEWUTS, "uts"),
        (cgroup, CLONE_NEWCGROUP, "cgroup"),
    ):
        if wanted:
            flags |= flag
            names.append(name)
    if not flags:
        return {"applied": False, "namespaces": [], "reason": "nothing requested"}
    libc = _lib()
    uid, gid = os.getuid(), os.getgid()
    # After a uid change the kernel marks the process non-dumpable, which makes its /proc
    # files root's: the id maps below could not be written. Dumpable only for the window.
    dumpable = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    if user and dumpable == 0:
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    global _mount_ns_left
    try:
        if mount and _mount_ns_left is None:
            _mount_ns_left = os.stat("/proc/self/ns/mnt").st_ino
        _check(libc.unshare(flags), "unshare(" + "|".join(names) + ")")
        uid_map = ""
        if user:
            inside_uid, inside_gid = (0, 0) if map_root else (uid, gid)
            # setgroups must be denied before an unprivileged gid_map write; it also stops the
            # workload from dropping a supplementary group that denies it access.
            try:
                _write("/proc/self/setgroups", "deny")
            except FileNotFoundError:  # pragma: no cover - kernels before 3.19
                pass
            uid_map = f"{inside_uid} {uid} 1"
            _write("/proc/self/uid_map", uid_map + "\n")
            _write("/proc/self/gid_map", f"{inside_gid} {gid} 1\n")
        if mount:
            # Without this, mounts made inside could propagate back to the host's namespace.
            _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount(/, MS_PRIVATE)")
    finally:
        if user and dumpable == 0:
            libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    return {
        "applied": True,
        "namespaces": names,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "uid_map": uid_map,
    }


def run_as_pid1(target, *, mount_proc: bool = True) -> int:
    """Fork so that ``target()`` runs as pid 1 of the pid namespace :func:`enter` created.

    The child is pid 1: it calls ``target()`` (its return value, an int or None, is the exit
    code; an exception exits 70) and never returns here. The caller, left in the old pid
    namespace, waits and returns the child's wait status (as ``os.waitpid`` gives it).

    Why the workload itself is pid 1 rather than the child of a small init (bwrap's way):
    when pid 1 exits, the kernel SIGKILLs every other process of the namespace, so nothing the
    workload started can outlive it, with one process fewer and no reaper to write. The costs
    are accepted: signals sent from inside the namespace without a handler are ignored by pid 1
    (the parent kills it from outside, where SIGKILL works), and orphans re-parent to it and
    stay zombies until it exits (RLIMIT_NPROC bounds them).

    Args:
        target: a callable run in the child.
        mount_proc: mount a fresh ``/proc`` so the workload sees only its own namespace's
            processes (needs the mount namespace from ``enter(mount=True)``; without it the
            host's /proc, and so every host process, stays visible).

    Returns:
        The wait status of pid 1 (``os.waitstatus_to_exitcode`` turns it into a code).
    """
    # getppid() is 0 across a pid namespace boundary, so the parent's liveness is read from a
    # pipe instead: EOF means it died before the death signal was armed.
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            os.close(alive_w)
            libc = _lib()
            # If the worker dies, pid 1 dies, and with it the whole namespace.
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            import select

            if select.select([alive_r], [], [], 0)[0]:
                os._exit(70)
            os.close(alive_r)
            if mount_proc:
                # Never mount over the host's /proc: only in the namespace enter() made.
                if os.getpid() != 1:
                    raise RuntimeError("not pid 1 of a new pid namespace: call enter(pid=True, mount=True) first")
                _same_mount_namespace_guard()
                _check(
                    libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
                    "mount(/proc)",
                )
            result = target()
            code = 0 if result is None else int(result)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(alive_r)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(alive_w)
    return status


def _same_mount_namespace_guard() -> None:
    """Raise unless this process is in a mount namespace of its own (not the one it started in)."""
    try:
        mine = os.stat("/proc/self/ns/mnt").st_ino
        if _mount_ns_left is not None:
            # enter(mount=True) ran here or before a fork: its own record is the surest test,
            # also where the parent shares the new namespace (pid 2 under a namespace's init).
            theirs = _mount_ns_left
        else:
            theirs = os.stat(f"/proc/{os.getppid()}/ns/mnt").st_ino if os.getppid() > 0 else None
    except OSError:
        return  # the parent's namespace is not visible from here: it is not ours
    if theirs is not None and mine == theirs:
        raise RuntimeError("still in the parent's mount namespace: call enter(mount=True) first")


def hide_and_rebind(hide_dir: str, keep_paths, *, read_only: bool = True) -> dict:
    """In a private mount namespace, cover ``hide_dir`` with an empty tmpfs (mode 0755) and
    bind ``keep_paths`` (each beneath it) back in place.

    For a root parent that drops to an unprivileged uid without bubblewrap: the interpreter
    and the hub cache live under ``/root`` (mode 0700 here), which uid 65534 cannot traverse.
    Call after ``enter(mount=True)`` (or with ``user=False`` as root) and before
    ``limits.drop_privileges``. Needs CAP_SYS_ADMIN over the mount namespace.

    Returns:
        A dict: ``hidden`` and ``kept`` (paths bound back); missing keep paths are skipped.
    """
    libc = _lib()
    # A mistake here would cover the host's /root: refuse outside a private mount namespace.
    _same_mount_namespace_guard()
    hide_dir = os.path.realpath(hide_dir)
    fds = []
    try:
        for path in keep_paths:
            real = os.path.realpath(path)
            if real != hide_dir and not real.startswith(hide_dir.rstrip("/") + "/"):
                raise ValueError(f"{path!r} is not beneath {hide_dir!r}")
            try:
                fds.append((real, os.open(real, O_PATH | os.O_CLOEXEC)))
            except FileNotFoundError:
                continue
        _check(
            libc.mount(b"tmpfs", hide_dir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m"),
            f"mount(tmpfs, {hide_dir})",
        )
        kept = []
        for real, fd in fds:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(real, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(real), mode=0o755, exist_ok=True)
                os.close(os.open(real, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            src = f"/proc/self/fd/{fd}".encode()
            _check(libc.mount(src, real.encode(), None, MS_BIND | MS_REC, None), f"bind {real}")
            if read_only:
                _check(
                    libc.mount(None, real.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None),
                    f"remount {real} read-only",
                )
            kept.append(real)
    finally:
        for _, fd in fds:
            os.close(fd)
    return {"hidden": hide_dir, "kept": kept}


def mount_tmpfs(path: str, size: int, *, uid: int, gid: int, mode: int = 0o700, inodes: int | None = None) -> dict:
    """In a private mount namespace, mount a tmpfs of ``size`` bytes over the folder ``path``.

    For the worker's scratch folder: whatever was in the folder is covered (the new one is
    empty), writes past ``size`` bytes or ``inodes`` files fail with ENOSPC, and the pages live
    in memory until the last process of the namespace is gone. Owned by ``uid``/``gid`` with
    ``mode``, so a worker that drops to ``uid`` next can write it. Processes whose working
    folder was ``path`` still stand in the covered folder: they must ``chdir`` again. Needs
    CAP_SYS_ADMIN over the mount namespace (root, or a user namespace's).

    Returns:
        A dict: ``path``, ``size``, ``inodes``.
    """
    libc = _lib()
    _same_mount_namespace_guard()  # never over the host's folder
    real = os.path.realpath(path)
    inodes = inodes if inodes is not None else max(4096, size // 4096)
    options = f"size={int(size)},nr_inodes={int(inodes)},mode={mode:o},uid={int(uid)},gid={int(gid)}"
    # No MS_NOEXEC: torch.compile's C++ backend writes shared objects into TMPDIR and loads them.
    _check(libc.mount(b"tmpfs", real.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()), f"mount(tmpfs, {real})")
    return {"path": real, "size": int(size), "inodes": int(inodes)}


# --- bubblewrap ---------------------------------------------------------------------------------
_FEATURES: dict[str, dict] = {}


def bwrap_features(bwrap: str | None = None) -> dict:
    """Version and option support of a bwrap binary (cached): ``path``, ``version``,
    ``disable_userns``, ``perms``, ``size``. ``path`` is None when bwrap is not installed."""
    path = bwrap or shutil.which("bwrap")
    if path is None:
        return {"path": None}
    if path in _FEATURES:
        return _FEATURES[path]
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
        helptext = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {"path": None}
    feats = {
        "path": path,
        "version": version.split()[-1] if version else "",
        "disable_userns": "--disable-userns" in helptext,
        "perms": "--perms" in helptext,
        "size": "--size" in helptext,
    }
    _FEATURES[path] = feats
    return feats


def python_paths() -> list[str]:
    """The running interpreter's installation, as real paths: prefixes and site-packages."""
    import site

    paths = [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix]
    try:
        paths += site.getsitepackages()
    except AttributeError:  # pragma: no cover
        pass
    if sys.executable:
        paths.append(os.path.dirname(os.path.realpath(sys.executable)))
    out = []
    for p in paths:
        p = os.path.realpath(p)
        if os.path.isdir(p) and p not in out:
            out.append(p)
    return out


def minimal_etc(etc_dir: str, uid: int, gid: int, *, user: str = "safehub") -> dict:
    """Write a one-user ``passwd`` and ``group`` into ``etc_dir``; pass the result as
    ``bwrap_argv(etc_overrides=...)`` so ``pwd``/``getpass`` work without the host's lists."""
    os.makedirs(etc_dir, exist_ok=True)
    files = {
        "passwd": f"{user}:x:{uid}:{gid}:{user}:/nonexistent:/usr/sbin/nologin\n",
        "group": f"{user}:x:{gid}:\n",
    }
    out = {}
    for name, text in files.items():
        path = os.path.join(etc_dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        out[name] = path
    return out


_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "hosts", "host.conf")
_ETC_NETWORK = ("resolv.conf", "gai.conf", "ssl", "ca-certificates", "ca-certificates.conf", "pki")


def _components(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def bwrap_argv(
    repo_dir,
    scratch_dir,
    read_only_paths=(),
    network: bool = False,
    uid: int | None = None,
    gid: int | None = None,
    *,
    python_prefixes=None,
    env: dict | None = None,
    etc_overrides: dict | None = None,
    drop_via: str = "setpriv",
    tmpfs_size: int | None = 256 * 1024 * 1024,
    scratch_size: int | None = None,
    hostname: str = "safehub",
    bwrap: str | None = None,
) -> list[str]:
    """A bubblewrap command line (ending with ``--``; append the worker's argv).

    The sandbox sees: the system folders (read-only), a few loader files of /etc, the Python
    installation (``python_prefixes``, by default this interpreter's prefixes and
    site-packages), ``read_only_paths``, the repository (read-only) and the scratch folder
    (read-write), each at its own path; a fresh /proc, a minimal /dev, and size-capped tmpfs on
    /tmp and /dev/shm. Nothing else of the host exists inside (no /root, /home, /work...).
    Namespaces: user (see below), ipc, pid, uts, cgroup (when possible), net unless
    ``network``. ``--die-with-parent`` and ``--new-session`` always.

    Root and not root behave differently (bwrap is not setuid here):

    - not root: bwrap must create a user namespace (implied); ``uid``/``gid`` set the ids seen
      inside, the kernel's view stays the caller's uid. ``--disable-userns`` then forbids
      nested user namespaces.
    - root, no ``uid`` (or 0): ``--unshare-user --cap-drop ALL`` so the sandbox holds no
      capability: without a user namespace bwrap runs the command as full root, and without
      the drop, root of the new user namespace may remount the read-only binds read-write.
      The kernel still sees uid 0: RLIMIT_NPROC does not bind and root-owned 0600 files
      would be readable if bound in.
    - root with a ``uid``: bwrap's ``--uid`` only maps the inside id to the caller's real uid
      (0), which is no drop at all. So with ``drop_via="setpriv"`` (default) no user namespace
      is made, every capability but SETUID/SETGID/SETPCAP is dropped, and ``setpriv`` switches
      to ``uid``/``gid``, clears groups, the inheritable and bounding sets before exec'ing the
      command. ``drop_via="caller"`` leaves the same capabilities and expects the worker to
      call ``limits.drop_privileges`` before running any repository code.
      ``drop_via="userns"`` uses ``--unshare-user --uid`` (cosmetic: kernel uid stays 0).
      Folders bwrap creates for bind targets are mode 0700 as root: they are made 0755 here
      so the dropped uid can traverse to the interpreter.

    Args:
        repo_dir: the repository folder, bound read-only.
        scratch_dir: the worker's writable folder (HOME, TMPDIR); also the working directory.
        read_only_paths: more paths to bind read-only (missing ones are skipped).
        network: keep the host network (adds resolv.conf and CA certificates).
        uid, gid: ids for the workload (gid defaults to uid).
        python_prefixes: folders of the interpreter to bind; default :func:`python_paths`.
        env: when given, ``--clearenv`` and one ``--setenv`` per item.
        etc_overrides: ``{"passwd": path, ...}`` files bound on /etc/<name>
            (see :func:`minimal_etc`).
        drop_via: "setpriv", "caller" or "userns", for a root caller with a ``uid``.
        tmpfs_size: bytes for /tmp and /dev/shm each (tmpfs pages escape RLIMIT_AS); None
            leaves bwrap's default (half of RAM).
        scratch_size: when given (and this bwrap has ``--size``), the scratch folder is not the
            host's folder but a tmpfs of this many bytes at its path: the workload's writes stay
            in memory, bounded, and vanish with the sandbox. Mode 0700 for the sandbox's own uid;
            1777 for a root caller that drops to ``uid`` (bwrap makes the tmpfs root's, and only
            the dropped uid runs inside). bwrap sets no inode limit: the kernel's default.
        hostname: the host name inside.
        bwrap: the bwrap binary; default from PATH.

    Raises:
        FileNotFoundError: bwrap (or setpriv when needed) is not installed.
        ValueError: an unknown ``drop_via``.
    """
    feats = bwrap_features(bwrap)
    if feats.get("path") is None:
        raise FileNotFoundError(errno.ENOENT, "bubblewrap (bwrap) is not installed")
    if drop_via not in ("setpriv", "caller", "userns"):
        raise ValueError(f"drop_via must be 'setpriv', 'caller' or 'userns', not {drop_via!r}")
    is_root = os.geteuid() == 0
    if gid is None and uid is not None:
        gid = uid
    drop = is_root and uid not in (None, 0)
    setpriv = None
    if drop and drop_via == "setpriv":
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise FileNotFoundError(errno.ENOENT, "setpriv (util-linux) is not installed; use drop_via='caller'")
        setpriv = os.path.realpath(setpriv)
    userns = not (drop and drop_via in ("setpriv", "caller"))

    argv = [feats["path"], "--die-with-parent", "--new-session"]
    if userns:
        # --cap-drop ALL: as root, bwrap otherwise leaves the sandbox every capability of its
        # user namespace, enough to remount the read-only repository read-write (the kernel
        # uid is still 0, so the write then lands in the real file).
        argv += ["--unshare-user", "--cap-drop", "ALL"]
        if feats.get("disable_userns"):
            argv.append("--disable-userns")
        if uid is not None:
            argv += ["--uid", str(uid), "--gid", str(gid)]
    else:
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        if setpriv:
            # SETPCAP to empty the bounding set; DAC_READ_SEARCH so bwrap (root, otherwise
            # capability-less) can chdir into a scratch folder that is 0700 for the target uid.
            # setpriv's uid change clears every one of them before the command runs.
            argv += ["--cap-add", "CAP_SETPCAP", "--cap-add", "CAP_DAC_READ_SEARCH"]
    argv += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--hostname", hostname, "--unshare-cgroup-try"]
    if not network:
        argv.append("--unshare-net")

    # (destination, op, source): sorted so that a folder is set up before what lies beneath it.
    mounts: list[tuple[str, list[str]]] = []
    bound: list[str] = []

    def bind(src: str, dest: str | None = None, *, rw: bool = False) -> None:
        dest = dest or src
        if dest in bound:
            return
        mounts.append((dest, ["--bind" if rw else "--ro-bind", src, dest]))
        bound.append(dest)

    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            mounts.append((d, ["--symlink", os.readlink(d), d]))
            bound.append(d)
        elif os.path.isdir(d):
            bind(d)
    etc_names = list(_ETC_FILES) + (list(_ETC_NETWORK) if network else [])
    overrides = dict(etc_overrides or {})
    for name in etc_names:
        if name in overrides:
            continue
        if os.path.exists(f"/etc/{name}"):
            bind(os.path.realpath(f"/etc/{name}"), f"/etc/{name}")
    for name, path in overrides.items():
        bind(os.fspath(path), f"/etc/{name}")

    def covered(path: str) -> bool:
        return any(path == b or path.startswith(b.rstrip("/") + "/") for b in bound)

    prefixes = python_paths() if python_prefixes is None else [os.path.realpath(p) for p in python_prefixes]
    for p in sorted(set(prefixes), key=_components):
        if os.path.exists(p) and not covered(p):
            bind(p)
    for p in read_only_paths or ():
        p = os.path.realpath(os.fspath(p))
        if os.path.exists(p) and not covered(p):
            bind(p)
    repo = os.path.realpath(os.fspath(repo_dir))
    scratch = os.path.realpath(os.fspath(scratch_dir))
    bind(repo)
    if scratch_size and feats.get("size"):
        mode = "1777" if drop else "0700"
        mounts.append((scratch, (["--perms", mode] if feats.get("perms") else []) + ["--size", str(int(scratch_size)), "--tmpfs", scratch]))
        bound.append(scratch)
    else:
        bind(scratch, rw=True)
    if setpriv and not covered(setpriv):
        bind(setpriv)

    # The folders leading to each target: made 0755 so a dropped uid can traverse them (bwrap
    # creates them 0700 otherwise) and so nothing of the host's layout is implied.
    specials = ["/proc", "/dev", "/tmp", "/dev/shm"]
    dirs: set[str] = set()
    for dest, _ in mounts:
        parts = _components(dest)
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if not covered(parent) and parent not in specials:
                dirs.add(parent)
    ops: list[tuple[tuple[str, ...], int, list[str]]] = []
    perms = ["--perms", "0755"] if feats.get("perms") else []
    for d in dirs:
        ops.append((_components(d), 0, perms + ["--dir", d]))
    for dest, op in mounts:
        ops.append((_components(dest), 1, op))
    ops.sort(key=lambda item: (item[0], item[1]))

    argv += ["--proc", "/proc", "--dev", "/dev"]
    size = ["--size", str(int(tmpfs_size))] if (tmpfs_size and feats.get("size")) else []
    sticky = ["--perms", "1777"] if feats.get("perms") else []
    argv += sticky + size + ["--tmpfs", "/tmp"]
    argv += sticky + size + ["--tmpfs", "/dev/shm"]
    for _, _, op in ops:
        argv += op
    argv += ["--chdir", scratch]
    if env is not None:
        argv.append("--clearenv")
        for key, value in env.items():
            argv += ["--setenv", str(key), str(value)]
    argv.append("--")
    if setpriv:
        argv += [
            setpriv,
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]
    return argv
