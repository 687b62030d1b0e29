"""The command's error table: each error class exits with its code, and says one line about it.

The codes are a promise to scripts and CI (``safehub --help`` prints them), so each class is
pinned here by name; a new error class fails this test until someone decides its code.
"""

from __future__ import annotations

import argparse
import inspect

import pytest

from safehub import cli, errors
from safehub.cli import _errors

EXPECTED = {
    "SafeHubError": cli.EXIT_ERROR,
    "InvalidRefError": cli.EXIT_USAGE,
    "InvalidArgumentError": cli.EXIT_USAGE,
    "GitHubError": cli.EXIT_NETWORK,
    "RateLimitError": cli.EXIT_NETWORK,
    "AuthenticationError": cli.EXIT_NETWORK,
    "RepoNotFoundError": cli.EXIT_ERROR,
    "RefNotFoundError": cli.EXIT_ERROR,
    "ForkCommitError": cli.EXIT_INTEGRITY,
    "NetworkError": cli.EXIT_NETWORK,
    "OfflineError": cli.EXIT_NETWORK,
    "DownloadError": cli.EXIT_NETWORK,
    "IncompleteDownloadError": cli.EXIT_NETWORK,
    "HashMismatchError": cli.EXIT_INTEGRITY,
    "FetchRefusedError": cli.EXIT_INTEGRITY,
    "HubFileError": cli.EXIT_NETWORK,
    "ArchiveError": cli.EXIT_INTEGRITY,
    "LockFileError": cli.EXIT_INTEGRITY,
    "TreeChangedError": cli.EXIT_INTEGRITY,
    "ReadOnlyCacheError": cli.EXIT_ERROR,
    "UntrustedRepoError": cli.EXIT_UNTRUSTED,
    "HubconfError": cli.EXIT_ERROR,
    "MissingDependenciesError": cli.EXIT_ERROR,
    "EntrypointNotFoundError": cli.EXIT_ERROR,
    "WorkerError": cli.EXIT_ERROR,
    "RemoteError": cli.EXIT_ERROR,
    "WorkerCrashedError": cli.EXIT_ERROR,
    "WorkerTimeoutError": cli.EXIT_ERROR,
    "RemoteClosedError": cli.EXIT_ERROR,
    "ProtocolError": cli.EXIT_ERROR,
    "ResultDecodeError": cli.EXIT_ERROR,
    "SandboxError": cli.EXIT_ERROR,
    "HubconfNotFoundError": cli.EXIT_ERROR,
    "SandboxLimitError": cli.EXIT_ERROR,
    "DamagedCacheError": cli.EXIT_INTEGRITY,
    "DiskFullError": cli.EXIT_ERROR,
}


def error_classes() -> dict[str, type[errors.SafeHubError]]:
    return {name: cls for name, cls in vars(errors).items()
            if inspect.isclass(cls) and issubclass(cls, errors.SafeHubError)}


def args(**values: object) -> argparse.Namespace:
    return argparse.Namespace(**{"command": "list", "debug": False, **values})


