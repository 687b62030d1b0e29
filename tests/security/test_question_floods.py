"""Hostile questions: a worker that asks without end, or floods questions while reading no reply.

The repository's code holds the worker's channel (the threat the protocol is built for), so each
attack uses it as hostile code would: through the worker's own ``Channel`` (each reply read) or
as raw ASK frames written behind its back (no reply read). The parent must end the call at once
with a ProtocolError, never answer past its cap, and never block on a worker that does not read:
a stalled parent would end in WorkerTimeoutError instead. The canaries: the parent's handler
counts what it served (the attack ran, and no further than the rule allows), and the worker's
tree is gone. Plain calls run cold and warm; a remote model's calls too (``returns="remote"``).
"""

from __future__ import annotations

import pytest

from safehub._run import conversation, run_isolated
from safehub._sandbox import Sandbox
from safehub.errors import ProtocolError, RemoteClosedError
from tests.local_repos import write_repo
from tests.process_trees import all_gone, tree_of

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("worker_start")]
# A stalled parent would show as WorkerTimeoutError after this; the attacks end long before.
SANDBOX = Sandbox(timeout=90)
FLOOD = 20_000  # raw questions: far more than the socket buffers hold, both ways

HOSTILE = '''
    import os
    import socket
    import sys

    dependencies = []

    def _channel():
        return sys.modules["_safehub_worker.work"].channel()


    def _proto():
        return sys.modules["_safehub_worker.protocol"]


    def ask_and_read(n):
        """Ask n questions through the worker's own channel, reading every reply."""
        for i in range(n):
            try:
                _channel().ask("count", {"i": i})
            except Exception as exc:
                if type(exc).__name__ != "Refused":
                    raise
        return "asked them all"


    def flood(n):
        """Write n questions behind the worker's back and read no reply."""
        sock = socket.socket(fileno=os.dup(_channel().sock.fileno()))
        sock.setblocking(True)  # the channel is non-blocking, and a dup shares that
        head = _proto().encode_head("ask", {"id": 1, "what": "count", "args": {}})
        for _ in range(n):
            sock.sendall(head)
        return "flooded"


    class Model:
        def ask_and_read(self, n):
            return ask_and_read(n)

        def flood(self, n):
            return flood(n)

        def echo(self, value):
            return value


    def model():
        return Model()
'''


class Counter:
    """The parent's handler of "count": counts what it served."""

    def __init__(self) -> None:
        self.served = 0

    def __call__(self, args: dict):
        self.served += 1
        return self.served, [], []


@pytest.fixture
def repo(tmp_path):
    return write_repo(tmp_path / "asker", {"hubconf.py": HOSTILE})


def test_a_call_asking_past_the_cap_ends_at_once(repo):
    counter = Counter()
    with pytest.raises(ProtocolError, match=f"more than {conversation.MAX_ASKS} questions"):
        run_isolated(repo, "load", model="ask_and_read", args=(conversation.MAX_ASKS * 3,),
                     sandbox=SANDBOX, asks={"count": counter}, returns="weights")
    assert counter.served == conversation.MAX_ASKS  # every question up to the cap answered, none past it


def test_a_call_flooding_questions_without_reading_ends_at_once(repo):
    counter = Counter()
    with pytest.raises(ProtocolError, match="one at a time"):
        run_isolated(repo, "load", model="flood", args=(FLOOD,), sandbox=SANDBOX, asks={"count": counter},
                     returns="weights")
    assert counter.served == 1  # the first question was answered; the second showed the flood


def test_a_legitimate_worker_asking_up_to_the_cap_is_served(repo):
    counter = Counter()
    # The boundary of the rule: the cap's worth of questions, one at a time, each reply read.
    assert run_isolated(repo, "load", model="ask_and_read", args=(conversation.MAX_ASKS,), sandbox=SANDBOX,
                        asks={"count": counter}) == "asked them all"
    assert counter.served == conversation.MAX_ASKS


@pytest.mark.parametrize("attack, why", [
    ("ask_and_read", f"more than {conversation.MAX_ASKS} questions"),
    ("flood", "one at a time"),
])
def test_a_remote_call_asking_without_end_or_flooding_ends_the_worker_at_once(repo, attack, why):
    counter = Counter()
    remote = run_isolated(repo, "load", model="model", returns="remote", sandbox=SANDBOX, asks={"count": counter})
    processes = tree_of(remote.pid)
    try:
        with pytest.raises(ProtocolError, match=why):
            getattr(remote, attack)(FLOOD if attack == "flood" else conversation.MAX_ASKS * 3)
        assert counter.served == 0  # a remote model's calls may not fetch: every question refused
        assert remote.closed and all_gone(processes)
        with pytest.raises(RemoteClosedError, match=f"broke the protocol during a call to {attack}"):
            remote.echo(1)
    finally:
        remote.close()
