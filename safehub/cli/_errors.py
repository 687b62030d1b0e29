"""What a failure means to the shell: one table from error type to exit code and message.

Every failure of a command goes through :data:`ERROR_TABLE`, read top to bottom, first match wins
(the way huggingface_hub's ``cli/_errors.py`` reads ``CLI_ERROR_MAPPINGS``), so a subclass listed
above its base gets a code of its own. :data:`EXIT_CODES` says what each code means; ``safehub
--help`` prints it, and ``tests/unit/test_cli_errors.py`` pins every error class to its code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

from .. import errors
from .._terminal import visible

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
    "written (a full disk included, named by its folder)",
    EXIT_USAGE: "usage: a bad option or argument, including a malformed owner/repo[:ref]",
    EXIT_UNTRUSTED: "untrusted: the repository's code would run outside the sandbox and it is not "
    "trusted (pass --trust, or run `safehub trust add`)",
    EXIT_NETWORK: "GitHub or the network failed: unreachable, rate limited, token refused, server "
    "error, cut-off download, or --offline with something not in the cache, a repository or a file it "
    "fetches (a retry or GITHUB_TOKEN may help)",
    EXIT_INTEGRITY: "integrity: an archive's sha256 differs from the lock file; the lock file is "
    "missing, unreadable or lacks the repository; a commit on no branch or tag (a fork's); a "
    "hostile archive; a pinned tree changed in the cache (and could not be fetched again); `cache "
    "verify` found a changed tree or checkpoint; a load failed on a changed tree",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class CommandError(errors.SafeHubError):
    """A failure found by the command line itself. Attribute: ``exit_code`` (default 1)."""


# A message is built from the error and the parsed command line (None when parsing never finished).
Message = Callable[[BaseException, argparse.Namespace | None], str]


# The library's messages speak Python (they name the keyword that changes a thing); on the command
# line the same advice names the option. One table, read in order (longest phrases first), turns the
# one into the other; ``tests/unit/test_cli_errors.py`` checks that every CLI word it names exists.
CLI_WORDS: tuple[tuple[str, str], ...] = (
    ("isolate=safehub.Sandbox(network=True)", "--network"),
    ("Sandbox(network=True)", "--network"),
    ("Sandbox(allow_hosts=...)", "--allow-host HOST[:PORT]"),
    ("Sandbox(timeout=...)", "--timeout SECONDS"),
    ("Sandbox(memory_limit=...)", "--memory-limit SIZE"),
    ("Sandbox(max_processes=...)", "--max-processes N"),
    ("Sandbox(max_open_files=...)", "--max-open-files N"),
    ("Sandbox(cpu_time=...)", "--cpu-time SECONDS"),
    ("Sandbox(max_scratch_size=...)", "--scratch-size SIZE"),
    ("Sandbox(max_file_size=...)", "--max-file-size SIZE"),
    ("Sandbox(fetch=False)", "the sandbox's settings"),
    ('returns="object"', "--returns object"),
    ("returns='object'", "--returns object"),
    ('returns="weights"', "--returns weights"),
    ("returns='weights'", "--returns weights"),
    ('returns="remote"', "`safehub run`"),
    ("trust_repo=True", "--trust"),
    ("force_reload=True", "--force-reload"),
    ("skip_validation=True", "--skip-validation"),
    ("without lock=", "without --locked"),
    ("safehub.set_dir() or TORCH_HOME", "--hub-dir or TORCH_HOME"),
)


def cli_words(message: str) -> str:
    """``message`` with the Python API's advice said in the command line's words."""
    for python, cli in CLI_WORDS:
        message = message.replace(python, cli)
    return message


def _plain(exc: BaseException, args: argparse.Namespace | None) -> str:
    """The error's own message, on one line whatever it holds, its control characters made visible,
    in the command line's words."""
    if isinstance(exc, errors.SafeHubError):
        message = exc.message
    elif isinstance(exc, OSError) and exc.filename is not None:
        message = f"{exc.strerror or exc}: {exc.filename}"
    else:
        message = str(exc) or type(exc).__name__
    return cli_words(" ".join(visible(message).split()))


def _untrusted(exc: BaseException, args: argparse.Namespace | None) -> str:
    repo = getattr(exc, "repo", None)
    if args is None or not repo:
        return _plain(exc, args)
    if args.command == "load":
        other_way = "or load weights only (the default, without --returns object or --no-isolate), which needs no trust"
    else:
        other_way = "or drop --no-isolate: in the sandbox no trust is needed"
    return (f"{repo} is not trusted, and its code would run outside the sandbox. Trust it with "
            f"--trust or `safehub trust add {repo}`; {other_way}.")


