"""The torch.hub-compatible functions: orchestration of parse → trust → resolve → fetch → run.

Each step lives in its own module; this one only decides which steps a call needs and in what
order. Trust is checked before any network request, so an untrusted repository in CI fails at
once and costs nothing.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _cache, _fetch, _log, _pins, _refs, _tree, _trust, constants
from ._run import returns as _returns
from ._run.replicas import check_replicas
from ._worker import hubconf as _hubconf
from .errors import (
    DamagedCacheError,
    EntrypointNotFoundError,
    HubconfError,
    HubconfNotFoundError,
    InvalidArgumentError,
    LockFileError,
    MissingDependenciesError,
    RemoteError,
)

_TRUST_ARG_DOC = """trust_repo (bool or str): ``"check"``, ``True`` or ``False``. Asked only when the
            repository's code would run outside a sandbox (``isolate=False``, or
            ``returns="object"``).

            - If ``False``, a prompt will ask the user whether the repo should be trusted.
            - If ``True``, the repo will be added to the trusted list and loaded without
              requiring explicit confirmation.
            - If ``"check"``, the repo will be checked against the list of trusted repos in the
              cache. If it is not present in that list, the behaviour will fall back onto the
              ``trust_repo=False`` option.

            With no terminal on standard input, a prompt is replaced by
            :class:`~safehub.errors.UntrustedRepoError`. Default is ``"check"``."""


_SKIP_ARG_DOC = """skip_validation (bool, optional): if ``False``, safehub resolves the ref through
            the GitHub API and checks that the commit belongs to the repository itself and not to
            a fork (set ``GITHUB_TOKEN`` for a higher rate limit). If ``True``, as torch.hub: no
            API request and no token; the archive of the ref is downloaded from the web host and
            its commit read from the archive's zip comment (an archive without one is cached with
            an unknown commit, and a warning). With no ref, the default branch is torch.hub's
            guess: ``main`` if it exists, else ``master``. A folder already cached for the ref is
            reused unless ``force_reload``, whichever way it was fetched. Default is ``False``."""


def _sandbox_of(isolate: object) -> Any:
    """None for an in-process call, else the Sandbox to run in."""
    if isolate is False or isolate is None:
        return None
    from ._sandbox import Sandbox

    if isolate is True:
        return Sandbox()
    if isinstance(isolate, Sandbox):
        return isolate
    raise InvalidArgumentError(f"isolate must be True, False or a safehub.Sandbox, not {isolate!r}.")


def _check_source(source: object) -> str:
    value = source.lower() if isinstance(source, str) else source
    if value not in ("github", "local"):
        raise InvalidArgumentError(f'Unknown source: "{source}". Allowed values: "github" | "local".')
    return value


def _local_dir(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"With source='local', pass a folder path, not {path!r}.")
    repo_dir = Path(path)
    if not repo_dir.is_dir():
        raise HubconfNotFoundError(f"No such folder: {repo_dir}; with source='local', pass the folder that holds "
                                   f"{constants.MODULE_HUBCONF}.", repo_dir=str(repo_dir))
    if not (repo_dir / constants.MODULE_HUBCONF).is_file():
        raise HubconfNotFoundError(f"{repo_dir} has no {constants.MODULE_HUBCONF}; pass the folder that holds it.",
                                   repo_dir=str(repo_dir))
    return repo_dir


def _repo_dir(
    repo_or_dir: object,
    source: str,
    *,
    trust_repo: object,
    trust_needed: bool,
    force_reload: bool,
    verbose: bool,
    skip_validation: bool,
    lock: str | os.PathLike[str] | None = None,
) -> tuple[Path, _cache.CacheEntry | None]:
    """The repository's folder, and its cache entry (None for a local folder)."""
    if source == "local":
        # torch.hub never asks trust for a local folder: the caller already has its code.
        _trust.validate(trust_repo)
        if lock is not None:
            raise InvalidArgumentError("A lock file pins GitHub repositories; it does not apply to source='local'.")
        return _local_dir(repo_or_dir), None
    repo_ref = _refs.parse(repo_or_dir)
    _trust.check(repo_ref.owner, repo_ref.repo, trust_repo, needed=trust_needed)
    entry = _fetch.entry_for(repo_ref, force_reload=force_reload, verbose=verbose,
                             skip_validation=skip_validation, lock=lock)
    return entry.repo_dir, entry


