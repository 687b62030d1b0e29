"""The ``safehub`` command: list, document and load hub models, and manage trust, cache and locks.

Also ``python -m safehub``. Every sub-command's ``--help`` shows examples. Errors a user can cause
print one line, ``safehub: error: ...``, on stderr and exit with a code that says what kind of
failure it was (:data:`EXIT_CODES`); ``--debug`` adds the traceback. Results go to stdout
(``--json`` where a script wants them); messages, progress bars and the repository's own output
go to stderr, so stdout stays parseable.

Importing this module stays cheap: torch and safetensors are imported only by the commands that
write tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import errors

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNTRUSTED = 3
EXIT_NETWORK = 4
EXIT_INTEGRITY = 5
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "an error to fix: unknown repository, ref or entrypoint, broken hubconf.py, missing "
    "dependencies, the repository's code raised, a sandbox limit was hit, a file could not be "
    "written",
    EXIT_USAGE: "usage: a bad option or argument, including a malformed owner/repo[:ref]",
    EXIT_UNTRUSTED: "untrusted: the repository's code would run outside the sandbox and it is not "
    "trusted (pass --trust, or run `safehub trust add`)",
    EXIT_NETWORK: "GitHub or the network failed: unreachable, rate limited, token refused, server "
    "error, cut-off download, or --offline with nothing cached (a retry or GITHUB_TOKEN may help)",
    EXIT_INTEGRITY: "integrity: an archive's sha256 differs from the lock file; the lock file is "
    "missing, unreadable or lacks the repository; a commit on no branch or tag (a fork's); a "
    "hostile archive; `cache verify` found a changed tree",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class CommandError(errors.SafeHubError):
    """A failure found by the command line itself. Attribute: ``exit_code``."""


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an exception (the table in ``safehub --help``)."""
    if isinstance(exc, CommandError):
        return int(getattr(exc, "exit_code", EXIT_ERROR))
    if isinstance(exc, (errors.InvalidRefError, errors.InvalidArgumentError)):
        return EXIT_USAGE
    if isinstance(exc, errors.UntrustedRepoError):
        return EXIT_UNTRUSTED
    if isinstance(exc, (errors.HashMismatchError, errors.LockFileError, errors.ForkCommitError,
                        errors.ArchiveError)):
        return EXIT_INTEGRITY
    if isinstance(exc, (errors.RepoNotFoundError, errors.RefNotFoundError)):
        return EXIT_ERROR  # a name to fix, not a failure a retry would cure
    if isinstance(exc, (errors.GitHubError, errors.OfflineError, errors.DownloadError)):
        return EXIT_NETWORK
    return EXIT_ERROR


# -- small helpers ---------------------------------------------------------------------------------


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _note(text: str) -> None:
    """A human note on stderr (stdout holds only results)."""
    sys.stderr.write(text + "\n")


def _format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _format_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:.0f}s"


def _parse_size(text: str) -> int | None:
    """``4G``, ``512M``, ``1073741824`` or ``none`` (binary units) to bytes."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    if value in ("none", "unlimited"):
        return None
    factor = 1
    if value and value[-1] in "kmgt":
        factor = 1024 ** ("kmgt".index(value[-1]) + 1)
        value = value[:-1]
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4G, 512M, or none)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return int(number * factor)


def _parse_kwarg(text: str) -> tuple[str, Any]:
    """``k=v``: v as JSON when it parses (3, true, "s", [1, 2]), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. pretrained=true, depth=50)")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days (0 or more)")
    return value


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While the repository's code runs, anything printed goes to stderr: stdout holds results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed onto it when the block succeeds, removed if not."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _check_output_path(path: Path) -> None:
    # Said before any download or worker, not after minutes of work.
    if path.is_dir():
        raise CommandError(f"--output {path} is a folder; name a file.", exit_code=EXIT_USAGE)
    if not path.parent.is_dir():
        raise CommandError(f"--output {path}: the folder {path.parent} does not exist.", exit_code=EXIT_ERROR)


def _selected(entries: list[Any], names: list[str]) -> tuple[list[Any], list[str]]:
    """Cache entries matching ``owner/repo`` (every ref) or ``owner/repo:ref``; and names matching none."""
    from . import _refs

    chosen: dict[str, Any] = {}
    unmatched = []
    for name in names:
        repo_ref = _refs.parse(name)
        hits = [
            e for e in entries
            if (e.owner.lower(), e.repo.lower()) == (repo_ref.owner.lower(), repo_ref.repo.lower())
            and (repo_ref.ref is None or e.ref == repo_ref.ref)
        ]  # fmt: skip
        if not hits:
            unmatched.append(name)
        chosen.update((e.folder, e) for e in hits)
    return [e for e in entries if e.folder in chosen], unmatched


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _redact_url(url: str) -> str:
    # A mirror URL may carry credentials (https://user:token@host): never print them.
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