def _no_entrypoint(exc: BaseException, args: argparse.Namespace | None) -> str:
    if args is None or not getattr(args, "model", None):
        return _plain(exc, args)
    local = " --source local" if getattr(args, "source", "github") == "local" else ""
    suggestions = getattr(exc, "suggestions", None) or []
    guess = f"did you mean {' or '.join(repr(s) for s in suggestions)}? " if suggestions else ""
    return (f"{args.repo} has no entrypoint {args.model!r}; {guess}`safehub list {args.repo}{local}` shows "
            "the entrypoints it has.")


def _remote(exc: BaseException, args: argparse.Namespace | None) -> str:
    message = _plain(exc, args)
    if getattr(exc, "remote_traceback", "") and not (args and args.debug):
        message += " (--debug shows the repository's traceback)"
    return message


def _unexpected(exc: BaseException, args: argparse.Namespace | None) -> str:
    return (f"unexpected {type(exc).__name__}: {_plain(exc, args)} "
            "(this may be a bug in safehub; --debug shows the traceback)")


class Rule(NamedTuple):
    error: type[BaseException]
    exit_code: int | None  # None: the error carries its own (CommandError.exit_code)
    message: Message | None  # None: end silently


ERROR_TABLE: tuple[Rule, ...] = (
    # Not errors: the user pressed Ctrl-C, or the reader of stdout left (`safehub cache list | head`).
    Rule(KeyboardInterrupt, EXIT_INTERRUPTED, None),
    Rule(BrokenPipeError, EXIT_ERROR, None),
    Rule(CommandError, None, _plain),
    Rule(errors.InvalidRefError, EXIT_USAGE, _plain),
    Rule(errors.InvalidArgumentError, EXIT_USAGE, _plain),
    Rule(errors.UntrustedRepoError, EXIT_UNTRUSTED, _untrusted),
    # Integrity above the network rows: a HashMismatchError is a DownloadError, a ForkCommitError
    # a GitHubError, and neither is cured by a retry.
    Rule(errors.HashMismatchError, EXIT_INTEGRITY, _plain),
    Rule(errors.LockFileError, EXIT_INTEGRITY, _plain),
    Rule(errors.TreeChangedError, EXIT_INTEGRITY, _plain),
    Rule(errors.ForkCommitError, EXIT_INTEGRITY, _plain),
    Rule(errors.ArchiveError, EXIT_INTEGRITY, _plain),
    Rule(errors.DamagedCacheError, EXIT_INTEGRITY, _plain),  # what `cache verify` would find
    Rule(errors.FetchRefusedError, EXIT_INTEGRITY, _plain),  # a rule of the fetch policy: no retry cures it
    # The caller's disk, not the network: a download into a full hub dir is no network failure.
    Rule(errors.DiskFullError, EXIT_ERROR, _plain),
    # A name to fix, not a failure a retry would cure.
    Rule(errors.RepoNotFoundError, EXIT_ERROR, _plain),
    Rule(errors.RefNotFoundError, EXIT_ERROR, _plain),
    Rule(errors.GitHubError, EXIT_NETWORK, _plain),
    Rule(errors.OfflineError, EXIT_NETWORK, _plain),
    Rule(errors.DownloadError, EXIT_NETWORK, _plain),
    Rule(errors.EntrypointNotFoundError, EXIT_ERROR, _no_entrypoint),
    Rule(errors.RemoteError, EXIT_ERROR, _remote),
    Rule(errors.SandboxLimitError, EXIT_ERROR, _remote),
    Rule(errors.SafeHubError, EXIT_ERROR, _plain),
    Rule(OSError, EXIT_ERROR, _plain),  # a file that could not be read or written
    Rule(BaseException, EXIT_ERROR, _unexpected),  # a bug: still one line, unless --debug
)


def _rule_for(exc: BaseException) -> Rule:
    return next(rule for rule in ERROR_TABLE if isinstance(exc, rule.error))


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an exception (the table in ``safehub --help``)."""
    rule = _rule_for(exc)
    if rule.exit_code is None:
        # Only here: other errors' ``exit_code`` (WorkerCrashedError's) is the worker's, not ours.
        return int(getattr(exc, "exit_code", EXIT_ERROR))
    return rule.exit_code


def error_line(exc: BaseException, args: argparse.Namespace | None) -> str | None:
    """The one line to print after ``safehub: error:``, or None to end silently."""
    message = _rule_for(exc).message
    return None if message is None else message(exc, args)
