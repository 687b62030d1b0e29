"""bubblewrap around a cold worker: its command line, whether it works here, and its probe.

Parent-only: the worker never runs bubblewrap, it runs inside it. The paths it binds are the
worker's read grants (``safehub._worker.grants``), the same ones Landlock grants inside. The
command line is made in two steps, as bubblewrap itself compiles its options into a list of
``SetupOp`` before it performs them: :func:`plan` decides who runs inside and every step of the
sandbox's file system (:class:`Plan`), :func:`render` writes it in bwrap's options.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._worker import grants

UNPRIVILEGED_UID = 65534  # "nobody": what a root parent drops its workers to
HOSTNAME = "safehub"  # the host name inside

_FEATURES: dict[str, dict[str, Any]] = {}


def bwrap_features(bwrap: str | None = None) -> dict[str, Any]:
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


TMPFS_SPECIALS = ("/proc", "/dev", "/tmp", "/dev/shm")  # made by bwrap itself, never as a bind's parent


@dataclass(frozen=True)
class SetupOp:
    """One step of the sandbox's file system, as bubblewrap performs it (its own ``SetupOp``)."""

    option: str  # bwrap's: --ro-bind, --bind, --symlink, --dir, --tmpfs, --proc, --dev
    dest: str
    source: str | None = None  # what is bound, or the symlink's target
    perms: str | None = None  # octal mode, where this bwrap has --perms
    size: int | None = None  # bytes of a tmpfs, where this bwrap has --size


@dataclass(frozen=True)
class Plan:
    """A sandbox to run a command in, decided; :func:`render` writes it as bwrap's command line."""

    bwrap: str
    ops: tuple[SetupOp, ...]  # in the order bwrap must perform them
    chdir: str
    network: bool
    uid: int | None = None  # the id seen inside a user namespace (None: the caller's)
    setpriv: str | None = None  # root drops to ``drop_uid`` through this setpriv: no user namespace
    drop_uid: int | None = None
    env: dict[str, str] | None = None  # None: the caller's environment stays


def bwrap_argv(
    repo_dir: str | os.PathLike[str],
    scratch_dir: str | os.PathLike[str],
    read_only_paths: Iterable[str | os.PathLike[str]] = (),
    network: bool = False,
    uid: int | None = None,
    *,
    python_prefixes: Iterable[str] | None = None,
    env: dict[str, str] | None = None,
    tmpfs_size: int | None = 256 * 1024 * 1024,
    scratch_size: int | None = None,
) -> list[str]:
    """A bubblewrap command line (ending with ``--``; append the worker's argv): :func:`plan`, then :func:`render`.

    The sandbox sees: the system folders (read-only), a few loader files of /etc, the Python
    installation (``python_prefixes``, by default this interpreter's prefixes and
    site-packages), ``read_only_paths``, the repository (read-only) and the scratch folder
    (read-write), each at its own path; a fresh /proc, a minimal /dev, and size-capped tmpfs on
    /tmp and /dev/shm. Nothing else of the host exists inside (no /root, /home, /work...).
    Namespaces: user (see below), ipc, pid, uts, cgroup (when possible), net unless
    ``network``. ``--die-with-parent`` and ``--new-session`` always.

    Root and not root behave differently (bwrap is not setuid here):

    - not root: bwrap must create a user namespace (implied); ``uid`` sets the id (and group)
      seen inside, the kernel's view stays the caller's uid. ``--disable-userns`` then forbids
      nested user namespaces.
    - root, no ``uid`` (or 0): ``--unshare-user --cap-drop ALL`` so the sandbox holds no
      capability: without a user namespace bwrap runs the command as full root, and without
      the drop, root of the new user namespace may remount the read-only binds read-write.
      The kernel still sees uid 0: RLIMIT_NPROC does not bind and root-owned 0600 files
      would be readable if bound in.
    - root with a ``uid``: bwrap's ``--uid`` only maps the inside id to the caller's real uid
      (0), which is no drop at all. So no user namespace is made, every capability but
      SETUID/SETGID/SETPCAP (and DAC_READ_SEARCH, for bwrap itself) is dropped, and ``setpriv``
      switches to ``uid`` (group the same), clears groups, the inheritable and bounding sets
      before exec'ing the command. Folders bwrap creates for bind targets are mode 0700 as
      root: they are made 0755 here so the dropped uid can traverse to the interpreter.

    Args:
        repo_dir: the repository folder, bound read-only.
        scratch_dir: the worker's writable folder (HOME, TMPDIR); also the working directory.
        read_only_paths: more paths to bind read-only (missing ones are skipped).
        network: keep the host network (adds resolv.conf and CA certificates).
        uid: the id the command runs as (see above).
        python_prefixes: folders of the interpreter to bind; default ``grants.python_read_paths()``.
        env: when given, ``--clearenv`` and one ``--setenv`` per item.
        tmpfs_size: bytes for /tmp and /dev/shm each (tmpfs pages escape RLIMIT_AS); None
            leaves bwrap's default (half of RAM).
        scratch_size: when given (and this bwrap has ``--size``), the scratch folder is not the
            host's folder but a tmpfs of this many bytes at its path: the workload's writes stay
            in memory, bounded, and vanish with the sandbox. Mode 0700 for the sandbox's own uid;
            1777 for a root caller that drops to ``uid`` (bwrap makes the tmpfs root's, and only
            the dropped uid runs inside). bwrap sets no inode limit: the kernel's default.

    Raises:
        FileNotFoundError: bwrap (or setpriv when needed) is not installed.
    """
    feats = bwrap_features()
    sandbox = plan(repo_dir, scratch_dir, read_only_paths, network, uid, feats=feats, python_prefixes=python_prefixes,
                   env=env, tmpfs_size=tmpfs_size, scratch_size=scratch_size)
    return render(sandbox, feats)


