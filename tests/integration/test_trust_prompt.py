"""The trust prompt on a real terminal (a pty), as a user meets it."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

import safehub

CHILD = r"""
import sys, safehub
try:
    print("RESULT", safehub.load(sys.argv[1], "which", trust_repo=sys.argv[2] if sys.argv[2] == "check" else False))
except Exception as exc:
    print("ERROR", type(exc).__name__, exc)
"""


def run_on_terminal(spec: str, trust_repo: str, answer: str | None) -> str:
    """Run a loader with a pty as its terminal; type ``answer`` at the prompt if one shows."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, spec, trust_repo], stdin=slave,
                            stdout=slave, stderr=slave, env=dict(os.environ), close_fds=True)
    os.close(slave)
    output = b""
    answered = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
                if not answered and b"(y/N)?" in output and answer is not None:
                    os.write(master, answer.encode() + b"\n")
                    answered = True
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(master)
    return output.decode(errors="replace")


@pytest.fixture
def repo(make_repo):
    return make_repo("stranger", "code", {"hubconf.py": "def which():\n    return 'ran'\n"})


def trusted():
    path = os.path.join(safehub.get_dir(), "trusted_list")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


@pytest.mark.parametrize(("answer", "outcome"), [
    ("y", "RESULT ran"),
    ("yes", "RESULT ran"),
    ("", "ERROR UntrustedRepoError Untrusted repository"),
    ("no", "ERROR UntrustedRepoError Untrusted repository"),
    ("maybe", "ERROR InvalidArgumentError Unrecognized response"),
])
def test_prompt_answers(repo, answer, outcome):
    out = run_on_terminal("stranger/code", "check", answer)
    assert "does not belong to the list of trusted repositories" in out
    assert outcome in out
    assert trusted() == (["stranger_code"] if outcome.startswith("RESULT") else [])


def test_trust_repo_false_asks_even_when_trusted(repo):
    assert "RESULT ran" in run_on_terminal("stranger/code", "check", "y")
    out = run_on_terminal("stranger/code", "false", "n")
    assert "(y/N)?" in out and "Untrusted repository" in out
    # A refusal does not take back an earlier trust, as in torch.hub.
    assert trusted() == ["stranger_code"]
