"""Folders left behind by a process that died before its cleanup ran (killed, out of memory, power cut).

Every work folder safehub makes carries the pid of its maker right after a fixed prefix
(``<prefix><pid><anything not a digit>…``): the cache's install folders in
``_cache.work_dir`` (``<pid>.<folder>.…``), the worker's scratch folders in the system
temporary folder (``safehub-worker-<pid>-…``). The next call that makes such a folder first
removes the ones whose maker is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Collection
from pathlib import Path

from ._bwrap import UNPRIVILEGED_UID


def sweepable_owners() -> set[int]:
    """The uids whose stale folders this process may remove: its own, and for root the workers' uid."""
    return {os.geteuid(), UNPRIVILEGED_UID} if os.geteuid() == 0 else {os.geteuid()}


def sweep(top: str | os.PathLike[str], prefix: str, owners: Collection[int]) -> list[Path]:
    """Remove each folder directly in ``top`` named ``<prefix><pid>…`` whose pid is dead; return them.

    Only real folders (``lstat``: a link named like one is never followed, nor removed) owned by
    one of the uids in ``owners`` are candidates: another user's folder, or one whose pid is still
    alive (or not ours to signal), is left alone. Each is removed with :func:`remove_tree`.
    A ``top`` that cannot be listed is a no-op.
    """
    top_dir = Path(top)
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    try:
        names = os.listdir(top_dir)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        match = pattern.match(name)
        if match is None:
            continue
        path = top_dir / name
        try:
            st = os.lstat(path)
        except OSError:
            continue  # removed meanwhile by someone else's sweep
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners or pid_alive(int(match.group(1))):
            continue
        remove_tree(path)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (ours or another user's). Not a pid at all counts as alive."""
    if pid <= 0:
        return True  # kill(0) and kill(-n) address process groups: never a folder's maker
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to another user
    except (OverflowError, OSError):
        return True  # not a pid this system can have: leave the folder alone
    return True


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove the folder ``path`` and everything under it, ignoring what cannot be removed.

    Works also where its contents took permissions away (a worker's ``chmod 000`` on a folder it
    made): every folder below is given back ``0o700`` first. Links are never followed: a link
    inside is removed as a link, and a ``path`` that is itself a link is not walked.
    """
    if not os.path.islink(path):
        _give_back_access(os.fspath(path))
    shutil.rmtree(path, ignore_errors=True)


def _give_back_access(root: str) -> None:
    with contextlib.suppress(OSError):
        os.chmod(root, 0o700)
    # Top-down: each folder is opened up before os.walk lists it.
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            child = os.path.join(dirpath, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
