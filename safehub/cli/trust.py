"""``safehub trust list|add|remove``: torch.hub's trusted_list, shared with torch.hub.

Trust is needed only where a repository's code runs outside the sandbox, and covers every ref of
a repository, so ``add`` and ``remove`` refuse an ``owner/repo:ref``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .. import _refs, _trust, constants
from ._errors import EXIT_OK, EXIT_USAGE, CommandError
from ._options import add_command, add_group
from ._output import note, print_json


def register(subparsers: Any) -> None:
    actions = add_group(subparsers, "trust", help="list, add or remove trusted repositories",
                        description="Manage torch.hub's trusted_list (in the hub dir, shared with torch.hub).\n"
                                    "Trust is needed only when a repository's code runs outside the sandbox.",
                        epilog="examples:\n"
                               "  safehub trust list\n"
                               "  safehub trust add someone/repo\n"
                               "  safehub trust remove someone/repo")
    q = add_command(actions, "list", func=cmd_trust_list, help="show the trusted repositories",
                    description="Show the entries of trusted_list (owner_repo, torch.hub's format).",
                    epilog="examples:\n  safehub trust list\n  safehub trust list --json")
    for name, func, verb in (("add", cmd_trust_add, "Add"), ("remove", cmd_trust_remove, "Remove")):
        q = add_command(actions, name, func=func, help=f"{verb.lower()} a repository",
                        description=f"{verb} owner/repo {'to' if name == 'add' else 'from'} trusted_list "
                                    "(trust covers every ref of a repository).",
                        epilog=f"example:\n  safehub trust {name} someone/repo")
        q.add_argument("repo", metavar="REPO", help="owner/repo")


def _repo_without_ref(value: str) -> _refs.RepoRef:
    repo_ref = _refs.parse(value)
    if repo_ref.ref is not None:
        raise CommandError(f"Trust applies to a whole repository: use {repo_ref.slug}, without ':{repo_ref.ref}'.",
                           exit_code=EXIT_USAGE)
    return repo_ref


def cmd_trust_list(args: argparse.Namespace) -> int:
    entries = _trust.read_trusted()
    if args.json:
        print_json({"trusted_list": str(_trust.trusted_list_path()), "entries": entries,
                    "trusted_owners": list(constants.TRUSTED_REPO_OWNERS)})
        return EXIT_OK
    for entry in entries:
        print(entry)
    if not entries:
        note(f"No trusted repositories in {_trust.trusted_list_path()}.")
    note(f"(torch.hub's format, owner_repo; repositories of {', '.join(constants.TRUSTED_REPO_OWNERS)} "
         "are trusted without an entry, as torch.hub does)")
    return EXIT_OK


def cmd_trust_add(args: argparse.Namespace) -> int:
    return _change(args, _trust.add, done="Trusted {repo} (added to {path}).", unchanged="{repo} was already trusted.")


def cmd_trust_remove(args: argparse.Namespace) -> int:
    return _change(args, _trust.remove, done="Removed {repo} from {path}.",
                   unchanged="{repo} was not in the trusted list.")


def _change(args: argparse.Namespace, change: Callable[[str, str], bool], *, done: str, unchanged: str) -> int:
    """Add or remove ``args.repo``; ``change`` says whether trusted_list changed."""
    repo_ref = _repo_without_ref(args.repo)
    changed = change(repo_ref.owner, repo_ref.repo)
    path = _trust.trusted_list_path()
    if args.json:
        print_json({"repo": repo_ref.slug, "changed": changed, "trusted_list": str(path)})
    else:
        print((done if changed else unchanged).format(repo=repo_ref.slug, path=path))
    return EXIT_OK
