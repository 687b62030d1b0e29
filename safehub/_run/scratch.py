"""Each call's private scratch folder (the worker's HOME, TMPDIR and working folder): made, removed, swept."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import _stale
from .._bwrap import UNPRIVILEGED_UID
from .._stale import sweepable_owners

SCRATCH_PREFIX = "safehub-worker-"


def sweep_stale_scratch() -> None:
    """Remove scratch folders whose caller died before its cleanup ran (killed, power cut)."""
    _stale.sweep(tempfile.gettempdir(), SCRATCH_PREFIX, sweepable_owners())


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