def test_every_error_class_is_pinned():
    assert set(error_classes()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_error_class_exit_code(name):
    assert cli.exit_code_for(error_classes()[name]("message")) == EXPECTED[name]


def test_exit_codes_outside_the_error_tree():
    assert cli.exit_code_for(cli.CommandError("bad")) == cli.EXIT_ERROR
    for code in (cli.EXIT_USAGE, cli.EXIT_INTEGRITY):
        assert cli.exit_code_for(cli.CommandError("bad", exit_code=code)) == code
    # A worker's own exit status is a fact about the worker, never the command's exit code.
    assert cli.exit_code_for(errors.WorkerCrashedError("died", exit_code=7)) == cli.EXIT_ERROR
    assert cli.exit_code_for(PermissionError(13, "Permission denied", "/x")) == cli.EXIT_ERROR
    assert cli.exit_code_for(KeyboardInterrupt()) == cli.EXIT_INTERRUPTED
    assert cli.exit_code_for(BrokenPipeError()) == cli.EXIT_ERROR
    assert cli.exit_code_for(ZeroDivisionError("a bug")) == cli.EXIT_ERROR


def test_every_code_in_the_table_is_explained_in_help():
    codes = {rule.exit_code for rule in _errors.ERROR_TABLE} - {None}
    codes |= set(EXPECTED.values())
    assert codes <= set(cli.EXIT_CODES)


def test_messages_are_one_line_and_name_the_way_out():
    assert cli._errors.error_line(errors.SafeHubError("two\n  lines"), None) == "two lines"
    assert _errors.error_line(PermissionError(13, "Permission denied", "/x"), None) == "Permission denied: /x"
    untrusted = errors.UntrustedRepoError("no", repo="acme/models")
    assert "drop --no-isolate" in _errors.error_line(untrusted, args())
    assert "load weights only" in _errors.error_line(untrusted, args(command="load"))
    missing = errors.EntrypointNotFoundError("no", model="nope")
    assert "`safehub list acme/models --source local`" in _errors.error_line(
        missing, args(repo="acme/models", model="nope", source="local"))
    remote = errors.RemoteError("boom", remote_traceback="Traceback ...")
    assert _errors.error_line(remote, args()).endswith("(--debug shows the repository's traceback)")
    assert _errors.error_line(remote, args(debug=True)) == "boom"
    assert _errors.error_line(ValueError("x"), None).startswith("unexpected ValueError: x")


def test_interruptions_end_silently():
    assert _errors.error_line(KeyboardInterrupt(), args()) is None
    assert _errors.error_line(BrokenPipeError(), args()) is None


def test_every_option_the_cli_words_name_exists():
    """The command line's rendering of the library's advice names only options it has."""
    import re

    from safehub.cli._parser import build_parser

    parser = build_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    for sub in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        known |= {option for action in sub._actions for option in action.option_strings}
    for _, cli_phrase in _errors.CLI_WORDS:
        for option in re.findall(r"--[a-z][a-z-]*", cli_phrase):
            assert option in known, f"CLI_WORDS names {option}, which no command has"


@pytest.mark.parametrize(("python", "cli_phrase"), [
    ("the worker ran past its time limit of 1 s and was killed; raise it with Sandbox(timeout=...)", "--timeout SECONDS"),
    ("anything else needs isolate=safehub.Sandbox(network=True)", "needs --network"),
    ("raise it with Sandbox(memory_limit=...).", "--memory-limit SIZE"),
    ("Use returns=\"object\" to get the object itself.", "Use --returns object"),
    ("or load without lock=.", "or load without --locked."),
])
def test_the_cli_says_the_librarys_advice_in_its_own_words(python, cli_phrase):
    line = _errors.error_line(errors.SafeHubError(python), args())
    assert cli_phrase in line
    assert "Sandbox(" not in line and "returns=" not in line and "lock=" not in line


def test_the_workers_text_in_an_error_is_made_visible_where_the_error_is_made():
    import pickle

    error = errors.RemoteError("raised Evil\x1b]0;title\x07: boom\r\nsafehub: all good", remote_type="Evil\x1b",
                               remote_traceback="Traceback\n\x1b[2J  line\nsafehub: fake\n")
    text = str(error)
    assert "\x1b" not in text and "\r" not in text
    assert "raised Evil\\x1b]0;title\\x07: boom safehub: all good" in text  # one line, visible
    assert "\n[worker] \\x1b[2J  line\n[worker] safehub: fake" in text  # the traceback's lines marked
    assert error.remote_type == "Evil\x1b"  # facts stay as they came: data
    assert str(pickle.loads(pickle.dumps(error))) == text
    assert cli._errors.error_line(ValueError("raw\x9b2J"), None).startswith("unexpected ValueError: raw\\x9b2J")
