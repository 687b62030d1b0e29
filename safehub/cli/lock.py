"""``safehub lock``: pin repositories to a commit SHA and an archive sha256, in a lock file.

No code of a repository runs (it is fetched, never imported), so no trust is needed. With
``--load ENTRYPOINT`` the entrypoint runs once in the sandbox (weights only, no trust needed) and
everything it fetched through the broker is pinned too: each nested repository, each file (URL,
sha256, size), each Hugging Face Hub file (repository, revision, commit, file, sha256, size). The file is what ``list``/``help``/``load --locked`` read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import _api, _pins
from ._errors import EXIT_OK, EXIT_USAGE, CommandError
from ._options import REPO_HELP, add_command, parse_kwarg
from ._output import atomic_output, check_output_path, note, stdout_to_stderr


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "lock", func=cmd_lock, help="pin repositories to a commit and archive sha256",
                    description="Resolve each repository to a commit, fetch it (no code runs, no trust needed)\n"
                                "and print a lock file pinning the commit SHA and the archive's sha256. With\n"
                                "--locked, list/help/load then use exactly that archive, ask the GitHub API\n"
                                "nothing, and refuse an archive whose sha256 differs.\n\n"
                                "A repository already in the cache is pinned as cached; --force-reload fetches\n"
                                "the ref's current commit first. --output writes exactly the repositories named.",
                    epilog="examples:\n"
                           "  safehub lock someone/repo:v1.0 other/repo > safehub.lock\n"
                           "  safehub lock someone/repo:main --force-reload --output safehub.lock\n"
                           "  safehub lock someone/repo:v1.0 --load net --arg pretrained=true -o safehub.lock\n"
                           "  safehub load someone/repo:v1.0 net --arg pretrained=true --locked safehub.lock -o w.safetensors")
    p.add_argument("repos", metavar="REPO", nargs="+", help=REPO_HELP)
    p.add_argument("-o", "--output", metavar="FILE", help="write the lock file here instead of stdout")
    p.add_argument("--skip-validation", action="store_true",
                   help="do not check that each ref belongs to its repository and not to a fork")
    p.add_argument("--force-reload", action="store_true", help="fetch again even if cached")
    p.add_argument("--load", metavar="ENTRYPOINT",
                   help="run this entrypoint once in the sandbox (weights only, no trust needed) and pin every "
                        "nested repository and file it fetches; one REPO only")
    p.add_argument("--arg", dest="kwargs", metavar="NAME=VALUE", type=parse_kwarg, action="append",
                   help="a keyword argument for --load's entrypoint (as for `safehub load`)")


def cmd_lock(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else None
    if output is not None:
        check_output_path(output)
    if args.load is not None and len(args.repos) != 1:
        raise CommandError("--load runs one repository's entrypoint: name exactly one REPO with it.", exit_code=EXIT_USAGE)
    pins: dict[str, _pins.Pin] = {}
    files: dict[str, _pins.FilePin] = {}
    hub_files: list[_pins.HubPin] = []
    with stdout_to_stderr():
        for repo in args.repos:
            key, pin = _api.pin(repo, skip_validation=args.skip_validation, force_reload=args.force_reload)
            pins[key] = pin
        if args.load is not None:
            from .._egress.record import recording

            with recording() as fetches:
                _api.load(args.repos[0], args.load, isolate=True, returns="weights",
                          skip_validation=args.skip_validation, **dict(args.kwargs or []))
            for fetch in fetches:
                if fetch.kind == "repo":
                    key, pin = _api.pin(fetch.url, skip_validation=args.skip_validation)
                    pins[key] = pin
                elif fetch.hub_file is not None:
                    hub_files.append(_pins.HubPin(*fetch.hub_file[:3], fetch.commit_sha, fetch.hub_file[3], fetch.sha256, fetch.size))
                else:
                    # Where it was kept, so `safehub cache fill` puts it back there.
                    files[fetch.url] = _pins.FilePin(fetch.sha256, fetch.size, fetch.name, fetch.place)
    text = _pins.dumps(pins, files, hub_files)
    if output is None:
        sys.stdout.write(text)
    else:
        with atomic_output(output) as tmp:
            tmp.write_text(text)
        note(f"Wrote {len(pins)} repository pin(s) and {len(files) + len(hub_files)} file pin(s) to {output}.")
    return EXIT_OK
