"""The ``safehub`` command: list, document and load hub models, and manage trust, cache and locks.

Also ``python -m safehub``. Every sub-command's ``--help`` shows examples. Errors a user can cause
print one line, ``safehub: error: ...``, on stderr and exit with a code that says what kind of
failure it was (:data:`EXIT_CODES`); ``--debug`` adds the traceback. Results go to stdout
(``--json`` where a script wants them); messages, progress bars and the repository's own output
go to stderr, so stdout stays parseable.

One module per command group, each with a ``register(subparsers)`` that ``_parser`` calls:

    models.py    list, help, load
    trust.py     trust list|add|remove
    cache.py     cache list|verify|clean
    doctor.py    doctor
    lock.py      lock
    _parser.py   the top-level parser, its epilog, and the groups in order
    _options.py  argparse building blocks and value types the groups share
    _output.py   stdout/stderr, --json, sizes and ages, atomic output files
    _errors.py   exit codes, and the one table from error type to exit code and message

Importing this package stays cheap: torch and safetensors are imported only by the commands that
write tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback

from .. import _cache, _log
from ._errors import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_INTERRUPTED,
    EXIT_NETWORK,
    EXIT_OK,
    EXIT_UNTRUSTED,
    EXIT_USAGE,
    CommandError,
    error_line,
    exit_code_for,
)
from ._options import parse_kwarg as _parse_kwarg  # noqa: F401  (the names tests have always used)
from ._options import parse_size as _parse_size  # noqa: F401
from ._parser import build_parser

__all__ = [
    "EXIT_CODES",
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_INTERRUPTED",
    "EXIT_NETWORK",
    "EXIT_OK",
    "EXIT_UNTRUSTED",
    "EXIT_USAGE",
    "CommandError",
    "build_parser",
    "exit_code_for",
    "main",
]


def _setup(args: argparse.Namespace) -> None:
    """Apply the global options: offline mode, another hub dir, and how much to log."""
    if args.offline:
        os.environ["SAFEHUB_OFFLINE"] = "1"  # read at call time by safehub.constants
    if args.hub_dir is not None:
        _cache.set_dir(args.hub_dir)
    logger = logging.getLogger("safehub")
    if args.debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("safehub: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    elif args.quiet:
        logger.addHandler(logging.NullHandler())  # a handler of its own: _log stops echoing
        _log.set_quiet()  # and no progress bar, the downloads made for a worker included


def _fail(exc: BaseException, args: argparse.Namespace | None) -> int:
    """Report ``exc`` as the error table says (one line; the traceback too with --debug); its exit code."""
    if isinstance(exc, BrokenPipeError):
        # The reader of stdout left: point stdout at /dev/null so the flush at exit cannot fail again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    line = error_line(exc, args)
    if line is not None:
        if args is not None and args.debug:
            traceback.print_exc()  # a RemoteError's text carries the repository's traceback too
        sys.stderr.write(f"safehub: error: {line}\n")
    return exit_code_for(exc)


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
        for name in ("debug", "json", "offline", "quiet"):
            setattr(args, name, getattr(args, name, False))
        args.hub_dir = getattr(args, "hub_dir", None)
        args.verbose = not args.quiet
        _setup(args)
        return int(args.func(args))
    except (Exception, KeyboardInterrupt) as exc:
        return _fail(exc, args)