def plan(
    repo_dir: str | os.PathLike[str],
    scratch_dir: str | os.PathLike[str],
    read_only_paths: Iterable[str | os.PathLike[str]],
    network: bool,
    uid: int | None,
    *,
    feats: dict[str, Any],
    python_prefixes: Iterable[str] | None,
    env: dict[str, str] | None,
    tmpfs_size: int | None,
    scratch_size: int | None,
) -> Plan:
    """Decide the sandbox (who runs inside, and every step of its file system); see :func:`bwrap_argv`."""
    if feats.get("path") is None:
        raise FileNotFoundError(errno.ENOENT, "bubblewrap (bwrap) is not installed")
    drop = os.geteuid() == 0 and uid not in (None, 0)
    setpriv = None
    if drop:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise FileNotFoundError(errno.ENOENT, "setpriv (util-linux) is not installed")
        setpriv = os.path.realpath(setpriv)
    scratch = os.path.realpath(os.fspath(scratch_dir))
    mounts = _mounts(
        repo=os.path.realpath(os.fspath(repo_dir)),
        scratch=scratch,
        # A tmpfs at the scratch folder's path: 1777 when root drops to another uid inside.
        scratch_tmpfs=(int(scratch_size), "1777" if drop else "0700") if scratch_size and feats.get("size") else None,
        prefixes=grants.python_read_paths() if python_prefixes is None else [os.path.realpath(p) for p in python_prefixes],
        read_only_paths=[os.path.realpath(os.fspath(p)) for p in read_only_paths],
        network=network,
        setpriv=setpriv,
    )
    specials = (
        SetupOp("--proc", "/proc"),
        SetupOp("--dev", "/dev"),
        SetupOp("--tmpfs", "/tmp", perms="1777", size=tmpfs_size),
        SetupOp("--tmpfs", "/dev/shm", perms="1777", size=tmpfs_size),
    )
    return Plan(
        bwrap=feats["path"],
        ops=specials + tuple(_with_parents(mounts)),
        chdir=scratch,
        network=network,
        uid=None if drop else uid,
        setpriv=setpriv,
        drop_uid=uid if drop else None,
        env=env,
    )


def _mounts(*, repo: str, scratch: str, scratch_tmpfs: tuple[int, str] | None, prefixes: list[str],
            read_only_paths: list[str], network: bool, setpriv: str | None) -> dict[str, SetupOp]:
    """What the sandbox holds, by destination: the first step for a destination wins."""
    mounts: dict[str, SetupOp] = {}

    def add(op: SetupOp) -> None:
        mounts.setdefault(op.dest, op)

    def covered(path: str) -> bool:
        return any(path == dest or path.startswith(dest.rstrip("/") + "/") for dest in mounts)

    for d in grants.SYSTEM_DIRS:
        if os.path.islink(d):
            add(SetupOp("--symlink", d, source=os.readlink(d)))
        elif os.path.isdir(d):
            add(SetupOp("--ro-bind", d, source=d))
    for name in (*grants.ETC_FILES, *(grants.ETC_NETWORK if network else ())):
        if os.path.exists(f"/etc/{name}"):
            add(SetupOp("--ro-bind", f"/etc/{name}", source=os.path.realpath(f"/etc/{name}")))
    for path in [*sorted(set(prefixes), key=_components), *read_only_paths]:
        if os.path.exists(path) and not covered(path):
            add(SetupOp("--ro-bind", path, source=path))
    add(SetupOp("--ro-bind", repo, source=repo))
    if scratch_tmpfs is not None:
        size, mode = scratch_tmpfs
        add(SetupOp("--tmpfs", scratch, perms=mode, size=size))
    else:
        add(SetupOp("--bind", scratch, source=scratch))
    if setpriv and not covered(setpriv):
        add(SetupOp("--ro-bind", setpriv, source=setpriv))
    return mounts


