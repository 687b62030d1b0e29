"""argparse building blocks the command groups share: adding a command, common options, value types.

A value type raises :class:`argparse.ArgumentTypeError`, so a bad value is a usage error (exit 2)
with argparse's own message, before anything runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ._errors import EXIT_USAGE, CommandError

REPO_HELP = "owner/repo[:ref] (a tag, branch or commit SHA; default: the default branch)"


def global_options(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print the result as JSON on stdout")


def add_command(subparsers: Any, name: str, *, help: str, description: str, epilog: str,
                func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A sub-command running ``func``; ``epilog`` holds its examples, shown as written."""
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    global_options(parser)
    return parser


def add_group(subparsers: Any, name: str, *, help: str, description: str, epilog: str) -> Any:
    """A command made of actions (``safehub trust add``); returns the subparsers to add them to."""
    # The group's own func never runs: argparse refuses the group without an action (exit 2).
    parser = add_command(subparsers, name, func=lambda args: EXIT_USAGE, help=help, description=description,
                         epilog=epilog)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", title="actions")
    actions.required = True
    return actions


def entrypoint_arguments(parser: argparse.ArgumentParser, *, model_metavar: str = "MODEL") -> None:
    """REPO, the entrypoint's name, and its keyword arguments (--arg NAME=VALUE, repeatable)."""
    parser.add_argument("repo", metavar="REPO", help=REPO_HELP)
    parser.add_argument("model", metavar=model_metavar, help="the entrypoint's name")
    parser.add_argument("--arg", dest="kwargs", metavar="NAME=VALUE", type=parse_kwarg, action="append",
                        help="a keyword argument for the entrypoint (repeatable; JSON when it parses)")


def repo_options(parser: argparse.ArgumentParser) -> None:
    """Where the repository comes from: --source, --locked, --force-reload, --skip-validation."""
    parser.add_argument("--source", choices=("github", "local"), default="github",
                        help="github (default): REPO is owner/repo[:ref]; local: REPO is a folder holding hubconf.py")
    parser.add_argument("--locked", metavar="LOCKFILE",
                        help="use exactly the commit and archive pinned in LOCKFILE (see `safehub lock`); "
                             "asks the GitHub API nothing")
    parser.add_argument("--force-reload", action="store_true", help="download again even if cached")
    parser.add_argument("--skip-validation", action="store_true",
                        help="do not check that the ref belongs to the repository and not to a fork "
                             "(fewer API requests)")


def check_repo(args: argparse.Namespace) -> None:
    """A malformed owner/repo[:ref] is said first (exit 2), before any other check of the command."""
    if getattr(args, "source", "github") == "github":
        from .._refs import parse

        parse(args.repo)


def sandbox_options(parser: argparse.ArgumentParser, *, no_isolate: bool) -> None:
    """The sandbox's settings (read by :func:`sandbox_from_options`), and --no-isolate where it applies.

    Each option is the Sandbox setting of the same name (:data:`SANDBOX_OPTIONS`), so an error that
    names a setting names an option here too (``_errors.CLI_WORDS``)."""
    sandbox = parser.add_argument_group("sandbox")
    if no_isolate:
        sandbox.add_argument("--no-isolate", action="store_true",
                             help="run hubconf.py in this process, as torch.hub does (needs trust)")
    sandbox.add_argument("--timeout", metavar="SECONDS", type=positive_float, default=argparse.SUPPRESS,
                         help="wall-clock limit for the worker (default 300)")
    sandbox.add_argument("--memory-limit", metavar="SIZE", type=parse_size, default=argparse.SUPPRESS,
                         help="memory limit for the worker, e.g. 4G, 512M, or none (default 8G)")
    sandbox.add_argument("--cpu-time", metavar="SECONDS", type=positive_float, default=argparse.SUPPRESS,
                         help="CPU time limit for the worker (default: none)")
    sandbox.add_argument("--max-processes", metavar="N", type=positive_int, default=argparse.SUPPRESS,
                         help="processes and threads the worker may have (default: 64 plus two per CPU)")
    sandbox.add_argument("--max-open-files", metavar="N", type=positive_int, default=argparse.SUPPRESS,
                         help="open files the worker may have (default 256)")
    sandbox.add_argument("--scratch-size", metavar="SIZE", type=parse_size, default=argparse.SUPPRESS,
                         help="size of the worker's scratch folder (HOME, TMPDIR), e.g. 1G (default 4G)")
    sandbox.add_argument("--max-file-size", metavar="SIZE", type=parse_size, default=argparse.SUPPRESS,
                         help="largest file the worker may write (default: none)")
    sandbox.add_argument("--network", action="store_true", default=argparse.SUPPRESS,
                         help="give the worker the network (off by default: fetches go through safehub)")
    sandbox.add_argument("--allow-host", metavar="HOST[:PORT]", action="append", default=argparse.SUPPRESS,
                         help="a host the worker's fetches may reach although its address is private or "
                              "loopback (a local mirror); repeatable, also SAFEHUB_ALLOW_HOSTS")


# option dest -> the Sandbox setting it sets
SANDBOX_OPTIONS = {
    "timeout": "timeout", "memory_limit": "memory_limit", "cpu_time": "cpu_time",
    "max_processes": "max_processes", "max_open_files": "max_open_files", "scratch_size": "max_scratch_size",
    "max_file_size": "max_file_size", "network": "network", "allow_host": "allow_hosts",
}


def sandbox_settings_given(args: argparse.Namespace) -> list[str]:
    """The sandbox options given on the command line, as typed (--timeout, --network)."""
    return ["--" + dest.replace("_", "-") for dest in SANDBOX_OPTIONS if hasattr(args, dest)]


def sandbox_from_options(args: argparse.Namespace, **settings: Any) -> Any:
    """A Sandbox with the settings given on the command line (and ``settings``), or None if none was."""
    from .. import errors
    from .._sandbox import Sandbox

    limits = dict(settings)
    for dest, setting in SANDBOX_OPTIONS.items():
        if hasattr(args, dest):  # None (``none``) means "no limit"
            value = getattr(args, dest)
            limits[setting] = tuple(value) if setting == "allow_hosts" else value
    if not limits:
        return None
    try:
        return Sandbox(**limits)
    except errors.InvalidArgumentError as exc:
        raise CommandError(f"Invalid sandbox setting ({', '.join(sandbox_settings_given(args))}): {exc}",
                           exit_code=EXIT_USAGE) from exc


# -- value types -----------------------------------------------------------------------------------


def parse_size(text: str) -> int | None:
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


def parse_kwarg(text: str) -> tuple[str, Any]:
    """``k=v``: v as JSON when it parses (3, true, "s", [1, 2]), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. pretrained=true, depth=50)")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days (0 or more)")
    return value
