"""The fleet recipe, run whole: lock, bake a hub dir, serve it read-only and offline, catch tampering.

As README's "Fleets" section: ``safehub lock REPO --load ENTRY`` pins the repository, the nested
repository it loads and the checkpoint it downloads; ``safehub cache fill --locked`` bakes them
into a fresh hub dir; the baked dir is then mounted read-only (as root: a private mount namespace,
``mount --bind`` + ``mount -o remount,bind,ro``; as an unprivileged user: the files' write bits
taken away, which the owner cannot write through either) and serves locked loads offline with no
file written into it. A file of the image changed afterwards is refused with exit code 5.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safehub import cli

OUTER = """\
import torch
from torch.hub import load_state_dict_from_url

dependencies = ["torch"]


def net(url):
    inner = torch.hub.load("acme/inner:main", "scale", trust_repo=True)
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(load_state_dict_from_url(url, progress=False))
    with torch.no_grad():
        model.weight.mul_(inner)
    return model
"""

INNER = """\
dependencies = []


def scale():
    return 2.0
"""

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def served(make_repo, github):
    make_repo("acme", "outer", {"hubconf.py": OUTER})
    make_repo("acme", "inner", {"hubconf.py": INNER})
    state = {"weight": torch.arange(12.0).reshape(3, 4), "bias": torch.tensor([1.0, 2.0, 3.0])}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    url = github.add_file(f"linear-{hashlib.sha256(data).hexdigest()[:8]}.pth", data)
    return url, state


def run(*args: str, env: dict[str, str], wrap: list[str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [*(wrap or []), sys.executable, "-m", "safehub", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path below ``root`` with its size, mtime and inode: what a write would change."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def read_only(torch_home: Path) -> list[str] | None:
    """How a command sees ``torch_home`` read-only: a wrapper (root), else None after taking write bits away."""
    if AS_ROOT:
        q = shlex.quote(str(torch_home))
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount --bind {q} {q} && mount -o remount,bind,ro {q} && exec "$@"', "sh"]
    for top, dirs, files in os.walk(torch_home):
        for name in dirs + files + [""]:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, os.lstat(path).st_mode & ~0o222)
    return None


def give_back_write(torch_home: Path) -> None:
    for top, dirs, files in os.walk(torch_home):
        for name in dirs + files + [""]:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, os.lstat(path).st_mode | stat.S_IWUSR)


@pytest.fixture
def baked(served, github, tmp_path):
    url, state = served
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "build-home")}
    lock = tmp_path / "safehub.lock"
    proc = run("lock", "acme/outer:main", "--load", "net", "--arg", f"url={url}", "-o", str(lock), env=env)
    assert proc.returncode == 0, proc.stderr
    pins = json.loads(lock.read_text())
    assert set(pins["repos"]) == {"acme/outer:main", "acme/inner:main"}
    assert all(len(p["tree_sha256"]) == 64 for p in pins["repos"].values())
    assert list(pins["files"]) == [url] and pins["files"][url]["place"] == "hub/checkpoints"

    # Bake: a fresh hub dir gets exactly what the lock pins, nothing run.
    image = tmp_path / "image"
    proc = run("--hub-dir", str(image / "hub"), "cache", "fill", "--locked", str(lock), "--json",
               env={**os.environ, "TORCH_HOME": str(image)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["repo"] for r in report["repos"]] == ["acme/inner:main", "acme/outer:main"]
    assert [f["url"] for f in report["files"]] == [url] and report["files"][0]["fetched"]
    assert {p.name for p in (image / "hub").iterdir()} == {"acme_inner_main", "acme_outer_main", "checkpoints", ".safehub"}
    # Filling again fetches nothing and checks what is there.
    github.clear_log()
    proc = run("--hub-dir", str(image / "hub"), "cache", "fill", "--locked", str(lock), env={**os.environ, "TORCH_HOME": str(image)})
    assert proc.returncode == 0 and github.requests() == [], proc.stderr
    # The image is root's (or this user's) and nobody else's to write: as a Dockerfile's COPY leaves it.
    os.chmod(image, 0o755)
    yield image, lock, state
    give_back_write(image)


def test_a_baked_read_only_hub_dir_serves_locked_loads_offline_and_nothing_is_written(baked, tmp_path):
    image, lock, state = baked
    before = snapshot(image)
    env = {**os.environ, "TORCH_HOME": str(image), "SAFEHUB_OFFLINE": "1",
           "SAFEHUB_GITHUB_URL": "http://127.0.0.1:9", "SAFEHUB_GITHUB_API_URL": "http://127.0.0.1:9"}
    url = next(iter(json.loads(lock.read_text())["files"]))
    # Writable, cached and offline: nothing is written either (views, memos and locks live elsewhere).
    proc = run("load", "acme/outer:main", "net", "--arg", f"url={url}", "--locked", str(lock),
               "-o", str(tmp_path / "first.safetensors"), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert snapshot(image) == before, "files written into a writable hub dir by a cached offline load"
    wrap = read_only(image)
    out = tmp_path / "w.safetensors"
    try:
        proc = run("load", "acme/outer:main", "net", "--arg", f"url={url}", "--locked", str(lock), "-o", str(out), env=env, wrap=wrap)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        from safetensors.torch import load_file

        weights = load_file(out)
        assert torch.equal(weights["weight"], state["weight"] * 2.0) and torch.equal(weights["bias"], state["bias"])
        proc = run("list", "acme/outer:main", "--locked", str(lock), env=env, wrap=wrap)
        assert proc.returncode == 0 and "net" in proc.stdout, proc.stdout + proc.stderr
        proc = run("help", "acme/outer:main", "net", "--locked", str(lock), env=env, wrap=wrap)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = run("cache", "verify", "--locked", str(lock), env=env, wrap=wrap)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # safehub run: the model stays in the sandbox (returns="remote"), only data crosses.
        from safetensors.torch import save_file

        x = torch.ones(1, 4)
        save_file({"0": x}, str(tmp_path / "x.safetensors"))
        proc = run("run", "acme/outer:main", "net", "--arg", f"url={url}", "--locked", str(lock),
                   "--input", str(tmp_path / "x.safetensors"), "--output", str(tmp_path / "y.safetensors"), env=env, wrap=wrap)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        expected = x @ (state["weight"] * 2.0).T + state["bias"]
        assert torch.allclose(load_file(tmp_path / "y.safetensors")["output"], expected)
    finally:
        if wrap is None:
            give_back_write(image)
    assert snapshot(image) == before, "files written into the read-only hub dir"


def test_a_tampered_image_is_refused_with_exit_5(baked, tmp_path):
    image, lock, _ = baked
    url = next(iter(json.loads(lock.read_text())["files"]))
    hubconf = image / "hub" / "acme_outer_main" / "hubconf.py"
    hubconf.write_text(hubconf.read_text() + "\nimport os\n")  # the image's file, changed after the bake
    env = {**os.environ, "TORCH_HOME": str(image), "SAFEHUB_OFFLINE": "1"}
    wrap = read_only(image)
    try:
        proc = run("load", "acme/outer:main", "net", "--arg", f"url={url}", "--locked", str(lock),
                   "-o", str(tmp_path / "w.safetensors"), env=env, wrap=wrap)
    finally:
        if wrap is None:
            give_back_write(image)
    output = proc.stdout + proc.stderr
    assert proc.returncode == cli.EXIT_INTEGRITY, output
    assert "~ hubconf.py" in output and "cache fill" in output
    assert not (tmp_path / "w.safetensors").exists()


def test_a_shared_hub_dir_serves_in_place_and_what_it_lacks_goes_to_the_writable_one(baked, make_repo, github, tmp_path):
    image, lock, state = baked
    url = next(iter(json.loads(lock.read_text())["files"]))
    make_repo("acme", "other", {"hubconf.py": INNER})
    own = tmp_path / "own-home"
    before = snapshot(image)
    env = {**os.environ, "TORCH_HOME": str(own), "SAFEHUB_SHARED_HUB_DIRS": str(image / "hub")}
    wrap = read_only(image)
    try:
        # The read-only hub dir alone: what must be downloaded fails, naming the dir and the fix.
        proc = run("list", "acme/other", env={**os.environ, "TORCH_HOME": str(image)}, wrap=wrap)
        assert proc.returncode == cli.EXIT_ERROR, proc.stdout + proc.stderr
        assert "read-only" in proc.stderr and str(image / "hub") in proc.stderr and "SAFEHUB_SHARED_HUB_DIRS" in proc.stderr
        github.clear_log()
        proc = run("--offline", "load", "acme/outer:main", "net", "--arg", f"url={url}", "--locked", str(lock),
                   "-o", str(tmp_path / "w.safetensors"), env=env, wrap=wrap)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert github.requests() == []
        # What the shared dir lacks is fetched into the writable one.
        proc = run("list", "acme/other", env=env, wrap=wrap)
        assert proc.returncode == 0 and "scale" in proc.stdout, proc.stdout + proc.stderr
    finally:
        if wrap is None:
            give_back_write(image)
    assert snapshot(image) == before, "files written into the shared hub dir"
    assert not list((own / "hub").glob("acme_outer_main")) and list((own / "hub").glob("acme_other_main"))
