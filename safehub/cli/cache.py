"""``safehub cache list|verify|clean|fill``: what safehub has cached in the hub dir.

Repositories (only folders with a safehub record are listed, verified or removed; torch.hub's own
folders in the same hub dir are named, never touched) and checkpoints (the files in torch.hub's
``checkpoints`` folders, with what safehub recorded when it fetched them). A repository named
here is ``owner/repo`` (every cached ref) or ``owner/repo:ref``. The shared read-only hub dirs of
``SAFEHUB_SHARED_HUB_DIRS`` are listed and verified, never cleaned. ``fill`` bakes a hub dir with
exactly what a lock file pins (:mod:`safehub._fill`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from .. import _cache, _fill, _pins, _refs, constants
from ._errors import EXIT_ERROR, EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE, CommandError
from ._options import add_command, add_group, non_negative_float
from ._output import format_age, format_size, note, print_json


def register(subparsers: Any) -> None:
    actions = add_group(subparsers, "cache", help="list, verify, clean or fill the cache",
                        description="The repositories and checkpoints safehub has cached in the hub dir ($TORCH_HOME/hub).\n"
                                    "Only folders with a safehub record are listed, verified or removed; torch.hub's\n"
                                    "own folders are left alone.",
                        epilog="examples:\n"
                               "  safehub cache list\n"
                               "  safehub cache verify --locked safehub.lock\n"
                               "  safehub cache clean someone/repo --older-than 30\n"
                               "  safehub cache fill --locked safehub.lock")
    q = add_command(actions, "list", func=cmd_cache_list, help="show cached repositories and checkpoints",
                    description="Show each cached repository (folder, repo, ref, commit, size, age) and each\n"
                                "checkpoint (file, size, age), the shared read-only hub dirs' too.",
                    epilog="examples:\n  safehub cache list\n  safehub cache list --json")
    q = add_command(actions, "verify", func=cmd_cache_verify, help="check cached trees and checkpoints",
                    description="Hash each cached tree again and compare it with the digest recorded when it was\n"
                                "fetched (and, with --locked, with the lock file's pin); hash each checkpoint and\n"
                                "compare it with the sha256 recorded when safehub fetched it (and the lock's pin).\n"
                                f"Exits {EXIT_INTEGRITY} naming everything that changed.",
                    epilog="examples:\n  safehub cache verify\n  safehub cache verify someone/repo someone/other:v2 --json\n"
                           "  safehub cache verify --locked safehub.lock")
    q.add_argument("repos", metavar="REPO", nargs="*",
                   help="owner/repo (every ref) or owner/repo:ref; default: everything cached")
    q.add_argument("--locked", metavar="LOCKFILE", help="also check trees and files against this lock file's pins")
    q = add_command(actions, "clean", func=cmd_cache_clean, help="remove cached repositories",
                    description="Remove cached repositories (tree and record, under their lock).\n\n"
                                "With no REPO, --all or --older-than, nothing is removed: it shows what --all\n"
                                "would remove. REPO and --older-than combine (both must match).",
                    epilog="examples:\n"
                           "  safehub cache clean                        show what --all would remove\n"
                           "  safehub cache clean someone/repo           every cached ref of someone/repo\n"
                           "  safehub cache clean someone/repo:v1.0\n"
                           "  safehub cache clean --older-than 30        fetched more than 30 days ago\n"
                           "  safehub cache clean --checkpoints          every checkpoint\n"
                           "  safehub cache clean --all --dry-run")
    q.add_argument("repos", metavar="REPO", nargs="*", help="owner/repo (every ref) or owner/repo:ref")
    q.add_argument("--all", action="store_true", help="every cached repository and checkpoint")
    q.add_argument("--checkpoints", action="store_true",
                   help="the checkpoints (with --older-than, those older); with REPO, those too")
    q.add_argument("--older-than", metavar="DAYS", type=non_negative_float,
                   help="only repositories fetched more than DAYS days ago")
    q.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    q = add_command(actions, "fill", func=cmd_cache_fill, help="fetch exactly what a lock file pins",
                    description="Fill the hub dir with exactly what a lock file pins: every repository (nested ones\n"
                                "included) at its pinned commit, archive and tree, and every pinned file at its\n"
                                "sha256, ready to be baked into an image or a shared mount and served read-only\n"
                                "and offline. What is already there is checked, not fetched again. No code runs.",
                    epilog="examples:\n"
                           "  safehub lock someone/repo:v1.0 --load net -o safehub.lock\n"
                           "  safehub --hub-dir /opt/hub cache fill --locked safehub.lock\n"
                           "  SAFEHUB_OFFLINE=1 TORCH_HOME=/opt safehub load someone/repo:v1.0 net --locked safehub.lock")
    q.add_argument("--locked", metavar="LOCKFILE", required=True, help="the lock file (`safehub lock ... --load ...`)")


def _entries() -> list[_cache.CacheEntry]:
    # Listing must not create the hub dir (iter_records would), so look before asking.
    own = list(_cache.iter_records()) if _cache.hub_path().is_dir() else []
    return own + [e for hub_dir in _cache.shared_hub_dirs() for e in _cache.iter_records(hub_dir)]


def _selected(entries: list[_cache.CacheEntry], names: list[str]) -> tuple[list[_cache.CacheEntry], list[str]]:
    """Cache entries matching ``owner/repo`` (every ref) or ``owner/repo:ref``; and names matching none.

    Not :meth:`CacheEntry.matches`: there a missing ref means the default branch, here every ref.
    """
    chosen: set[tuple[str, str]] = set()
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
        chosen.update((e.hub_dir, e.folder) for e in hits)
    return [e for e in entries if (e.hub_dir, e.folder) in chosen], unmatched


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _other_folders(entries: list[_cache.CacheEntry]) -> list[str]:
    """Folders in the hub dir that safehub has no record for (torch.hub's, or half written)."""
    known = {e.folder for e in entries if not e.shared} | {constants.STATE_DIR_NAME, "checkpoints"}
    try:
        children = list(_cache.hub_path().iterdir())
    except FileNotFoundError:
        return []
    return sorted(p.name for p in children if p.is_dir() and not p.is_symlink() and p.name not in known)


def _checkpoint_row(c: _cache.Checkpoint, now: float) -> dict[str, Any]:
    age = 0.0
    with contextlib.suppress(OSError):
        age = round(now - c.path.stat().st_mtime, 1)
    return {"name": c.path.name, "place": c.place, "path": str(c.path), "size_bytes": c.size, "url": c.url,
            "sha256": c.sha256, "shared": c.shared, "age_s": age}


def _print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_cache_list(args: argparse.Namespace) -> int:
    entries = _entries()
    now = time.time()
    rows = [{**_cache.entry_as_dict(e), "size_bytes": _tree_size(e.repo_dir), "age_s": round(now - e.fetched_at, 1)}
            for e in entries]
    checkpoints = [_checkpoint_row(c, now) for c in _cache.iter_checkpoints()]
    others = _other_folders(entries)
    if args.json:
        print_json({"hub_dir": _cache.get_dir(), "shared_hub_dirs": [str(d) for d in _cache.shared_hub_dirs()],
                    "entries": rows, "checkpoints": checkpoints, "other_folders": others})
        return EXIT_OK
    if not rows:
        note(f"No repositories cached by safehub in {_cache.get_dir()}.")
    else:
        _print_table([("FOLDER", "REPO", "REF", "COMMIT", "SIZE", "AGE")] + [
            (r["folder"] + (" (shared)" if r["shared"] else ""), f"{r['owner']}/{r['repo']}", r["ref"],
             r["commit_sha"][:12], format_size(r["size_bytes"]), format_age(r["age_s"]))
            for r in rows
        ])  # fmt: skip
    if checkpoints:
        print()
        _print_table([("CHECKPOINT", "FOLDER", "SIZE", "AGE")] + [
            (c["name"] + (" (shared)" if c["shared"] else ""), c["place"], format_size(c["size_bytes"]), format_age(c["age_s"]))
            for c in checkpoints
        ])  # fmt: skip
        total = sum(c["size_bytes"] for c in checkpoints)
        note(f"{len(checkpoints)} checkpoint(s), {format_size(total)} in all.")
    if others:
        note(f"{len(others)} other folder(s) in {_cache.get_dir()} have no safehub record (torch.hub's, or "
             "incomplete); safehub never serves them: " + ", ".join(others))
    return EXIT_OK


def _verify_entry(entry: _cache.CacheEntry, pins: dict[str, _pins.Pin] | None) -> dict[str, Any]:
    pinned = None if pins is None else next(
        (p for key, p in pins.items() if _refs.parse(key).owner.lower() == entry.owner.lower()
         and _refs.parse(key).repo.lower() == entry.repo.lower() and p.ref == entry.ref), None)
    if entry.shared or not _cache.hub_is_writable():
        ok = entry.tree_matches()  # a read-only hub dir takes no lock, and no install can be under way
    else:
        with _cache.locked(entry.folder):  # never hash a tree an install is replacing
            ok = entry.tree_matches()
    problems = [] if ok else ["changed since it was fetched"]
    if pinned is not None:
        if not pinned.holds(entry):
            problems.append("not the pinned commit or archive")
        elif _fetch_changes(entry, pinned) is not None:
            problems.append("not the pinned tree")
    return {"kind": "repo", "folder": entry.folder, "repo": f"{entry.owner}/{entry.repo}", "ref": entry.ref,
            "commit_sha": entry.commit_sha, "path": str(entry.repo_dir), "shared": entry.shared,
            "ok": not problems, "problems": problems, "expected": entry.tree_sha256}


def _fetch_changes(entry: _cache.CacheEntry, pin: _pins.Pin) -> list[str] | None:
    from .. import _fetch

    return _fetch.tree_changes(entry, pin)


def _verify_checkpoint(c: _cache.Checkpoint, file_pins: dict[str, _pins.FilePin] | None) -> dict[str, Any]:
    _, actual = _cache.file_digest(c.path, trust_memo=False)
    problems = []
    if c.sha256 and actual != c.sha256:
        problems.append("changed since it was fetched")
    for url, pin in (file_pins or {}).items():
        name = pin.name or _pins.default_file_name(url)
        if name == c.path.name and (pin.place or "hub/checkpoints") == c.place and pin.sha256 != actual:
            problems.append(f"not the file the lock file pins for {url[:200]}")
    known = bool(c.sha256) or any(
        (p.name or _pins.default_file_name(u)) == c.path.name for u, p in (file_pins or {}).items())
    return {"kind": "checkpoint", "name": c.path.name, "place": c.place, "path": str(c.path), "shared": c.shared,
            "ok": not problems, "problems": problems, "known": known, "expected": c.sha256, "actual": actual}


def cmd_cache_verify(args: argparse.Namespace) -> int:
    entries = _entries()
    pins = _pins.read(args.locked) if args.locked else None
    file_pins = _pins.read_files(args.locked) if args.locked else None
    if args.repos:
        entries, unmatched = _selected(entries, args.repos)
        if unmatched:
            raise CommandError(f"Nothing in the cache matches {', '.join(unmatched)}.", exit_code=EXIT_ERROR)
    results: list[dict[str, Any]] = [_verify_entry(entry, pins) for entry in entries]
    if not args.repos:
        results += [_verify_checkpoint(c, file_pins) for c in _cache.iter_checkpoints()]
    changed = [r for r in results if not r["ok"]]
    if args.json:
        print_json({"ok": not changed, "entries": [r for r in results if r["kind"] == "repo"],
                    "checkpoints": [r for r in results if r["kind"] == "checkpoint"]})
    else:
        for r in results:
            status = "ok" if r["ok"] else "CHANGED"
            if r["kind"] == "repo":
                print(f"{status:8} {r['folder']}  ({r['repo']}:{r['ref']} {r['commit_sha'][:12]})"
                      + ("" if r["ok"] else f": {'; '.join(r['problems'])}"))
            else:
                status = status if r["known"] or not r["ok"] else "unknown"
                print(f"{status:8} {r['place']}/{r['name']}" + ("" if r["ok"] else f": {'; '.join(r['problems'])}"))
        if not results:
            note(f"Nothing cached by safehub in {_cache.get_dir()}.")
    if changed:
        names = ", ".join(r.get("folder") or f"{r['place']}/{r['name']}" for r in changed)
        raise CommandError(
            f"{len(changed)} cached item(s) changed since they were fetched or pinned: {names}. Remove them "
            "with `safehub cache clean REPO` (or --checkpoints) and fetch again (`safehub cache fill --locked LOCKFILE`).",
            exit_code=EXIT_INTEGRITY,
        )
    return EXIT_OK


def cmd_cache_clean(args: argparse.Namespace) -> int:
    if args.all and args.repos:
        raise CommandError("Pass repositories or --all, not both.", exit_code=EXIT_USAGE)
    entries = [e for e in _entries() if not e.shared]  # a shared hub dir is read-only: never cleaned
    selection_given = bool(args.all or args.repos or args.older_than is not None or args.checkpoints)
    if args.checkpoints and not (args.all or args.repos or args.older_than is not None):
        entries = []
    if args.repos:
        entries, unmatched = _selected(entries, args.repos)
        for name in unmatched:
            note(f"Nothing in the cache matches {name}.")
    checkpoints = [c for c in _cache.iter_checkpoints() if not c.shared] if (args.all or args.checkpoints or not selection_given) else []
    if args.older_than is not None:
        cutoff = time.time() - args.older_than * 86400
        entries = [e for e in entries if e.fetched_at < cutoff]
        checkpoints = [c for c in checkpoints if c.path.stat().st_mtime < cutoff]
    dry_run = args.dry_run or not selection_given
    now = time.time()
    rows = [{**_cache.entry_as_dict(e), "size_bytes": _tree_size(e.repo_dir)} for e in entries]
    file_rows = [_checkpoint_row(c, now) for c in checkpoints]
    if not dry_run:
        for entry in entries:
            _cache.remove(entry)
        for checkpoint in checkpoints:
            _cache.remove_checkpoint(checkpoint)
    if args.json:
        print_json({"dry_run": dry_run, "entries": rows, "checkpoints": file_rows})
        return EXIT_OK
    verb = "would remove" if dry_run else "removed"
    for row in rows:
        print(f"{verb} {row['folder']}  ({row['owner']}/{row['repo']}:{row['ref']}, {format_size(row['size_bytes'])})")
    for c in file_rows:
        print(f"{verb} {c['place']}/{c['name']}  ({format_size(c['size_bytes'])})")
    if not rows and not file_rows:
        note("Nothing to remove.")
    if not selection_given:
        note("Nothing was removed: name repositories (owner/repo or owner/repo:ref), or pass --all, "
             "--checkpoints or --older-than DAYS.")
    return EXIT_OK


def cmd_cache_fill(args: argparse.Namespace) -> int:
    report = _fill.fill(args.locked, progress=not args.json)
    if args.json:
        print_json({"hub_dir": _cache.get_dir(), "repos": report.repos, "files": report.files})
        return EXIT_OK
    for r in report.repos:
        print(f"{'fetched' if r['fetched'] else 'ok':8} {r['repo']}  ({str(r['commit_sha'])[:12]})  {r['path']}")
    for f in report.files:
        print(f"{'fetched' if f['fetched'] else 'ok':8} {f['url']}  {f['path']}")
    note(f"{_cache.get_dir()} holds the {len(report.repos)} repository(ies) and {len(report.files)} file(s) "
         f"{args.locked} pins.")
    return EXIT_OK
