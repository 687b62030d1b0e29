"""The rules of the worker's conversation that need no worker: the returns modes, the failure table.

The modes are DESIGN 2's trust table, declared once (``safehub/_run/returns.py``); the failure
table turns each category the worker sends (``worker/failures.py``, ``worker/work.py``,
``worker/remote.py``) into one safehub error, and refuses a category where its kind of frame
may not carry it. Real workers speak both in ``tests/integration/test_conversation.py`` and
``tests/security/test_question_floods.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from safehub._run import conversation, returns
from safehub._worker import hubconf as _hubconf
from safehub._worker import protocol
from safehub.errors import (
    EntrypointNotFoundError,
    HubconfError,
    HubconfNotFoundError,
    InvalidArgumentError,
    MissingDependenciesError,
    ProtocolError,
    RemoteError,
    ResultDecodeError,
    SandboxError,
)

CALL = conversation.Subject(model="net", repo_dir=Path("/repos/net"))
REMOTE_CALL = conversation.Subject(remote_call="encode()", remote_whose="the remote model's encode()")


def test_each_mode_is_declared_once_with_design_2s_trust():
    assert list(returns.MODES) == ["object", "weights", "remote"]
    assert {name for name, mode in returns.MODES.items() if mode.needs_trust} == {"object"}
    assert {name for name, mode in returns.MODES.items() if mode.keeps_worker} == {"remote"}
    assert {name for name, mode in returns.MODES.items() if mode.in_process} == {"object"}


@pytest.mark.parametrize("isolated, mode, needed", [
    (False, None, True),  # list or help in-process: as torch.hub
    (False, returns.OBJECT, True),
    (True, None, False),  # isolated list or help: no code comes back
    (True, returns.OBJECT, True),  # the object's code comes into the caller
    (True, returns.WEIGHTS, False),
    (True, returns.REMOTE, False),
])
def test_trust_is_needed_exactly_where_code_runs_outside_the_sandbox(isolated, mode, needed):
    assert returns.trust_needed(isolated, mode) is needed


@pytest.mark.parametrize("value", ["pickle", "Weights", "", None, 3])
def test_an_unknown_mode_names_the_known_ones(value):
    with pytest.raises(InvalidArgumentError, match="'object', 'weights', 'remote'"):
        returns.mode_of(value)


def failed(kind: str, category: str, **fields) -> protocol.Frame:
    return protocol.Frame(kind, {"error": category, "type": "ValueError", "message": "no luck", "traceback": "tb", **fields})


@pytest.mark.parametrize("category, fields, error, message", [
    ("hubconf_missing", {}, HubconfNotFoundError, "No hubconf.py in /repos/net"),
    ("hubconf_unreadable", {}, HubconfError, "no luck"),
    ("missing_dependencies", {"missing": ["scipy"]}, MissingDependenciesError, _hubconf.missing_dependencies_message(["scipy"])),
    ("entrypoint_not_found", {}, EntrypointNotFoundError, _hubconf.entrypoint_not_found_message("net", [])),
    ("exception", {"phase": "call"}, RemoteError, "the entrypoint 'net' raised: ValueError: no luck"),
    ("exception", {"phase": "import"}, RemoteError, "hubconf.py raised while being imported: ValueError: no luck"),
    ("bad_result", {}, ResultDecodeError, "no luck"),
    ("sandbox", {"layer": "landlock"}, SandboxError, "no luck"),
])
def test_each_error_category_of_a_call_is_its_error(category, fields, error, message):
    got = conversation.failure_of(failed(protocol.ERROR, category, **fields), CALL)
    assert type(got) is error and got.message == message


@pytest.mark.parametrize("category, error, message", [
    ("exception", RemoteError, "the remote model's encode() raised ValueError: no luck"),
    ("bad_result", ResultDecodeError, "no luck"),
    ("no_method", InvalidArgumentError, "no luck"),
    ("arguments", InvalidArgumentError, "no luck"),
    ("no_attribute", AttributeError, "no luck"),
])
def test_each_failure_category_of_a_remote_call_is_its_error(category, error, message):
    got = conversation.failure_of(failed(protocol.FAILED, category), REMOTE_CALL)
    assert type(got) is error and getattr(got, "message", str(got)) == message
    if error is RemoteError:
        assert got.remote_type == "ValueError" and got.remote_traceback == "tb"


@pytest.mark.parametrize("kind, category", [
    (protocol.ERROR, "no_method"),  # a remote call's category in a call's ERROR
    (protocol.FAILED, "sandbox"),  # a call's category in a remote call's FAILED
    (protocol.ERROR, "made_up"),
    (protocol.FAILED, "__class__"),
])
def test_a_category_its_frame_may_not_carry_breaks_the_protocol(kind, category):
    with pytest.raises(ProtocolError, match="unknown category"):
        conversation.failure_of(failed(kind, category), CALL if kind == protocol.ERROR else REMOTE_CALL)


def test_malformed_facts_break_the_protocol_and_text_is_capped():
    with pytest.raises(ProtocolError, match="missing dependencies"):
        conversation.failure_of(failed(protocol.ERROR, "missing_dependencies", missing=[1]), CALL)
    huge = "x" * (conversation.MAX_TEXT * 3)
    got = conversation.failure_of(failed(protocol.FAILED, "bad_result", message=huge, traceback=huge), REMOTE_CALL)
    assert len(got.message) == len(got.remote_traceback) == conversation.MAX_TEXT


def test_a_success_is_no_failure():
    assert conversation.failure_of(protocol.Frame(protocol.RESULT, {"action": "list"}), CALL) is None
    assert conversation.failure_of(protocol.Frame(protocol.RETURNED, {"value": None}), REMOTE_CALL) is None


def test_the_table_holds_every_category_the_worker_sends_and_no_other():
    root = Path(__file__).resolve().parents[2] / "worker"
    sent = set()
    for name in ("work.py", "remote.py", "failures.py"):
        sent |= set(re.findall(r'\b(?:_error|error|_failed)\("([a-z_]+)"', (root / name).read_text()))
    assert sent == set(conversation.FAILURES)
