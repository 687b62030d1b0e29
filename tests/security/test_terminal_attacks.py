"""Terminal escapes in every string from the worker: errors, entrypoint names, docstrings, CLI output.

A repository chooses the text of its exceptions (class name and message), its entrypoints' names
and docstrings, and a remote model's return values. Printed raw, an escape sequence writes the
user's clipboard (OSC 52), sets the window title (OSC 0), clears the screen, moves the cursor, or
a newline starts a fake ``safehub:`` line. The canary: no control character reaches what the
caller prints (the error's text, as an uncaught exception's report shows it; the values; the
CLI's stdout and stderr, plain and ``--json``), and no line of it starts with the fake one. Call
and remote mode, cold and warm, with every sandbox layer the machine offers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import safehub
from safehub._run import run_isolated
from safehub._sandbox import Sandbox
from safehub.errors import RemoteError
from tests.local_repos import write_repo

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("worker_start")]
SANDBOX = Sandbox(timeout=60)
ROOT = Path(__file__).resolve().parents[2]

# OSC 52 (clipboard), OSC 0 (title), clear screen, cursor up, a C1 CSI, a bidi override, and a
# line that passes for safehub's own.
PAYLOAD = "\x1b]52;c;cHduZWQ=\x07\x1b]0;owned\x07\x1b[2J\x1b[1A\x9b31m\u202e\r\nsafehub: all checks passed\n"
FAKE_LINE = re.compile(r"^safehub: all checks passed", re.M)
# Every control character (C0 but tab and newline, DEL, C1) and the format characters used above.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

HOSTILE = f'''
    import os
    dependencies = []
    PAYLOAD = {PAYLOAD!r}
    Evil = type("Evil" + PAYLOAD, (Exception,), {{}})

    if os.path.exists(os.path.join(os.path.dirname(__file__), "FAIL_IMPORT")):
        raise Evil("import" + PAYLOAD)


    def entry():
        """Docs{PAYLOAD!r}"""
        raise Evil("call" + PAYLOAD)


    globals()["named" + PAYLOAD] = entry


    class Model:
        def echo(self, value):
            return value

        def fail(self):
            raise Evil("remote" + PAYLOAD)


    def model():
        return Model()
'''


@pytest.fixture
def repo(tmp_path):
    return write_repo(tmp_path / "hostile", {"hubconf.py": HOSTILE})


def assert_harmless(text: str, *, lines_are_the_repositorys: bool = False) -> None:
    """No raw control character; no line that passes for safehub's, unless every line of
    ``text`` is the repository's by definition (a docstring, as ``help`` shows it)."""
    assert not RAW.search(text), f"a raw control character would reach the terminal: {text[:300]!r}"
    if not lines_are_the_repositorys:
        assert not FAKE_LINE.search(text), f"a line passes for safehub's own: {text[:300]!r}"


def test_the_repositorys_exception_text_is_made_visible(repo):
    with pytest.raises(RemoteError) as info:
        run_isolated(repo, "load", model="entry", sandbox=SANDBOX)
    text = str(info.value)
    assert "\\x1b]52;c;cHduZWQ=\\x07" in text and "call" in text  # the attack arrived, visible
    assert_harmless(text)
    assert_harmless("".join(__import__("traceback").format_exception(info.value)))


def test_a_remote_models_exception_text_is_made_visible(repo):
    with run_isolated(repo, "load", model="model", returns="remote", sandbox=SANDBOX) as remote:
        with pytest.raises(RemoteError) as info:
            remote.fail()
        assert remote.echo(PAYLOAD) == PAYLOAD  # values are the caller's data: returned as they are
    assert "\\x1b]0;owned\\x07" in str(info.value)
    assert_harmless(str(info.value))


def test_entrypoint_names_and_docstrings_are_made_visible(repo):
    names = run_isolated(repo, "list", sandbox=SANDBOX)
    assert any(name.startswith("named\\x1b]52") for name in names)
    doc = run_isolated(repo, "help", model="entry", sandbox=SANDBOX)
    assert doc.startswith("Docs'\\x1b]52")
    for name in names:
        assert_harmless(name)
    assert_harmless(doc, lines_are_the_repositorys=True)


def safehub_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "safehub", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=environ, timeout=240, cwd=ROOT)


@pytest.mark.parametrize("command", [
    ("list",), ("list", "--json"), ("help", "entry"), ("help", "entry", "--json"),
    ("load", "entry", "-o", "{tmp}/out.safetensors"), ("load", "entry", "-o", "{tmp}/out.safetensors", "--debug"),
    ("list", "import"),
])
def test_the_cli_shows_no_escape_of_the_repository(repo, tmp_path, command):
    env = {"SAFEHUB_WARM": os.environ.get("SAFEHUB_WARM", "0")}
    if command[-1] == "import":
        command = command[:-1]
        (repo / "FAIL_IMPORT").touch()
    name, *rest = (part.replace("{tmp}", str(tmp_path)) for part in command)
    proc = safehub_cli(name, str(repo), *rest, "--source", "local", env=env)
    assert_harmless(proc.stdout, lines_are_the_repositorys=name == "help" and "--json" not in rest)
    assert_harmless(proc.stderr)
    # The attack reached the output, made visible: the run saw it.
    assert "x1b]52;c;cHduZWQ=" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    if "--json" in rest:
        json.loads(proc.stdout)


def test_safehub_errors_show_no_raw_control_character():
    # Every error, whatever text it is given: the one place messages are made visible.
    error = safehub.errors.SandboxError("layer" + PAYLOAD, layer="x")
    assert_harmless(str(error))
    assert_harmless(str(safehub.errors.RemoteError("m" + PAYLOAD, remote_traceback="Traceback\n" + PAYLOAD)))