# Failures a changed cached tree can cause (a module missing, a file broken), in the worker or here.
_TREE_FAILURES = (RemoteError, HubconfError, ImportError, SyntaxError, NameError, AttributeError, FileNotFoundError)


@contextlib.contextmanager
def _blaming_a_damaged_tree(entry: _cache.CacheEntry | None) -> Iterator[None]:
    """A load of a cached tree that fails because the tree changed since it was fetched says so,
    naming the folder and the cure, rather than showing only what broke (``No module named ...``)."""
    try:
        yield
    except _TREE_FAILURES as exc:
        if entry is None or isinstance(exc, DamagedCacheError):
            raise
        if entry.shared or not _cache.hub_is_writable():
            changed = not entry.tree_matches()  # a read-only hub dir: no install can be under way (digest of the record's own format)
        else:
            with _cache.locked(entry.folder):  # never hash a tree an install is replacing
                changed = not entry.tree_matches()
        if not changed:
            raise
        label = f"{entry.owner}/{entry.repo}:{entry.ref}"
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise DamagedCacheError(
            f"The cached tree of {label} in {entry.repo_dir} changed since it was fetched (a file edited, "
            f"added or removed), and loading it failed: {first_line}. Fetch it again with force_reload=True.",
            path=str(entry.repo_dir), repo=label,
        ) from exc


def _isolated(repo_dir: Path, action: str, *, sandbox: Any, mode: _returns.Mode | None, lock: Any, **call: Any) -> Any:
    """Run ``action`` in a worker, with a broker serving what the repository fetches.

    ``mode``: a load's ``returns`` mode; None for a list or help, which bring no code back.
    """
    from ._run import run_isolated
    from ._egress.broker import Broker

    def nested(args: dict[str, Any]) -> _cache.CacheEntry:
        # A nested repository's code reaches this process only inside an object result (which
        # may hold anything its modules made). Its own trust_repo is the repository's word, not
        # the caller's: never taken as trust.
        repo_ref = _refs.parse(args.get("github"))
        _trust.check(repo_ref.owner, repo_ref.repo, "check", needed=_returns.trust_needed(True, mode))
        # With a lock, a nested repository must be pinned in it too, like the outer one.
        return _fetch.entry_for(repo_ref, force_reload=bool(args.get("force_reload")), verbose=False,
                                skip_validation=bool(args.get("skip_validation")), lock=lock)

    file_pins = _pins.read_files(lock) if lock is not None else None
    granted = _granted_files(file_pins)
    if granted:
        # Files the lock pins that a hub dir already holds: the worker may read them in place
        # (a read-only hub dir's cannot be hard-linked into the call's view).
        sandbox = dataclasses.replace(sandbox, extra_read_paths=(*sandbox.extra_read_paths, *sorted(granted)))
    hub_pins = _pins.read_hub(lock) if lock is not None else None
    with Broker(sandbox, nested=nested, file_pins=file_pins, hub_pins=hub_pins, granted=granted) as broker:
        if os.geteuid() == 0 and "uid_drop" in sandbox.wanted_layers() and not _others_can_read(repo_dir):
            # The worker drops to an unprivileged uid, which a private folder (mkdtemp's 0700)
            # keeps out: it gets a readable copy of the tree in its view, the folder stays as it is.
            _log.info(f"{repo_dir} is private to root: the sandbox reads a copy of it")
            repo_dir = broker.view.add_tree(Path(repo_dir), f"local-{Path(repo_dir).name}")
        if mode is not None:
            call["returns"] = mode.name
        return run_isolated(repo_dir, action, sandbox=sandbox, asks=broker.handlers(), view_dir=broker.view.root, **call)


def _granted_files(file_pins: dict[str, _pins.FilePin] | None) -> frozenset[str]:
    """Real paths of the cached files a lock file pins (each layer's copy the broker would serve)."""
    if not file_pins:
        return frozenset()
    found = set()
    for url, pin in file_pins.items():
        name = pin.name or _pins.default_file_name(url)
        if not name:
            continue
        for place in ([pin.place] if pin.place else ["hub/checkpoints", "checkpoints"]):
            path = _cache.find_checkpoint(place, name)
            if path is not None:
                found.add(os.path.realpath(path))
    return frozenset(found)


