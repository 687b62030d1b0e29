"""``safehub cache list|verify|clean``: the repositories safehub has cached in the hub dir.

Only folders with a safehub record are listed, verified or removed; torch.hub's own folders in the
same hub dir are named, never touched. A repository named here is ``owner/repo`` (every cached
ref) or ``owner/repo:ref``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from .. import _cache, _refs, constants
from ._errors import EXIT_ERROR, EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE, CommandError
from ._options import add_command, add_group, json_option, non_negative_float
from ._output import format_age, format_size, note, print_json


def register(subparsers: Any) -> None:
    actions = add_group(subparsers, "cache", help="list, verify or clean cached repositories",
                        description="The repositories safehub has cached in the hub dir ($TORCH_HOME/hub).\n"
                                    "Only folders with a safehub record are listed, verified or removed; torch.hub's\n"
                                    "own folders are left alone.",
                        epilog="examples:\n"
                               "  safehub cache list\n"
                               "  safehub cache verify\n"
                               "  safehub cache clean someone/repo --older-than 30")
    q = add_command(actions, "list", func=cmd_cache_list, help="show cached repositories",
                    description="Show each cached repository: folder, repo, ref, commit, size and age.",
                    epilog="examples:\n  safehub cache list\n  safehub cache list --json")
    json_option(q)
    q = add_command(actions, "verify", func=cmd_cache_verify, help="check cached trees against their recorded digest",
                    description="Hash each cached tree again and compare it with the digest recorded when it was\n"
                                f"fetched. Exits {EXIT_INTEGRITY} naming every tree that changed.",
                    epilog="examples:\n  safehub cache verify\n  safehub cache verify someone/repo someone/other:v2 --json")
    q.add_argument("repos", metavar="REPO", nargs="*",
                   help="owner/repo (every ref) or owner/repo:ref; default: everything cached")
    json_option(q)
    q = add_command(actions, "clean", func=cmd_cache_clean, help="remove cached repositories",
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
    q.add_argument("--older-than", metavar="DAYS", type=non_negative_float,
                   help="only repositories fetched more than DAYS days ago")
    q.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    json_option(q)


def _entries() -> list[_cache.CacheEntry]:
    # Listing must not create the hub dir (iter_records would), so look before asking.
    return list(_cache.iter_records()) if _cache.hub_path().is_dir() else []


def _selected(entries: list[_cache.CacheEntry], names: list[str]) -> tuple[list[_cache.CacheEntry], list[str]]:
    """Cache entries matching ``owner/repo`` (every ref) or ``owner/repo:ref``; and names matching none.

    Not :meth:`CacheEntry.matches`: there a missing ref means the default branch, here every ref.
    """
    chosen: dict[str, _cache.CacheEntry] = {}
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


def _other_folders(entries: list[_cache.CacheEntry]) -> list[str]:
    """Folders in the hub dir that safehub has no record for (torch.hub's, or half written)."""
    known = {e.folder for e in entries} | {constants.STATE_DIR_NAME, "checkpoints"}
    try:
        children = list(_cache.hub_path().iterdir())
    except FileNotFoundError:
        return []
    return sorted(p.name for p in children if p.is_dir() and not p.is_symlink() and p.name not in known)


def cmd_cache_list(args: argparse.Namespace) -> int:
    entries = _entries()
    now = time.time()
    rows = [{**_cache.entry_as_dict(e), "size_bytes": _tree_size(e.repo_dir), "age_s": round(now - e.fetched_at, 1)}
            for e in entries]
    others = _other_folders(entries)
    if args.json:
        print_json({"hub_dir": _cache.get_dir(), "entries": rows, "other_folders": others})
        return EXIT_OK
    if not rows:
        note(f"No repositories cached by safehub in {_cache.get_dir()}.")
    else:
        table = [("FOLDER", "REPO", "REF", "COMMIT", "SIZE", "AGE")] + [
            (r["folder"], f"{r['owner']}/{r['repo']}", r["ref"], r["commit_sha"][:12],
             format_size(r["size_bytes"]), format_age(r["age_s"]))
            for r in rows
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if others:
        note(f"{len(others)} other folder(s) in {_cache.get_dir()} have no safehub record (torch.hub's, or "
             "incomplete); safehub never serves them: " + ", ".join(others))
    return EXIT_OK


def cmd_cache_verify(args: argparse.Namespace) -> int:
    entries = _entries()
    if args.repos:
        entries, unmatched = _selected(entries, args.repos)
        if unmatched:
            raise CommandError(f"Nothing in the cache matches {', '.join(unmatched)}.", exit_code=EXIT_ERROR)
    results: list[dict[str, Any]] = []
    for entry in entries:
        with _cache.locked(entry.folder):  # never hash a tree an install is replacing
            actual = _cache.tree_digest(entry.repo_dir)
        results.append({"folder": entry.folder, "repo": f"{entry.owner}/{entry.repo}", "ref": entry.ref,
                        "commit_sha": entry.commit_sha, "path": str(entry.repo_dir),
                        "ok": actual == entry.tree_sha256, "expected": entry.tree_sha256, "actual": actual})
    changed = [r for r in results if not r["ok"]]
    if args.json:
        print_json({"ok": not changed, "entries": results})
    else:
        for r in results:
            print(f"{'ok' if r['ok'] else 'CHANGED':8} {r['folder']}  ({r['repo']}:{r['ref']} {r['commit_sha'][:12]})")
        if not results:
            note(f"No repositories cached by safehub in {_cache.get_dir()}.")
    if changed:
        names = ", ".join(r["folder"] for r in changed)
        raise CommandError(
            f"{len(changed)} cached tree(s) changed since they were fetched: {names}. Remove them "
            "with `safehub cache clean REPO` and load again.",
            exit_code=EXIT_INTEGRITY,
        )
    return EXIT_OK


def cmd_cache_clean(args: argparse.Namespace) -> int:
    if args.all and args.repos:
        raise CommandError("Pass repositories or --all, not both.", exit_code=EXIT_USAGE)
    entries = _entries()
    selection_given = bool(args.all or args.repos or args.older_than is not None)
    if args.repos:
        entries, unmatched = _selected(entries, args.repos)
        for name in unmatched:
            note(f"Nothing in the cache matches {name}.")
    if args.older_than is not None:
        cutoff = time.time() - args.older_than * 86400
        entries = [e for e in entries if e.fetched_at < cutoff]
    dry_run = args.dry_run or not selection_given
    rows = [{**_cache.entry_as_dict(e), "size_bytes": _tree_size(e.repo_dir)} for e in entries]
    if not dry_run:
        for entry in entries:
            _cache.remove(entry)
    if args.json:
        print_json({"dry_run": dry_run, "entries": rows})
        return EXIT_OK
    verb = "would remove" if dry_run else "removed"
    for row in rows:
        print(f"{verb} {row['folder']}  ({row['owner']}/{row['repo']}:{row['ref']}, {format_size(row['size_bytes'])})")
    if not rows:
        note("Nothing to remove.")
    if not selection_given:
        note("Nothing was removed: name repositories (owner/repo or owner/repo:ref), or pass --all or "
             "--older-than DAYS.")
    return EXIT_OK
