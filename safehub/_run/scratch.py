"""Each call's private scratch folder (the worker's HOME, TMPDIR and working folder): made, removed, swept."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import psutil

from .._bwrap import UNPRIVILEGED_UID

SCRATCH_PREFIX = "safehub-worker-"


def sweep_stale(top: Path, prefix: str) -> None:
    """Remove the folders ``<prefix><pid>-...`` in ``top`` whose caller died before its cleanup ran.

    Only folders of this user (and, for root, of the uid its workers drop to); never a link.
    """
    mine = {os.geteuid(), UNPRIVILEGED_UID} if os.geteuid() == 0 else {os.geteuid()}
    try:
        names = [n for n in os.listdir(top) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        match = re.match(re.escape(prefix) + r"(\d+)-", name)
        path = top / name
        try:
            if not match or path.is_symlink() or path.stat().st_uid not in mine:
                continue  # another user's, or not one of ours
        except OSError:
            continue
        if not psutil.pid_exists(int(match.group(1))):
            remove_tree(path)


def sweep_stale_scratch() -> None:
    """Remove scratch folders whose caller died before its cleanup ran (killed, power cut)."""
    sweep_stale(Path(tempfile.gettempdir()), SCRATCH_PREFIX)


def remove_tree(path: Path) -> None:
    """Remove the scratch folder, even where the worker took permissions away (never follows links)."""
    for top, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(top, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def make_scratch(*, for_dropped_uid: bool) -> Path:
    """A new scratch folder, 0700 (mkdtemp): other local users can neither read nor plant files in it.

    The pid in its name lets a later call remove it if this process is killed first. For a worker
    that drops to the unprivileged uid, the folder is that uid's own, as its HOME must be.
    """
    sweep_stale_scratch()
    path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    if for_dropped_uid:
        os.chown(path, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    return path