def _others_can_read(tree: Path, limit: int = 100_000) -> bool:
    """Whether a user other than the owner can read every file and folder of ``tree`` (by mode bits)."""
    for count, (top, _dirs, files) in enumerate(os.walk(tree)):
        if count > limit or os.stat(top).st_mode & 0o005 != 0o005:
            return False
        for name in files:
            with contextlib.suppress(OSError):
                if not os.lstat(os.path.join(top, name)).st_mode & 0o004:
                    return False
    return True


def pin(github: str, *, skip_validation: bool = False, force_reload: bool = False) -> tuple[str, _pins.Pin]:
    """Resolve and fetch ``github`` (no code runs, no trust needed); return its lock file entry."""
    repo_ref = _refs.parse(github)
    entry = _fetch.entry_for(repo_ref, force_reload=force_reload, verbose=False, skip_validation=skip_validation)
    if entry.commit_sha == _cache.UNKNOWN_COMMIT:
        raise LockFileError(
            f"Cannot pin {repo_ref}: its cached archive (fetched with skip_validation) named no commit. "
            "Fetch it again with validation: `safehub lock --force-reload` without --skip-validation.",
            path=None,
            repo=str(repo_ref),
        )
    if not entry.tree_matches():
        # What is pinned is what the archive extracts to, never a tree changed since.
        _log.warning(f"The cached tree of {repo_ref} changed since it was fetched; fetching it again to pin it.")
        entry = _fetch.entry_for(repo_ref, force_reload=True, verbose=False, skip_validation=skip_validation)
    tree_sha256 = entry.tree_sha256 if entry.tree_format == _tree.FORMAT else _cache.tree_manifest(entry.repo_dir).digest
    return str(repo_ref), _pins.Pin(entry.ref, entry.commit_sha, entry.archive_sha256, tree_sha256)


def _import_in_process(repo_dir: Path) -> Any:
    try:
        return _hubconf.import_hubconf(str(repo_dir))
    except _hubconf.HubconfUnreadable as exc:
        raise HubconfError(str(exc), repo_dir=str(repo_dir)) from None
    except _hubconf.HubconfMissing as exc:
        raise HubconfNotFoundError(str(exc), repo_dir=str(repo_dir)) from None


def _entry_in_process(module: Any, model: object) -> Any:
    try:
        return _hubconf.get_entrypoint(module, model)
    except TypeError as exc:
        raise InvalidArgumentError(str(exc)) from None
    except _hubconf.MissingDependencies as exc:
        raise MissingDependenciesError(str(exc), missing=exc.missing) from None
    except _hubconf.EntrypointNotFound as exc:
        raise EntrypointNotFoundError(str(exc), model=exc.model, suggestions=exc.suggestions) from None


def list(  # noqa: A001 - torch.hub's name
    github: str,
    force_reload: bool = False,
    skip_validation: bool = False,
    trust_repo: bool | str = "check",
    verbose: bool = True,
    *,
    source: str = "github",
    isolate: Any = False,
    lock: str | os.PathLike[str] | None = None,
) -> builtins.list[str]:  # builtins: this module's own list() shadows it
    r"""List all callable entrypoints available in the repo specified by ``github``.

    Args:
        github (str): a string with format "repo_owner/repo_name[:ref]" with an optional
            ref (tag, branch or commit SHA). If ``ref`` is not specified, the repository's default
            branch is used (asked from GitHub's API, not guessed). Example: 'pytorch/vision:0.10'.
            With ``source="local"``, a folder holding a ``hubconf.py``.
        force_reload (bool, optional): whether to discard the existing cache and force a fresh
            download. Default is ``False``.
        {skip}
        {trust}
        verbose (bool, optional): If ``False``, mute messages about hitting local caches.
            Default is ``True``.
        source (str, optional): ``"github"`` or ``"local"``. Default is ``"github"``.
        isolate (bool or Sandbox, optional): run ``hubconf.py`` in a sandboxed worker instead of
            this process; then no trust is needed. Default is ``False``.
        lock (path, optional): a lock file (``safehub lock``); the repository must have an entry
            there, and only the pinned commit with the pinned archive sha256 is used.

    Returns:
        list: The available callables entrypoint

    Raises:
        InvalidRefError: ``github`` is not a valid ``owner/repo[:ref]``.
        UntrustedRepoError: trust was needed and not given.
        GitHubError: GitHub could not be reached or refused (rate limit, auth, not found).

    Example:
        >>> entrypoints = safehub.list("pytorch/vision", isolate=True)  # doctest: +SKIP
    """
    source = _check_source(source)
    sandbox = _sandbox_of(isolate)
    repo_dir, entry = _repo_dir(
        github, source, trust_repo=trust_repo, trust_needed=_returns.trust_needed(sandbox is not None),
        force_reload=force_reload, verbose=verbose, skip_validation=skip_validation, lock=lock,
    )
    with _blaming_a_damaged_tree(entry):
        if sandbox is not None:
            return _isolated(repo_dir, "list", sandbox=sandbox, mode=None, lock=lock)
        with _hubconf.prepended_sys_path(str(repo_dir)):
            module = _import_in_process(repo_dir)
        return _hubconf.list_entrypoints(module)


