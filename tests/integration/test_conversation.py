"""Protocol v3: a call is a conversation. A real worker asks the parent mid-call and waits.

The parent answers (value, buffers, file descriptors), refuses (no handler, or the handler
says no), or ends the call; a worker that asks in a way the protocol does not declare, or asks
without end, is cut off with a ProtocolError. Runs on the cold and the warm path, with every
sandbox layer: the conversation needs no hole in the sandbox.
"""

from __future__ import annotations

import os

import pytest

from tests.local_repos import write_repo
from safehub._asks import Refusal
from safehub._run import conversation, run_isolated
from safehub._sandbox import Sandbox
from safehub.errors import ProtocolError

pytestmark = pytest.mark.usefixtures("worker_start")
SANDBOX = Sandbox(timeout=60)

# The worker's channel is reachable by any code in the sandbox; hostile code reaching it is the
# threat this protocol is built for, so the tests use it the same way.
HUBCONF = '''
    import os
    import sys

    dependencies = []


    def _channel():
        return sys.modules["_safehub_worker.work"].channel()


    def ask(what, **args):
        try:
            value, buffers, fds = _channel().ask(what, args)
        except Exception as exc:
            return {"refused": f"{type(exc).__name__}: {exc}"}
        data = [os.read(fd, 100).decode() for fd in fds]
        for fd in fds:
            os.close(fd)
        return {"value": value, "buffers": [bytes(b).decode() for b in buffers], "fds": data}


    def ask_many(n):
        answers = [_channel().ask("count", {"i": i})[0] for i in range(n)]
        return answers


    def forged(fields):
        import socket
        proto = sys.modules["_safehub_worker.protocol"]
        sock = _channel().sock
        proto.send_frame(sock, "ask", fields)
        return proto.recv_frame(sock, deadline=None).kind
'''


@pytest.fixture
def repo(tmp_path):
    return write_repo(tmp_path / "talker", {"hubconf.py": HUBCONF})


def test_a_question_without_a_handler_is_refused(repo):
    result = run_isolated(repo, "load", model="ask", args=("fetch",), kwargs={"url": "http://x/"}, sandbox=SANDBOX)
    assert result == {"refused": "Refused: the parent does not serve 'fetch' requests"}


def test_a_question_is_answered_with_data_buffers_and_descriptors(repo):
    seen = []

    def echo(args):
        seen.append(args)
        r, w = os.pipe()
        os.write(w, b"through a pipe")
        os.close(w)
        return {"echo": args["text"], "n": 3}, [b"a buffer"], [r]

    result = run_isolated(repo, "load", model="ask", args=("echo",), kwargs={"text": "hi"}, sandbox=SANDBOX, asks={"echo": echo})
    assert seen == [{"text": "hi"}]
    assert result == {"value": {"echo": "hi", "n": 3}, "buffers": ["a buffer"], "fds": ["through a pipe"]}


def test_a_handler_refuses_with_its_reason(repo):
    def no(args):
        raise Refusal(f"not {args['url']}")

    result = run_isolated(repo, "load", model="ask", args=("fetch",), kwargs={"url": "http://10.0.0.1/"}, sandbox=SANDBOX, asks={"fetch": no})
    assert result == {"refused": "Refused: not http://10.0.0.1/"}


def test_questions_are_answered_in_order(repo):
    result = run_isolated(repo, "load", model="ask_many", args=(50,), sandbox=SANDBOX, asks={"count": lambda args: (args["i"] * 2, [], [])})
    assert result == [i * 2 for i in range(50)]


def test_a_worker_asking_without_end_is_cut_off(repo, monkeypatch):
    monkeypatch.setattr(conversation, "MAX_ASKS", 20)
    with pytest.raises(ProtocolError, match="more than 20 questions"):
        run_isolated(repo, "load", model="ask_many", args=(1000,), sandbox=SANDBOX, asks={"count": lambda args: (0, [], [])})


@pytest.mark.parametrize(
    "fields",
    [
        {"id": "1", "what": "echo", "args": {}},  # an id that is not an int
        {"id": 1, "what": "echo"},  # no args
        {"id": 1, "what": 7, "args": {}},  # a what that is not a str
        {"id": True, "what": "echo", "args": {}},  # a bool is not an int
    ],
)
def test_a_question_the_protocol_does_not_declare_ends_the_call(repo, fields):
    called = []
    with pytest.raises(ProtocolError, match="ask frame"):
        run_isolated(repo, "load", model="forged", args=(fields,), sandbox=SANDBOX, asks={"echo": lambda a: called.append(a) or (1, [], [])})
    assert called == []  # no handler saw it
