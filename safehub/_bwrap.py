"""bubblewrap around a cold worker: its command line, whether it works here, and its probe.

Parent-only: the worker never runs bubblewrap, it runs inside it. The paths it binds are the
worker's read grants (``safehub._worker.grants``), the same ones Landlock grants inside.
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

from ._worker import grants

UNPRIVILEGED_UID = 65534  # "nobody": what a root parent drops its workers to

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
        python_prefixes: folders of the interpreter to bind; default ``grants.python_read_paths()``.
        env: when given, ``--clearenv`` and one ``--setenv`` per item.
        etc_overrides: ``{"passwd": path, ...}`` files bound on /etc/<name>.
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

    for d in grants.SYSTEM_DIRS:
        if os.path.islink(d):
            mounts.append((d, ["--symlink", os.readlink(d), d]))
            bound.append(d)
        elif os.path.isdir(d):
            bind(d)
    etc_names = list(grants.ETC_FILES) + (list(grants.ETC_NETWORK) if network else [])
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

    prefixes = grants.python_read_paths() if python_prefixes is None else [os.path.realpath(p) for p in python_prefixes]
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


def probe() -> dict:
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
