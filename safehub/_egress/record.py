"""The record of one fetch, from the connection that made it up to the CLI's ``--json``.

The checked connection leaves a :class:`FetchRecord` on each response whose body it read whole;
the broker records what it served (with the cache's path, or from the cache with nothing fetched)
and hands its records to whoever is :func:`recording` (``safehub load --json``, ``safehub lock
--load``). Every record is logged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

_recorded: contextvars.ContextVar[list[FetchRecord] | None] = contextvars.ContextVar("safehub_fetches", default=None)


@dataclass(frozen=True, kw_only=True)
class FetchRecord:
    """One fetch: what was asked for, where it ended after redirects, what came, and from where.

    Attributes:
        kind: ``"get"`` (a body, as a connection reads it), ``"file"`` (a body kept in a
            checkpoints folder), ``"hf"`` (a file kept in the Hugging Face cache) or ``"repo"``
            (a nested repository).
        url: as asked; for a repository, ``owner/repo[:ref]``.
        final_url: after redirects (a repository's: as asked).
        size: bytes of the body (0 for a repository).
        sha256: of the body; for a repository, of its archive.
        cached: the cache had it, and nothing was fetched.
        path: where the parent keeps it ("" for a GET).
        commit_sha: a repository's commit, or the commit a Hub file was fetched at ("" otherwise).
        name, place: a file's name and checkpoints folder (``"hub/checkpoints"`` or
            ``"checkpoints"``), so ``safehub cache fill`` puts it back there ("" otherwise).
        hub_file: a Hugging Face Hub file (``kind="hf"``): repo_type, repo_id, revision, filename.
    """

    kind: str
    url: str
    final_url: str
    size: int
    sha256: str
    cached: bool = False
    path: str = ""
    commit_sha: str = ""
    name: str = ""
    place: str = ""
    hub_file: tuple[str, str, str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def recording() -> Iterator[list[FetchRecord]]:
    """Collect the fetches of every isolated call made inside the block (this thread or task)."""
    fetches: list[FetchRecord] = []
    token = _recorded.set(fetches)
    try:
        yield fetches
    finally:
        _recorded.reset(token)


def publish(records: Iterable[FetchRecord]) -> None:
    """Hand a call's records to the innermost :func:`recording` block, if there is one."""
    sink = _recorded.get()
    if sink is not None:
        sink.extend(records)