# -- commands: list, help, load --------------------------------------------------------------------


def _isolate_arg(args: argparse.Namespace) -> Any:
    """False, True, or a Sandbox with the limits given on the command line."""
    limits = {}
    if args.timeout is not None:
        limits["timeout"] = args.timeout
    memory_limit = getattr(args, "memory_limit", argparse.SUPPRESS)  # None means "no limit"
    if memory_limit is not argparse.SUPPRESS:
        limits["memory_limit"] = memory_limit
    if args.no_isolate:
        if limits:
            raise CommandError("--timeout and --memory-limit set the sandbox; they do nothing with --no-isolate.",
                               exit_code=EXIT_USAGE)
        return False
    if not limits:
        return True
    from ._sandbox import Sandbox

    try:
        return Sandbox(**limits)
    except errors.InvalidArgumentError as exc:
        raise CommandError(f"Invalid sandbox limit (--timeout, --memory-limit): {exc}",
                           exit_code=EXIT_USAGE) from exc


def _untrusted_hint(args: argparse.Namespace) -> str:
    if args.command == "load":
        return "or load weights only (the default, without --returns object or --no-isolate), which needs no trust"
    return "or drop --no-isolate: in the sandbox no trust is needed"


def cmd_list(args: argparse.Namespace) -> int:
    from . import _api

    with _stdout_to_stderr():
        names = _api.list(args.repo, force_reload=args.force_reload, skip_validation=args.skip_validation,
                          trust_repo=args.trust_repo, verbose=args.verbose, source=args.source,
                          isolate=_isolate_arg(args), lock=args.locked)
    if args.json:
        _print_json({"repo": args.repo, "entrypoints": names})
    else:
        for name in names:
            print(name)
    return EXIT_OK


def cmd_help(args: argparse.Namespace) -> int:
    from . import _api

    with _stdout_to_stderr():
        doc = _api.help(args.repo, args.model, force_reload=args.force_reload,
                        skip_validation=args.skip_validation, trust_repo=args.trust_repo,
                        source=args.source, isolate=_isolate_arg(args), lock=args.locked)
    if args.json:
        _print_json({"repo": args.repo, "model": args.model, "doc": doc})
    elif doc:
        print(doc.rstrip("\n"))
    else:
        _note(f"{args.model} has no docstring.")
    return EXIT_OK