def help(  # noqa: A001 - torch.hub's name
    github: str,
    model: str,
    force_reload: bool = False,
    skip_validation: bool = False,
    trust_repo: bool | str = "check",
    *,
    source: str = "github",
    isolate: Any = False,
    lock: str | os.PathLike[str] | None = None,
) -> str | None:
    r"""Show the docstring of entrypoint ``model``.

    Args:
        github (str): a string with format <repo_owner/repo_name[:ref]> with an optional
            ref (a tag, a branch or a commit SHA). Example: 'pytorch/vision:0.10'.
        model (str): a string of entrypoint name defined in repo's ``hubconf.py``
        force_reload (bool, optional): whether to discard the existing cache and force a fresh
            download. Default is ``False``.
        {skip}
        {trust}
        source (str, optional): ``"github"`` or ``"local"``. Default is ``"github"``.
        isolate (bool or Sandbox, optional): read the docstring in a sandboxed worker; then no
            trust is needed. Default is ``False``.
        lock (path, optional): a lock file (``safehub lock``); the repository must have an entry
            there, and only the pinned commit with the pinned archive sha256 is used.

    Returns:
        str or None: the entrypoint's docstring.

    Raises:
        EntrypointNotFoundError: ``hubconf.py`` has no callable ``model``.
        MissingDependenciesError: modules named in ``dependencies`` are not installed.

    Example:
        >>> print(safehub.help("pytorch/vision", "resnet18", isolate=True))  # doctest: +SKIP
    """
    source = _check_source(source)
    sandbox = _sandbox_of(isolate)
    repo_dir, entry = _repo_dir(
        github, source, trust_repo=trust_repo, trust_needed=_returns.trust_needed(sandbox is not None),
        force_reload=force_reload, verbose=True, skip_validation=skip_validation, lock=lock,
    )
    with _blaming_a_damaged_tree(entry):
        if sandbox is not None:
            return _isolated(repo_dir, "help", model=model, sandbox=sandbox, mode=None, lock=lock)
        with _hubconf.prepended_sys_path(str(repo_dir)):
            module = _import_in_process(repo_dir)
        return _entry_in_process(module, model).__doc__


