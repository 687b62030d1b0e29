"""The ``safehub`` command as a user runs it: real subprocesses against the loopback GitHub emulator.

Each subprocess inherits this test's environment (the emulator's URLs from the ``github`` fixture,
TORCH_HOME from the autouse ``hub_dir`` fixture), so it shares the test's hub dir: a test may fill
or inspect the cache in-process and check what the command did. Subprocesses start with stdin on
/dev/null, as in CI: no terminal, so no prompt.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import safehub
from safehub import _api, _cache, _trust, cli

HUBCONF = '''
dependencies = ["torch"]

import sys

import torch


def net(n=2, scale=1.0):
    """A tiny linear net: weight filled with scale, bias 0.5."""
    model = torch.nn.Linear(n, 1)
    with torch.no_grad():
        model.weight.fill_(scale)
        model.bias.fill_(0.5)
    return model


def echo(**kwargs):
    """Returns its keyword arguments."""
    print("echo on stdout, which is the worker's")
    return kwargs


def sleepy():
    """Sleeps until interrupted."""
    import time
    print("started", flush=True)
    time.sleep(60)
'''


def safehub_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safehub", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=dict(os.environ) if env is None else env,
                          timeout=timeout)


def assert_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exit ``code``, exactly one ``safehub: error:`` line on stderr, no traceback; return the line."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("safehub: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def records() -> list[_cache.CacheEntry]:
    return list(_cache.iter_records()) if _cache.hub_path().is_dir() else []


@pytest.fixture
def repo(make_repo):
    repo = make_repo("acme", "models", {"hubconf.py": HUBCONF})
    repo.tag("v1")
    return repo


# -- help texts and usage errors (in-process: no torch, no network) ------------------------------------


def test_help_texts_show_examples_and_exit_codes(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text and "examples:" in text
    for code in cli.EXIT_CODES:
        assert f"\n  {code} " in text
    commands = (["list"], ["help"], ["load"], ["trust"], ["trust", "add"], ["cache"], ["cache", "list"],
                ["cache", "verify"], ["cache", "clean"], ["doctor"], ["lock"])
    for command in commands:
        assert cli.main([*command, "--help"]) == 0
        assert "example" in capsys.readouterr().out, command


def test_usage_errors_exit_2(capsys, tmp_path):
    assert cli.main(["load", "acme/models", "net"]) == cli.EXIT_USAGE  # no --output
    assert cli.main(["load", "acme/models", "net", "--arg", "no-equals", "-o", "x"]) == cli.EXIT_USAGE
    assert cli.main(["load", "acme/models", "net", "--memory-limit", "lots", "-o", "x"]) == cli.EXIT_USAGE
    assert cli.main(["list", "acme/models", "--no-isolate", "--timeout", "5"]) == cli.EXIT_USAGE
    assert cli.main(["trust", "add", "acme/models:main"]) == cli.EXIT_USAGE
    assert cli.main(["cache", "clean", "acme/models", "--all"]) == cli.EXIT_USAGE
    capsys.readouterr()


def test_arg_values_are_json_when_they_parse():
    assert cli._parse_kwarg("k=3") == ("k", 3)
    assert cli._parse_kwarg("k=true") == ("k", True)
    assert cli._parse_kwarg('k="s"') == ("k", "s")
    assert cli._parse_kwarg("k=[1, 2]") == ("k", [1, 2])
    assert cli._parse_kwarg("k=resnet") == ("k", "resnet")
    assert cli._parse_kwarg("k=a=b") == ("k", "a=b")
    assert cli._parse_size("4G") == 4 * 1024**3 and cli._parse_size("512MiB") == 512 * 1024**2
    assert cli._parse_size("none") is None


# -- list, help, load (isolated: no trust needed) ---------------------------------------------------


def test_list_and_help_in_the_sandbox_need_no_trust(repo, github):
    proc = assert_ok(safehub_cli("list", "acme/models"))
    assert proc.stdout.split() == ["echo", "net", "sleepy"]
    assert "Downloading:" in proc.stderr

    proc = assert_ok(safehub_cli("list", "acme/models:v1", "--json"))
    assert json.loads(proc.stdout) == {"repo": "acme/models:v1", "entrypoints": ["echo", "net", "sleepy"]}

    proc = assert_ok(safehub_cli("help", "acme/models", "net", "--json"))
    assert json.loads(proc.stdout)["doc"].startswith("A tiny linear net")
    assert "Using cache found in" in proc.stderr
    assert not _trust.trusted_list_path().exists(), "isolated list/help must not need or record trust"


def test_load_weights_of_an_untrusted_repository(repo, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "net.safetensors"
    proc = assert_ok(safehub_cli("load", "acme/models:v1", "net", "--arg", "n=3", "--arg", "scale=2",
                                 "--output", str(out), "--json", "--timeout", "120", "--memory-limit", "4G"))
    report = json.loads(proc.stdout)
    assert report["tensors"] == 2 and report["elements"] == 4 and report["bytes"] == out.stat().st_size
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == ["bias", "weight"]
        assert f.get_tensor("weight").tolist() == [[2.0, 2.0, 2.0]]
        assert f.get_tensor("bias").tolist() == [0.5]
        assert f.metadata()["safehub.repo"] == "acme/models:v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"], "no temporary file left"
    assert not _trust.trusted_list_path().exists()


def test_load_object_needs_trust(repo, tmp_path):
    import torch

    out = tmp_path / "echo.pt"
    args = ["load", "acme/models", "echo", "--returns", "object", "--output", str(out),
            "--arg", "k=3", "--arg", "flag=true", "--arg", 's="x"', "--arg", "word=hello"]
    # No terminal: an untrusted repository fails at once, naming the fix, and writes nothing.
    line = assert_error(safehub_cli(*args), cli.EXIT_UNTRUSTED, "acme/models", "--trust", "safehub trust add")
    assert "weights" in line
    assert not out.exists()

    proc = assert_ok(safehub_cli(*args, "--trust"))
    assert "echo on stdout" in proc.stderr and "echo on stdout" not in proc.stdout, "stdout holds results only"
    assert torch.load(out, weights_only=False) == {"k": 3, "flag": True, "s": "x", "word": "hello"}
    assert _trust.read_trusted() == ["acme_models"]


def test_no_isolate_needs_trust_and_local_source(repo, tmp_path):
    assert_error(safehub_cli("list", "acme/models", "--no-isolate"), cli.EXIT_UNTRUSTED, "--no-isolate")
    proc = assert_ok(safehub_cli("list", str(repo.path), "--source", "local", "--no-isolate", "--json"))
    assert json.loads(proc.stdout)["entrypoints"] == ["echo", "net", "sleepy"]


# -- trust ---------------------------------------------------------------------------------------------


def test_trust_add_list_remove():
    assert_ok(safehub_cli("trust", "add", "acme/models"))
    assert _trust.read_trusted() == ["acme_models"]
    proc = assert_ok(safehub_cli("trust", "list", "--json"))
    data = json.loads(proc.stdout)
    assert data["entries"] == ["acme_models"] and data["trusted_list"] == str(_trust.trusted_list_path())
    proc = assert_ok(safehub_cli("trust", "remove", "acme/models", "--json"))
    assert json.loads(proc.stdout)["changed"] is True
    assert _trust.read_trusted() == []


# -- lock files ----------------------------------------------------------------------------------------


def test_lock_round_trip_and_tampering(repo, github, tmp_path):
    lock_path = tmp_path / "safehub.lock"
    out = tmp_path / "net.safetensors"
    proc = assert_ok(safehub_cli("lock", "acme/models:v1", "acme/models"))
    lock = json.loads(proc.stdout)
    lock_path.write_text(proc.stdout)
    pin = lock["repos"]["acme/models:v1"]
    assert pin["commit_sha"] == repo.head_sha("main") and len(pin["archive_sha256"]) == 64
    assert lock["repos"]["acme/models"]["ref"] == "main"

    # From an empty cache, a locked load downloads the pinned archive and asks the API nothing.
    assert_ok(safehub_cli("cache", "clean", "--all"))
    assert records() == []
    github.clear_log()
    assert_ok(safehub_cli("load", "acme/models:v1", "net", "--locked", str(lock_path), "--output", str(out)))
    assert out.exists()
    assert github.requests("api") == []
    assert len(github.requests("codeload")) == 1

    # A lock without the repository: integrity error, one line naming the fix.
    assert_error(safehub_cli("list", "acme/models:main", "--locked", str(lock_path)),
                 cli.EXIT_INTEGRITY, "no entry for acme/models:main", "safehub lock")

    # Tampered: the archive no longer matches the pin, and nothing is installed or written.
    assert_ok(safehub_cli("cache", "clean", "--all"))
    out.unlink()
    lock["repos"]["acme/models:v1"]["archive_sha256"] = "0" * 64
    lock_path.write_text(json.dumps(lock))
    assert_error(safehub_cli("load", "acme/models:v1", "net", "--locked", str(lock_path), "--output", str(out)),
                 cli.EXIT_INTEGRITY, "sha256", "lock file")
    assert records() == []
    assert not out.exists()


# -- offline -------------------------------------------------------------------------------------------


def test_offline_with_and_without_cache(repo, github, tmp_path):
    out = tmp_path / "net.safetensors"
    assert_error(safehub_cli("--offline", "load", "acme/models:v1", "net", "--output", str(out)),
                 cli.EXIT_NETWORK, "Offline mode", "acme/models:v1")
    assert github.requests() == [] and not out.exists()

    _api.pin("acme/models:v1")  # fill the cache, in-process
    github.clear_log()
    env = {**os.environ, "SAFEHUB_OFFLINE": "1"}
    proc = assert_ok(safehub_cli("load", "acme/models:v1", "net", "--output", str(out), "--json", env=env))
    assert json.loads(proc.stdout)["tensors"] == 2
    assert "Using cache found in" in proc.stderr
    assert github.requests() == []


# -- errors ---------------------------------------------------------------------------------------------


def test_bad_repo_string(tmp_path):
    assert_error(safehub_cli("load", "../../etc/passwd", "net", "--output", str(tmp_path / "x")),
                 cli.EXIT_USAGE, "owner/repo")


def test_unknown_entrypoint(repo, tmp_path):
    out = tmp_path / "x.safetensors"
    assert_error(safehub_cli("load", "acme/models", "nope", "--output", str(out)), cli.EXIT_ERROR, "nope")
    assert not out.exists()


def test_unknown_repository_network_down_and_rate_limit(repo, github):
    assert_error(safehub_cli("list", "acme/missing"), cli.EXIT_ERROR, "acme/missing")
    nowhere = {**os.environ, "SAFEHUB_GITHUB_API_URL": "http://127.0.0.1:9"}
    assert_error(safehub_cli("list", "acme/models", env=nowhere), cli.EXIT_NETWORK, "Could not reach")
    github.set_fault("rate_limit")
    assert_error(safehub_cli("list", "acme/models"), cli.EXIT_NETWORK, "rate limit", "GITHUB_TOKEN")


def test_debug_shows_the_traceback(repo, github):
    github.set_fault("rate_limit")
    proc = safehub_cli("--debug", "list", "acme/models")
    assert proc.returncode == cli.EXIT_NETWORK
    assert "Traceback" in proc.stderr and "RateLimitError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("safehub: error:")


def test_ctrl_c_exits_130_quietly(repo, tmp_path):
    _api.pin("acme/models")  # cached, so the command goes straight to the worker
    proc = subprocess.Popen([sys.executable, "-m", "safehub", "load", "acme/models", "sleepy",
                             "--output", str(tmp_path / "x")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ))
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"started" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
        assert b"started" in seen, seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == cli.EXIT_INTERRUPTED, (seen + err).decode(errors="replace")
    assert b"Traceback" not in err and b"safehub: error" not in err
    assert not (tmp_path / "x").exists()


# -- cache ----------------------------------------------------------------------------------------------


def test_cache_list_verify_and_clean(repo, github):
    _api.pin("acme/models:v1")
    _api.pin("acme/models:main")
    proc = assert_ok(safehub_cli("cache", "list", "--json"))
    data = json.loads(proc.stdout)
    assert data["hub_dir"] == safehub.get_dir()
    rows = {row["folder"]: row for row in data["entries"]}
    assert set(rows) == {"acme_models_v1", "acme_models_main"}
    assert rows["acme_models_v1"]["commit_sha"] == repo.head_sha("main")
    assert rows["acme_models_v1"]["size_bytes"] > 0 and rows["acme_models_v1"]["age_s"] >= 0

    # A file changed in one cached tree: verify names it, and only it, with the integrity code.
    entry = _cache.read_record("acme_models_main")
    (entry.repo_dir / "hubconf.py").write_text("print('owned')\n")
    proc = safehub_cli("cache", "verify")
    assert_error(proc, cli.EXIT_INTEGRITY, "acme_models_main")
    assert "acme_models_v1" not in proc.stderr
    assert "CHANGED  acme_models_main" in proc.stdout and "ok       acme_models_v1" in proc.stdout
    proc = assert_ok(safehub_cli("cache", "verify", "acme/models:v1", "--json"))
    assert json.loads(proc.stdout)["ok"] is True

    # Without a selection, clean only says what --all would remove.
    proc = assert_ok(safehub_cli("cache", "clean"))
    assert "would remove acme_models_main" in proc.stdout and "Nothing was removed" in proc.stderr
    assert len(records()) == 2
    proc = assert_ok(safehub_cli("cache", "clean", "acme/models:main", "--json"))
    assert [row["folder"] for row in json.loads(proc.stdout)["entries"]] == ["acme_models_main"]
    assert [e.folder for e in records()] == ["acme_models_v1"]
    assert not (Path(safehub.get_dir()) / "acme_models_main").exists()


# -- doctor ---------------------------------------------------------------------------------------------


def test_doctor_never_shows_the_token(github):
    env = {**os.environ, "GITHUB_TOKEN": "supersecret"}
    proc = assert_ok(safehub_cli("doctor", env=env))
    assert "supersecret" not in proc.stdout + proc.stderr
    assert "GITHUB_TOKEN:  set" in proc.stdout
    assert safehub.get_dir() in proc.stdout and github.api_url in proc.stdout
    assert "sandbox layers" in proc.stdout

    proc = assert_ok(safehub_cli("--offline", "doctor", "--json", env=env))
    assert "supersecret" not in proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["github_token_set"] is True and report["offline"] is True
    assert report["github_api_url"] == github.api_url and report["github_api_url_from_env"] is True
    assert report["hub_dir"] == safehub.get_dir()
    layers = report["sandbox_layers"]
    assert layers is None or all({"available", "detail"} <= set(v) for v in layers.values())