def _savable(tensors: dict[str, Any]) -> dict[str, Any]:
    """Contiguous tensors, none sharing storage with another: what safetensors can write."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()  # tied weights: safetensors refuses shared storage
        seen.add(ptr)
        out[name] = tensor.contiguous()
    return out


def cmd_load(args: argparse.Namespace) -> int:
    from . import _api

    output = Path(args.output)
    _check_output_path(output)
    kwargs = dict(args.kwargs or [])
    with _stdout_to_stderr():
        result = _api.load(args.repo, args.model, source=args.source, trust_repo=args.trust_repo,
                           force_reload=args.force_reload, verbose=args.verbose,
                           skip_validation=args.skip_validation, isolate=_isolate_arg(args),
                           returns=args.returns, lock=args.locked, **kwargs)
    report: dict[str, Any] = {"repo": args.repo, "model": args.model, "returns": args.returns,
                              "output": str(output)}
    if args.returns == "weights":
        from safetensors.torch import save_file

        tensors = _savable(result)
        metadata = {"format": "pt", "safehub.repo": str(args.repo), "safehub.model": args.model}
        with _atomic_output(output) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        report["tensors"] = len(tensors)
        report["elements"] = sum(int(t.numel()) for t in tensors.values())
        what = f"{len(tensors)} tensors ({report['elements']} values)"
    else:
        import cloudpickle
        import torch

        # cloudpickle: the repository's classes go into the file by value, so reading it back
        # (torch.load(path, weights_only=False)) needs neither safehub nor the repository.
        with _atomic_output(output) as tmp:
            torch.save(result, tmp, pickle_module=cloudpickle)
        what = f"a {type(result).__name__} object"
    report["bytes"] = output.stat().st_size
    if args.json:
        _print_json(report)
    else:
        print(f"Wrote {what} from {args.repo} {args.model} to {output} ({_format_size(report['bytes'])}).")
    return EXIT_OK


# -- commands: trust ---------------------------------------------------------------------------------


def _repo_without_ref(value: str) -> Any:
    from . import _refs

    repo_ref = _refs.parse(value)
    if repo_ref.ref is not None:
        raise CommandError(f"Trust applies to a whole repository: use {repo_ref.slug}, without ':{repo_ref.ref}'.",
                           exit_code=EXIT_USAGE)
    return repo_ref


def cmd_trust_list(args: argparse.Namespace) -> int:
    from . import _trust, constants

    entries = _trust.read_trusted()
    if args.json:
        _print_json({"trusted_list": str(_trust.trusted_list_path()), "entries": entries,
                     "trusted_owners": list(constants.TRUSTED_REPO_OWNERS)})
        return EXIT_OK
    for entry in entries:
        print(entry)
    if not entries:
        _note(f"No trusted repositories in {_trust.trusted_list_path()}.")
    _note(f"(torch.hub's format, owner_repo; repositories of {', '.join(constants.TRUSTED_REPO_OWNERS)} "
          "are trusted without an entry, as torch.hub does)")
    return EXIT_OK


def cmd_trust_add(args: argparse.Namespace) -> int:
    from . import _trust

    repo_ref = _repo_without_ref(args.repo)
    added = _trust.add(repo_ref.owner, repo_ref.repo)
    if args.json:
        _print_json({"repo": repo_ref.slug, "changed": added, "trusted_list": str(_trust.trusted_list_path())})
    elif added:
        print(f"Trusted {repo_ref.slug} (added to {_trust.trusted_list_path()}).")
    else:
        print(f"{repo_ref.slug} was already trusted.")
    return EXIT_OK


def cmd_trust_remove(args: argparse.Namespace) -> int:
    from . import _trust

    repo_ref = _repo_without_ref(args.repo)
    removed = _trust.remove(repo_ref.owner, repo_ref.repo)
    if args.json:
        _print_json({"repo": repo_ref.slug, "changed": removed, "trusted_list": str(_trust.trusted_list_path())})
    elif removed:
        print(f"Removed {repo_ref.slug} from {_trust.trusted_list_path()}.")
    else:
        print(f"{repo_ref.slug} was not in the trusted list.")
    return EXIT_OK


# -- commands: cache ---------------------------------------------------------------------------------


def _other_folders(entries: list[Any]) -> list[str]:
    """Folders in the hub dir that safehub has no record for (torch.hub's, or half written)."""
    from . import _cache, constants

    known = {e.folder for e in entries} | {constants.STATE_DIR_NAME, "checkpoints"}
    try:
        children = list(_cache.hub_path().iterdir())
    except FileNotFoundError:
        return []
    return sorted(p.name for p in children if p.is_dir() and not p.is_symlink() and p.name not in known)


def cmd_cache_list(args: argparse.Namespace) -> int:
    from . import _cache

    entries = list(_cache.iter_records()) if _cache.hub_path().is_dir() else []
    now = time.time()
    rows = [{**_cache.entry_as_dict(e), "size_bytes": _tree_size(e.repo_dir), "age_s": round(now - e.fetched_at, 1)}
            for e in entries]
    others = _other_folders(entries)
    if args.json:
        _print_json({"hub_dir": _cache.get_dir(), "entries": rows, "other_folders": others})
        return EXIT_OK
    if not rows:
        _note(f"No repositories cached by safehub in {_cache.get_dir()}.")
    else:
        table = [("FOLDER", "REPO", "REF", "COMMIT", "SIZE", "AGE")] + [
            (r["folder"], f"{r['owner']}/{r['repo']}", r["ref"], r["commit_sha"][:12],
             _format_size(r["size_bytes"]), _format_age(r["age_s"]))
            for r in rows
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if others:
        _note(f"{len(others)} other folder(s) in {_cache.get_dir()} have no safehub record (torch.hub's, or "
              "incomplete); safehub never serves them: " + ", ".join(others))
    return EXIT_OK


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from . import _cache

    entries = list(_cache.iter_records()) if _cache.hub_path().is_dir() else []
    if args.repos:
        entries, unmatched = _selected(entries, args.repos)
        if unmatched:
            raise CommandError(f"Nothing in the cache matches {', '.join(unmatched)}.", exit_code=EXIT_ERROR)
    results = []
    for entry in entries:
        with _cache.locked(entry.folder):  # never hash a tree an install is replacing
            actual = _cache.tree_digest(entry.repo_dir)
        results.append({"folder": entry.folder, "repo": f"{entry.owner}/{entry.repo}", "ref": entry.ref,
                        "commit_sha": entry.commit_sha, "path": str(entry.repo_dir),
                        "ok": actual == entry.tree_sha256, "expected": entry.tree_sha256, "actual": actual})
    changed = [r for r in results if not r["ok"]]
    if args.json:
        _print_json({"ok": not changed, "entries": results})
    else:
        for r in results:
            print(f"{'ok' if r['ok'] else 'CHANGED':8} {r['folder']}  ({r['repo']}:{r['ref']} {r['commit_sha'][:12]})")
        if not results:
            _note(f"No repositories cached by safehub in {_cache.get_dir()}.")
    if changed:
        names = ", ".join(r["folder"] for r in changed)
        raise CommandError(
            f"{len(changed)} cached tree(s) changed since they were fetched: {names}. Remove them "
            "with `safehub cache clean REPO` and load again.",
            exit_code=EXIT_INTEGRITY,
        )
    return EXIT_OK


def cmd_cache_clean(args: argparse.Namespace) -> int:
    from . import _cache

    if args.all and args.repos:
        raise CommandError("Pass repositories or --all, not both.", exit_code=EXIT_USAGE)
    entries = list(_cache.iter_records()) if _cache.hub_path().is_dir() else []
    selection_given = bool(args.all or args.repos or args.older_than is not None)
    if args.repos:
        entries, unmatched = _selected(entries, args.repos)
        for name in unmatched:
            _note(f"Nothing in the cache matches {name}.")
    if args.older_than is not None:
        cutoff = time.time() - args.older_than * 86400
        entries = [e for e in entries if e.fetched_at < cutoff]
    dry_run = args.dry_run or not selection_given
    rows = [{**_cache.entry_as_dict(e), "size_bytes": _tree_size(e.repo_dir)} for e in entries]
    if not dry_run:
        for entry in entries:
            _cache.remove(entry)
    if args.json:
        _print_json({"dry_run": dry_run, "entries": rows})
        return EXIT_OK
    verb = "would remove" if dry_run else "removed"
    for row in rows:
        print(f"{verb} {row['folder']}  ({row['owner']}/{row['repo']}:{row['ref']}, {_format_size(row['size_bytes'])})")
    if not rows:
        _note("Nothing to remove.")
    if not selection_given:
        _note("Nothing was removed: name repositories (owner/repo or owner/repo:ref), or pass --all or "
              "--older-than DAYS.")
    return EXIT_OK


# -- commands: doctor, lock ---------------------------------------------------------------------------


def _version_of(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _layers_report() -> dict[str, Any]:
    from ._sandbox import sandbox_report

    return sandbox_report()


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    from . import __version__, _cache, _trust, constants

    hub_dir = _cache.hub_path()
    existing = next((p for p in (hub_dir, *hub_dir.parents) if p.exists()), hub_dir)
    report: dict[str, Any] = {
        "safehub": __version__,
        "python": platform.python_version(),
        "torch": _version_of("torch"),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "hub_dir": str(hub_dir),
        "hub_dir_exists": hub_dir.is_dir(),
        "hub_dir_writable": os.access(existing, os.W_OK),
        "trusted_list": str(_trust.trusted_list_path()),
        "trusted_entries": len(_trust.read_trusted()),
        "github_url": _redact_url(constants.SAFEHUB_GITHUB_URL),
        "github_url_from_env": bool(os.environ.get("SAFEHUB_GITHUB_URL")),
        "github_api_url": _redact_url(constants.SAFEHUB_GITHUB_API_URL),
        "github_api_url_from_env": bool(os.environ.get("SAFEHUB_GITHUB_API_URL")),
        # Whether a token is set, never its value.
        "github_token_set": bool(constants.GITHUB_TOKEN),
        "offline": bool(constants.SAFEHUB_OFFLINE),
        "sandbox_layers": _layers_report(),
        # The command itself starts cold (one call per run); this is what SAFEHUB_WARM says.
        "warm_workers": bool(constants.SAFEHUB_WARM),
    }
    if args.json:
        _print_json(report)
        return EXIT_OK

    def source(key: str, variable: str) -> str:
        return f"(from {variable})" if report[f"{key}_from_env"] else "(default)"

    hub_state = "exists" if report["hub_dir_exists"] else "not created yet"
    entries = report["trusted_entries"]
    writable = "writable" if report["hub_dir_writable"] else "NOT writable"
    # Whether a token is set, never its value.
    token = "set (sent to the API host only)" if report["github_token_set"] else "not set (60 API requests an hour)"
    lines = [
        f"safehub {report['safehub']}  python {report['python']}  torch {report['torch'] or 'not installed'}",
        f"platform:      {report['platform']}",
        f"hub dir:       {report['hub_dir']} ({hub_state}, {writable})",
        f"trusted list:  {report['trusted_list']} ({entries} {'entry' if entries == 1 else 'entries'})",
        f"GitHub:        {report['github_url']} {source('github_url', 'SAFEHUB_GITHUB_URL')}",
        f"GitHub API:    {report['github_api_url']} {source('github_api_url', 'SAFEHUB_GITHUB_API_URL')}",
        f"GITHUB_TOKEN:  {token}",
        f"offline:       {'yes (SAFEHUB_OFFLINE): cache only' if report['offline'] else 'no'}",
        "workers:       " + ("warm: forked by a zygote (SAFEHUB_WARM=1)" if report["warm_workers"]
                             else "cold: a fresh interpreter per call (the command's default; SAFEHUB_WARM=1 for warm)"),
    ]
    layers = report["sandbox_layers"]
    lines.append("sandbox layers (isolate=True on this machine):")
    width = max((len(name) for name in layers), default=0)
    for name, info in layers.items():
        mark = "active " if info["active"] else "MISSING" if not info["available"] else "off    "
        lines.append(f"  {name.ljust(width)}  {mark}  {info['detail']}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_lock(args: argparse.Namespace) -> int:
    from . import _api, _lockfile

    output = Path(args.output) if args.output else None
    if output is not None:
        _check_output_path(output)
    pins = {}
    with _stdout_to_stderr():
        for repo in args.repos:
            key, pin = _api.pin(repo, skip_validation=args.skip_validation, force_reload=args.force_reload)
            pins[key] = pin
    text = _lockfile.dumps(pins)
    if output is None:
        sys.stdout.write(text)
    else:
        with _atomic_output(output) as tmp:
            tmp.write_text(text)
        _note(f"Wrote {len(pins)} pin(s) to {output}.")
    return EXIT_OK


# -- the parser --------------------------------------------------------------------------------------

_EXIT_TABLE = "\n".join(
    textwrap.fill(meaning, width=96, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
    for code, meaning in EXIT_CODES.items()
)

_MAIN_EPILOG = f"""\
examples:
  safehub list pytorch/vision                      entrypoints, read in the sandbox
  safehub help pytorch/vision:v0.16.0 resnet18     an entrypoint's docstring
  safehub load someone/repo net --output net.safetensors
                                                   weights of an untrusted repo, no trust needed
  safehub lock someone/repo:v1.0 > safehub.lock    pin commit and archive sha256
  safehub --offline load someone/repo:v1.0 net --locked safehub.lock --output net.safetensors
  safehub doctor                                   what this machine offers

Repositories are owner/repo[:ref]; without a ref, the default branch. A repository's code runs
in a sandboxed worker. Trust (--trust, or `safehub trust add`) is needed only where its code would
run outside the sandbox: with --no-isolate, or `load --returns object`.

Options --debug, --offline, --hub-dir and --quiet work before or after the sub-command.

environment:
  TORCH_HOME               the hub dir is $TORCH_HOME/hub (shared with torch.hub)
  SAFEHUB_OFFLINE=1        serve from the cache only (as --offline)
  SAFEHUB_WARM=1           fork the worker from a warm zygote (off for a command: one call each)
  SAFEHUB_GITHUB_URL       archive host (default https://github.com)
  SAFEHUB_GITHUB_API_URL   API host (default https://api.github.com)
  GITHUB_TOKEN             sent to the API host only: higher rate limit, private repositories

exit codes:
{_EXIT_TABLE}
"""

_REPO_HELP = "owner/repo[:ref] (a tag, branch or commit SHA; default: the default branch)"


def _common_options(parser: argparse.ArgumentParser) -> None:
    """Options accepted both before and after the sub-command (SUPPRESS keeps one from erasing the other)."""
    group = parser.add_argument_group("global options")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks and debug messages")
    group.add_argument("--offline", action="store_true", default=argparse.SUPPRESS,
                       help="use the cache only, never the network (sets SAFEHUB_OFFLINE=1)")
    group.add_argument("--hub-dir", metavar="DIR", default=argparse.SUPPRESS,
                       help="hub dir to use instead of $TORCH_HOME/hub (holds the cache and trusted_list)")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no informational messages or progress bars on stderr (errors still show)")


def _sub(subparsers: Any, name: str, *, help: str, description: str, epilog: str,
         func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    _common_options(parser)
    return parser


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _fetch_options(parser: argparse.ArgumentParser, *, trust_help: str) -> None:
    parser.add_argument("--source", choices=("github", "local"), default="github",
                        help="github (default): REPO is owner/repo[:ref]; local: REPO is a folder holding hubconf.py")
    parser.add_argument("--locked", metavar="LOCKFILE",
                        help="use exactly the commit and archive pinned in LOCKFILE (see `safehub lock`); "
                             "asks the GitHub API nothing")
    parser.add_argument("--force-reload", action="store_true", help="download again even if cached")
    parser.add_argument("--skip-validation", action="store_true",
                        help="do not check that the ref belongs to the repository and not to a fork "
                             "(fewer API requests)")
    parser.add_argument("--trust", dest="trust_repo", action="store_const", const=True, default="check",
                        help=trust_help)
    sandbox = parser.add_argument_group("sandbox")
    sandbox.add_argument("--no-isolate", action="store_true",
                         help="run hubconf.py in this process, as torch.hub does (needs trust)")
    sandbox.add_argument("--timeout", metavar="SECONDS", type=_positive_float,
                         help="wall-clock limit for the worker (default 300)")
    sandbox.add_argument("--memory-limit", metavar="SIZE", type=_parse_size, default=argparse.SUPPRESS,
                         help="memory limit for the worker, e.g. 4G, 512M, or none (default 8G)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safehub",
        description="Load PyTorch Hub models (hubconf.py repositories) with their code in a sandbox.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"safehub {__version__}")
    _common_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True

    p = _sub(subparsers, "list", func=cmd_list, help="list a repository's entrypoints",
             description="List the entrypoints (the public callables) of a repository's hubconf.py.\n"
                         "hubconf.py is imported in the sandbox, so no trust is needed.",
             epilog="examples:\n"
                    "  safehub list pytorch/vision\n"
                    "  safehub list pytorch/vision:v0.16.0 --json\n"
                    "  safehub list ./my-models --source local\n"
                    "  safehub list someone/repo --no-isolate --trust   in-process, as torch.hub.list")
    p.add_argument("repo", metavar="REPO", help=_REPO_HELP)
    _fetch_options(p, trust_help="trust the repository (adds it to the trusted list); needed only with --no-isolate")
    _json_option(p)

    p = _sub(subparsers, "help", func=cmd_help, help="show an entrypoint's docstring",
             description="Show the docstring of one entrypoint, read in the sandbox (no trust needed).",
             epilog="examples:\n"
                    "  safehub help pytorch/vision resnet18\n"
                    "  safehub help pytorch/vision:v0.16.0 resnet18 --json")
    p.add_argument("repo", metavar="REPO", help=_REPO_HELP)
    p.add_argument("model", metavar="MODEL", help="the entrypoint's name")
    _fetch_options(p, trust_help="trust the repository (adds it to the trusted list); needed only with --no-isolate")
    _json_option(p)

    p = _sub(subparsers, "load", func=cmd_load, help="call an entrypoint and save its weights (or object)",
             description="Call an entrypoint and write what it returns to a file.\n\n"
                         "--returns weights (default): the entrypoint runs in the sandbox; only its tensors\n"
                         "come back, parsed as data, and are written as a .safetensors file. No code of the\n"
                         "repository runs outside the sandbox, so no trust is needed: the way to use an\n"
                         "untrusted repository in CI.\n\n"
                         "--returns object: the returned object comes back whole and is written with\n"
                         "torch.save (read it with torch.load(path, weights_only=False)). Its code then runs\n"
                         "here, so the repository must be trusted (--trust, or `safehub trust add`).",
             epilog="examples:\n"
                    "  safehub load someone/repo:v1.0 net --output net.safetensors\n"
                    "  safehub load someone/repo net --arg pretrained=true --arg depth=50 --output net.safetensors\n"
                    "  safehub load someone/repo:v1.0 net --locked safehub.lock --output net.safetensors\n"
                    "  safehub load someone/repo net --timeout 120 --memory-limit 4G --output net.safetensors\n"
                    "  safehub load pytorch/vision resnet18 --returns object --trust --output resnet18.pt\n\n"
                    "--arg values are JSON when they parse (3, 0.5, true, null, \"text\", [1, 2]),\n"
                    "else plain strings: --arg name=resnet is the string 'resnet'.")
    p.add_argument("repo", metavar="REPO", help=_REPO_HELP)
    p.add_argument("model", metavar="MODEL", help="the entrypoint's name")
    p.add_argument("--arg", dest="kwargs", metavar="NAME=VALUE", type=_parse_kwarg, action="append",
                   help="a keyword argument for the entrypoint (repeatable)")
    p.add_argument("--returns", choices=("weights", "object"), default="weights",
                   help="weights (default): tensors into a .safetensors file; "
                        "object: torch.save the object (needs trust)")
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="file to write (through a temporary file, renamed when complete)")
    _fetch_options(p, trust_help="trust the repository (adds it to the trusted list); needed for --returns object")
    _json_option(p)

    p = _sub(subparsers, "trust", func=lambda a: EXIT_USAGE, help="list, add or remove trusted repositories",
             description="Manage torch.hub's trusted_list (in the hub dir, shared with torch.hub).\n"
                         "Trust is needed only when a repository's code runs outside the sandbox.",
             epilog="examples:\n"
                    "  safehub trust list\n"
                    "  safehub trust add someone/repo\n"
                    "  safehub trust remove someone/repo")
    trust = p.add_subparsers(dest="trust_command", metavar="ACTION", title="actions")
    trust.required = True
    q = _sub(trust, "list", func=cmd_trust_list, help="show the trusted repositories",
             description="Show the entries of trusted_list (owner_repo, torch.hub's format).",
             epilog="examples:\n  safehub trust list\n  safehub trust list --json")
    _json_option(q)
    for name, func, verb in (("add", cmd_trust_add, "Add"), ("remove", cmd_trust_remove, "Remove")):
        q = _sub(trust, name, func=func, help=f"{verb.lower()} a repository",
                 description=f"{verb} owner/repo {'to' if name == 'add' else 'from'} trusted_list "
                             "(trust covers every ref of a repository).",
                 epilog=f"example:\n  safehub trust {name} someone/repo")
        q.add_argument("repo", metavar="REPO", help="owner/repo")
        _json_option(q)

    p = _sub(subparsers, "cache", func=lambda a: EXIT_USAGE, help="list, verify or clean cached repositories",
             description="The repositories safehub has cached in the hub dir ($TORCH_HOME/hub).\n"
                         "Only folders with a safehub record are listed, verified or removed; torch.hub's\n"
                         "own folders are left alone.",
             epilog="examples:\n"
                    "  safehub cache list\n"
                    "  safehub cache verify\n"
                    "  safehub cache clean someone/repo --older-than 30")
    cache = p.add_subparsers(dest="cache_command", metavar="ACTION", title="actions")
    cache.required = True
    q = _sub(cache, "list", func=cmd_cache_list, help="show cached repositories",
             description="Show each cached repository: folder, repo, ref, commit, size and age.",
             epilog="examples:\n  safehub cache list\n  safehub cache list --json")
    _json_option(q)
    q = _sub(cache, "verify", func=cmd_cache_verify, help="check cached trees against their recorded digest",
             description="Hash each cached tree again and compare it with the digest recorded when it was\n"
                         f"fetched. Exits {EXIT_INTEGRITY} naming every tree that changed.",
             epilog="examples:\n  safehub cache verify\n  safehub cache verify someone/repo someone/other:v2 --json")
    q.add_argument("repos", metavar="REPO", nargs="*",
                   help="owner/repo (every ref) or owner/repo:ref; default: everything cached")
    _json_option(q)
    q = _sub(cache, "clean", func=cmd_cache_clean, help="remove cached repositories",
             description="Remove cached repositories (tree and record, under their lock).\n\n"
                         "With no REPO, --all or --older-than, nothing is removed: it shows what --all\n"
                         "would remove. REPO and --older-than combine (both must match).",
             epilog="examples:\n"
                    "  safehub cache clean                        show what --all would remove\n"
                    "  safehub cache clean someone/repo           every cached ref of someone/repo\n"
                    "  safehub cache clean someone/repo:v1.0\n"
                    "  safehub cache clean --older-than 30        fetched more than 30 days ago\n"
                    "  safehub cache clean --all --dry-run")
    q.add_argument("repos", metavar="REPO", nargs="*", help="owner/repo (every ref) or owner/repo:ref")
    q.add_argument("--all", action="store_true", help="every cached repository")
    q.add_argument("--older-than", metavar="DAYS", type=_non_negative_float,
                   help="only repositories fetched more than DAYS days ago")
    q.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    _json_option(q)

    p = _sub(subparsers, "doctor", func=cmd_doctor, help="show what this machine and setup offer",
             description="Report the sandbox layers available here, the hub dir, the trusted list, the\n"
                         "GitHub endpoints, offline mode, whether GITHUB_TOKEN is set (never its value),\n"
                         "and the Python and torch versions.",
             epilog="examples:\n  safehub doctor\n  safehub doctor --json")
    _json_option(p)

    p = _sub(subparsers, "lock", func=cmd_lock, help="pin repositories to a commit and archive sha256",
             description="Resolve each repository to a commit, fetch it (no code runs, no trust needed)\n"
                         "and print a lock file pinning the commit SHA and the archive's sha256. With\n"
                         "--locked, list/help/load then use exactly that archive, ask the GitHub API\n"
                         "nothing, and refuse an archive whose sha256 differs.\n\n"
                         "A repository already in the cache is pinned as cached; --force-reload fetches\n"
                         "the ref's current commit first. --output writes exactly the repositories named.",
             epilog="examples:\n"
                    "  safehub lock someone/repo:v1.0 other/repo > safehub.lock\n"
                    "  safehub lock someone/repo:main --force-reload --output safehub.lock")
    p.add_argument("repos", metavar="REPO", nargs="+", help=_REPO_HELP)
    p.add_argument("-o", "--output", metavar="FILE", help="write the lock file here instead of stdout")
    p.add_argument("--skip-validation", action="store_true",
                   help="do not check that each ref belongs to its repository and not to a fork")
    p.add_argument("--force-reload", action="store_true", help="fetch again even if cached")
    return parser


# -- main ----------------------------------------------------------------------------------------------


def _setup(args: argparse.Namespace) -> None:
    import logging

    if args.offline:
        os.environ["SAFEHUB_OFFLINE"] = "1"  # read at call time by safehub.constants
    if args.hub_dir is not None:
        from . import _cache

        _cache.set_dir(args.hub_dir)
    logger = logging.getLogger("safehub")
    if args.debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("safehub: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    elif args.quiet:
        logger.addHandler(logging.NullHandler())  # a handler of its own: _log stops echoing


def _error_line(exc: BaseException, args: argparse.Namespace | None) -> str:
    if isinstance(exc, errors.UntrustedRepoError) and args is not None and getattr(exc, "repo", None):
        repo = exc.repo
        return (f"{repo} is not trusted, and its code would run outside the sandbox. Trust it with "
                f"--trust or `safehub trust add {repo}`; {_untrusted_hint(args)}.")
    if isinstance(exc, errors.EntrypointNotFoundError) and args is not None and getattr(args, "model", None):
        local = " --source local" if getattr(args, "source", "github") == "local" else ""
        return (f"{args.repo} has no entrypoint {args.model!r}; `safehub list {args.repo}{local}` shows "
                "the entrypoints it has.")
    if isinstance(exc, errors.SafeHubError):
        message = exc.message
    elif isinstance(exc, OSError) and exc.filename is not None:
        message = f"{exc.strerror or exc}: {exc.filename}"
    else:
        message = str(exc) or type(exc).__name__
    message = " ".join(message.split())  # one line, whatever the message holds
    if isinstance(exc, errors.RemoteError) and getattr(exc, "remote_traceback", "") and not (args and args.debug):
        message += " (--debug shows the repository's traceback)"
    return message


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (see ``safehub --help``)."""
    if argv is None:
        # A command makes one isolated call and exits: a warm zygote could never pay back its
        # start here, so its worker starts cold unless SAFEHUB_WARM=1 asks otherwise.
        os.environ.setdefault("SAFEHUB_WARM", "0")
    parser = build_parser()
    args: argparse.Namespace | None = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        for name in ("debug", "offline", "quiet"):
            setattr(args, name, getattr(args, name, False))
        args.hub_dir = getattr(args, "hub_dir", None)
        args.verbose = not args.quiet
        _setup(args)
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `safehub cache list | head`: the reader left; say nothing more.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (errors.SafeHubError, OSError) as exc:
        debug = bool(args is not None and args.debug)
        if debug:
            traceback.print_exc()  # a RemoteError's text carries the repository's traceback too
        sys.stderr.write(f"safehub: error: {_error_line(exc, args)}\n")
        return exit_code_for(exc)
    except Exception as exc:  # a bug: still one line, unless --debug
        if args is not None and args.debug:
            traceback.print_exc()
        sys.stderr.write(f"safehub: error: unexpected {type(exc).__name__}: {_error_line(exc, args)} "
                         "(this may be a bug in safehub; --debug shows the traceback)\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