def load(
    repo_or_dir: str,
    model: str,
    *args: Any,
    source: str = "github",
    trust_repo: bool | str = "check",
    force_reload: bool = False,
    verbose: bool = True,
    skip_validation: bool = False,
    isolate: Any = False,
    returns: str = "object",
    lock: str | os.PathLike[str] | None = None,
    replicas: int = 1,
    **kwargs: Any,
) -> Any:
    r"""Load a model from a github repo or a local directory.

    Note: Loading a model is the typical use case, but this can also be used to for loading
    other objects such as tokenizers, loss functions, etc.

    If ``source`` is 'github', ``repo_or_dir`` is expected to be of the form
    ``repo_owner/repo_name[:ref]`` with an optional ref (a tag, a branch or a commit SHA).

    If ``source`` is 'local', ``repo_or_dir`` is expected to be a path to a local directory.

    Args:
        repo_or_dir (str): If ``source`` is 'github', this should correspond to a github repo
            with format ``repo_owner/repo_name[:ref]``, for example 'pytorch/vision:0.10'. If
            ``ref`` is not specified, the repository's default branch is used. If ``source`` is
            'local' then it should be a path to a local directory.
        model (str): the name of a callable (entrypoint) defined in the repo/dir's
            ``hubconf.py``.
        *args (optional): the corresponding args for callable ``model``.
        source (str, optional): 'github' or 'local'. Default is 'github'.
        {trust}
        force_reload (bool, optional): whether to force a fresh download of the github repo
            unconditionally. Does not have any effect if ``source = 'local'``. Default is ``False``.
        verbose (bool, optional): If ``False``, mute messages about hitting local caches.
            Default is ``True``.
        {skip}
        isolate (bool or Sandbox, optional): ``False`` runs ``hubconf.py`` in this process, as
            torch.hub does. ``True`` (or a :class:`Sandbox`) runs it in a sandboxed worker
            process and brings back only the result. Default is ``False``.
        returns (str, optional): with isolation, ``"object"`` brings the entrypoint's return
            value back whole (the repository's classes pickled by value, so its code then runs
            here: trust is needed), ``"weights"`` brings back only tensors, as a
            ``dict[str, Tensor]`` parsed as data (no trust needed), ``"remote"`` keeps the
            model in its sandboxed worker and returns a :class:`~safehub.RemoteModule` whose
            calls run there, data in and data out (no trust needed). Default is ``"object"``.
        lock (path, optional): a lock file (``safehub lock``); the repository must have an entry
            there, and only the pinned commit with the pinned archive sha256 is used.
        replicas (int, optional): with ``returns="remote"``, serve the model from this many
            sandboxed workers that share one copy of its weights (forks of the loaded worker,
            each with its own sandbox and limits); calls from several threads go to an idle one.
            Default is 1.
        **kwargs (optional): the corresponding kwargs for callable ``model``.

    Returns:
        The output of the ``model`` callable when called with the given ``*args`` and
        ``**kwargs``; with ``returns="weights"``, its tensors by name; with ``returns="remote"``,
        a :class:`~safehub.RemoteModule` (close it, or use it in a ``with`` block).

    Raises:
        InvalidRefError: ``repo_or_dir`` is not a valid ``owner/repo[:ref]``.
        UntrustedRepoError: trust was needed and not given.
        EntrypointNotFoundError, MissingDependenciesError: ``hubconf.py`` cannot serve ``model``.
        RemoteError: the repository's code raised in the worker (``remote_traceback`` holds it).

    Example:
        >>> model = safehub.load("pytorch/vision", "resnet50", weights=None)  # doctest: +SKIP
        >>> weights = safehub.load("someone/repo", "net", isolate=True, returns="weights")  # doctest: +SKIP
        >>> with safehub.load("someone/repo", "net", isolate=True, returns="remote") as net:  # doctest: +SKIP
        ...     logits = net(torch.rand(1, 3, 32, 32))
    """
    source = _check_source(source)
    sandbox = _sandbox_of(isolate)
    mode = _returns.mode_of(returns)
    replicas = check_replicas(replicas, mode.name, sandbox)
    if sandbox is None and not mode.in_process:
        raise InvalidArgumentError(
            f"returns={returns!r} needs isolate=True: in-process, the repository's code runs here "
            "anyway. Call the model (or model.state_dict()) yourself, or pass isolate=True."
        )
    repo_dir, cache_entry = _repo_dir(
        repo_or_dir, source, trust_repo=trust_repo, trust_needed=_returns.trust_needed(sandbox is not None, mode),
        force_reload=force_reload, verbose=verbose, skip_validation=skip_validation, lock=lock,
    )
    if sandbox is not None:
        with _blaming_a_damaged_tree(cache_entry):
            return _isolated(repo_dir, "load", model=model, args=args, kwargs=kwargs, mode=mode, sandbox=sandbox, lock=lock,
                             replicas=replicas)
    with _hubconf.prepended_sys_path(str(repo_dir)):
        with _blaming_a_damaged_tree(cache_entry):
            module = _import_in_process(repo_dir)
            entry = _entry_in_process(module, model)
        return entry(*args, **kwargs)


for _function in (list, help, load):
    _function.__doc__ = (_function.__doc__ or "").replace("{trust}", _TRUST_ARG_DOC).replace("{skip}", _SKIP_ARG_DOC)
del _function
