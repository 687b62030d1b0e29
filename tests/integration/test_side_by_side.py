"""Two branches of one repository in one process: broken under torch.hub, working with isolate=True.

Both branches have a helper package ``models`` and an entrypoint ``net``; only the code differs.
torch.hub imports the first branch's ``models`` into ``sys.modules`` and hands it to the second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import safehub

pytestmark = pytest.mark.usefixtures("worker_start")  # cold and warm workers alike

HUBCONF = "dependencies = ['torch']\nfrom models.net import Net\n\n\ndef net():\n    return Net()\n"


def net_source(branch: str, op: str) -> str:
    return (
        "import torch\n\n\n"
        "class Net(torch.nn.Module):\n"
        f"    branch = {branch!r}\n\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        f"        self.scale = torch.nn.Parameter(torch.full((3,), {2.0 if branch == 'main' else 3.0}))\n\n"
        "    def forward(self, x):\n"
        f"        return x {op} self.scale\n"
    )


@pytest.fixture
def two_branches(make_repo):
    repo = make_repo("acme", "twins", {
        "hubconf.py": HUBCONF,
        "models/__init__.py": "",
        "models/net.py": net_source("main", "+"),
    })
    repo.checkout("dev", create=True)
    repo.commit("dev: multiply", files={"models/net.py": net_source("dev", "*")})
    repo.checkout("main")
    return repo


def test_objects_of_two_branches_keep_their_own_code(two_branches, hub_dir):
    path_before = list(sys.path)
    x = torch.ones(3)
    for spec in ("acme/twins:main", "acme/twins:dev", "acme/twins:main", "acme/twins:dev"):
        model = safehub.load(spec, "net", isolate=True, returns="object", trust_repo=True)
        expected = ("main", x + 2.0) if spec.endswith("main") else ("dev", x * 3.0)
        assert (model.branch, model(x).tolist()) == (expected[0], expected[1].tolist())
    assert "models" not in sys.modules and "hubconf" not in sys.modules
    from_hub = [n for n, m in list(sys.modules.items()) if str(getattr(m, "__file__", "")).startswith(str(hub_dir))]
    assert from_hub == []
    assert sys.path == path_before


def test_weights_of_two_branches(two_branches):
    dev = safehub.load("acme/twins:dev", "net", isolate=True, returns="weights")
    main = safehub.load("acme/twins:main", "net", isolate=True, returns="weights")
    assert main["scale"].tolist() == [2.0] * 3 and dev["scale"].tolist() == [3.0] * 3


TORCH_HUB_PAIR = """
import json, sys, torch
x = torch.ones(3)
out = []
for ref in ("main", "dev"):
    # skip_validation: the refs are in the cache safehub filled; torch.hub needs no network then.
    model = torch.hub.load(f"acme/twins:{ref}", "net", trust_repo=True, skip_validation=True, verbose=False)
    out.append([model.branch, model(x).tolist()])
print(json.dumps(out))
"""


def test_the_same_pair_fails_under_plain_torch_hub(two_branches, hub_dir):
    # safehub fills the shared cache (torch.hub's own folder names), then torch.hub loads from it.
    for ref in ("main", "dev"):
        safehub.load(f"acme/twins:{ref}", "net", isolate=True, returns="weights")
    assert {"acme_twins_main", "acme_twins_dev"} <= set(os.listdir(hub_dir))
    env = {**os.environ, "TORCH_HOME": str(hub_dir.parent)}
    done = subprocess.run([sys.executable, "-c", TORCH_HUB_PAIR], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    main, dev = json.loads(done.stdout.strip().splitlines()[-1])
    assert main == ["main", [3.0, 3.0, 3.0]]
    # torch.hub gave the dev entrypoint main's `models` package, already in sys.modules.
    assert dev[0] == "main" and dev != ["dev", [3.0, 3.0, 3.0]]