def _with_parents(mounts: dict[str, SetupOp]) -> list[SetupOp]:
    """The mounts, each after the folders that lead to it, a folder before anything beneath it.

    The folders are made 0755 so a dropped uid can traverse them (bwrap creates them 0700
    otherwise) and so nothing of the host's layout is implied.
    """
    def covered(path: str) -> bool:
        return any(path == dest or path.startswith(dest.rstrip("/") + "/") for dest in mounts)

    parents = {
        "/" + "/".join(parts[:i])
        for parts in map(_components, mounts)
        for i in range(1, len(parts))
    }
    steps = [((_components(d), 0), SetupOp("--dir", d, perms="0755"))
             for d in parents if not covered(d) and d not in TMPFS_SPECIALS]
    steps += [((_components(dest), 1), op) for dest, op in mounts.items()]
    return [op for _, op in sorted(steps, key=lambda step: step[0])]


def render(sandbox: Plan, feats: dict[str, Any]) -> list[str]:
    """The plan as bwrap's command line (ending with ``--``, after setpriv's when root drops)."""
    argv = [sandbox.bwrap, "--die-with-parent", "--new-session"]
    if sandbox.setpriv is None:
        # --cap-drop ALL: as root, bwrap otherwise leaves the sandbox every capability of its
        # user namespace, enough to remount the read-only repository read-write (the kernel
        # uid is still 0, so the write then lands in the real file).
        argv += ["--unshare-user", "--cap-drop", "ALL"]
        if feats.get("disable_userns"):
            argv.append("--disable-userns")
        if sandbox.uid is not None:
            argv += ["--uid", str(sandbox.uid), "--gid", str(sandbox.uid)]
    else:
        # SETPCAP to empty the bounding set; DAC_READ_SEARCH so bwrap (root, otherwise
        # capability-less) can chdir into a scratch folder that is 0700 for the target uid.
        # setpriv's uid change clears every one of them before the command runs.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                 "--cap-add", "CAP_SETPCAP", "--cap-add", "CAP_DAC_READ_SEARCH"]
    argv += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--hostname", HOSTNAME, "--unshare-cgroup-try"]
    if not sandbox.network:
        argv.append("--unshare-net")
    for op in sandbox.ops:
        if op.perms is not None and feats.get("perms"):
            argv += ["--perms", op.perms]
        if op.size and feats.get("size"):
            argv += ["--size", str(int(op.size))]
        argv += [op.option, *([op.source] if op.source is not None else []), op.dest]
    argv += ["--chdir", sandbox.chdir]
    if sandbox.env is not None:
        argv.append("--clearenv")
        for key, value in sandbox.env.items():
            argv += ["--setenv", str(key), str(value)]
    argv.append("--")
    if sandbox.setpriv is not None:
        uid = sandbox.drop_uid
        argv += [sandbox.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--"]
    return argv


def _components(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


@functools.lru_cache(maxsize=1)
def bwrap_works() -> bool:
    """bubblewrap is installed and can make its namespaces here (checked once per process)."""
    with tempfile.TemporaryDirectory(prefix="safehub-bwrap-probe-") as scratch:
        try:
            argv = bwrap_argv(scratch, scratch, uid=UNPRIVILEGED_UID if os.geteuid() == 0 else None)
            done = subprocess.run(argv + [sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=20)
        except (OSError, ValueError, subprocess.SubprocessError):
            return False
    return done.returncode == 0


def probe() -> dict[str, Any]:
    """``{"available": bool, "detail": str}`` for ``safehub doctor``: bwrap found and able to run here."""
    path = shutil.which("bwrap")
    if path is None:
        return {"available": False, "detail": "bwrap not found on PATH (apt install bubblewrap)"}
    version = bwrap_features(path).get("version", "?")
    argv = [path, "--ro-bind", "/", "/", "--unshare-user", "--unshare-net", "--unshare-pid",
            "--proc", "/proc", "--dev", "/dev", "--die-with-parent", "--", "true"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"available": False, "detail": f"bwrap {version} at {path} did not run: {exc}"}
    if res.returncode != 0:
        return {"available": False, "detail": f"bwrap {version} at {path} failed: {res.stderr.strip()[:300]}"}
    setuid = bool(os.stat(path).st_mode & stat.S_ISUID)
    mode = "as root (drop inside via setpriv)" if os.geteuid() == 0 else "unprivileged (user namespace)"
    return {"available": True, "detail": f"bwrap {version} at {path}{' (setuid)' if setuid else ''}, {mode}"}
