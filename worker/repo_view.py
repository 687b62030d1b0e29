"""The repository as the worker sees it: a private, writable view; the cache never changes.

Some repositories write into their own folder (snakers4/silero-models downloads its checkpoints
under ``src/silero/model/``). The cache is read-only to the worker, so the worker runs the
repository from a view in its scratch folder instead: every folder made anew (writable, the
worker's own), every file a symbolic link to the cache's file. Reading goes through the links;
a new file, or a file replaced by rename (what torch.hub's download does), lands in the view
only; writing into a linked file still fails, since the file behind it is the cache's.
"""

from __future__ import annotations

import os

VIEW_NAME = "repo"
MAX_ENTRIES = 50_000  # a tree larger than this runs from the cache itself, read-only


def writable_view(repo_dir: str, scratch_dir: str) -> str | None:
    """Build the view of ``repo_dir`` in ``scratch_dir``; return its path, or None if not made."""
    view = os.path.join(scratch_dir, VIEW_NAME)
    if os.path.lexists(view):
        return None
    count = 0
    try:
        for top, dirs, files in os.walk(repo_dir, onerror=_raise):
            relative = os.path.relpath(top, repo_dir)
            target = view if relative == "." else os.path.join(view, relative)
            os.mkdir(target, 0o755)
            for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                count += 1
                if count > MAX_ENTRIES:
                    raise OverflowError
                os.symlink(os.path.join(top, name), os.path.join(target, name))
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
    except (OSError, OverflowError):
        return None  # the repository then runs read-only from the cache, as before
    return view


def _raise(error: OSError) -> None:
    raise error
