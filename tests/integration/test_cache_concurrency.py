"""Real processes against one hub dir: one download for many loaders, and crashes leave no half tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import safehub

CHILD = r"""
import sys, safehub
result = safehub.load(sys.argv[1], "which", trust_repo=True, verbose=False)
print("RESULT", result)
"""


def spawn(spec: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def reap(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)  # waits, and closes the pipes


@pytest.fixture
def repo(make_repo):
    return make_repo("acme", "shared", {"hubconf.py": "def which():\n    return 'ok'\n",
                                         "blob.bin": os.urandom(512 * 1024).hex()})


@pytest.mark.slow
def test_eight_processes_download_once(repo, github):
    # A slow body keeps the first download open while the others arrive and queue on the lock.
    github.set_fault("slow", delay=0.05)
    procs = [spawn("acme/shared") for _ in range(8)]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        reap(procs)
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "RESULT ok" in out
    assert len(github.requests("codeload")) == 1
    assert len(github.requests("web", path_prefix="/acme/shared/zipball/")) == 1


@pytest.mark.slow
def test_killed_mid_download_leaves_no_half_cache(repo, github):
    github.set_fault("slow", delay=0.2)
    proc = spawn("acme/shared")
    try:
        deadline = time.monotonic() + 60
        while not github.requests("codeload") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # well inside the body
        proc.send_signal(signal.SIGKILL)
    finally:
        reap([proc])
    hub = safehub.get_dir()
    assert not os.path.exists(os.path.join(hub, "acme_shared_main"))
    assert not os.path.exists(os.path.join(hub, ".safehub", "repos", "acme_shared_main.json"))
    github.clear_faults()
    assert safehub.load("acme/shared", "which", trust_repo=True) == "ok"
    # The dead process's scratch was swept by the next install.
    assert os.listdir(os.path.join(hub, ".safehub", "tmp")) == []
