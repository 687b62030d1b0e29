"""TorchScript in object results, from real workers: what gen-efficientnet-style repositories return.

Such a repository scripts its activations at import time (module-level ``@torch.jit.script``
functions, called from a custom autograd Function inside an nn.Module), scripts submodules and
traces models. None of that pickles; each script crosses as its ``torch.jit.save`` archive, and
every test compares the decoded object with the same code run in-process, on the same inputs.
"""

from __future__ import annotations

import sys

import pytest
import torch

import safehub
from safehub._run import run_isolated
from safehub._sandbox import Sandbox
from safehub._worker import hubconf as in_process
from tests.local_repos import imported_in_process, write_repo

pytestmark = pytest.mark.usefixtures("worker_start")  # cold and warm workers alike

SANDBOX = Sandbox(timeout=120)

HUBCONF = '''
    dependencies = ["torch"]

    import torch
    from nets.model import EffNet, Plain


    def effnet():
        return EffNet()


    def traced():
        return torch.jit.trace(Plain().eval(), torch.ones(1, 8))


    def activation():
        return EffNet().act_fn
'''

# Scripted at import time, like gen-efficientnet's activations_jit: a forward and a hand-written
# backward, glued by an autograd Function; its classes travel by value, these functions in their globals.
NETS_ACTIVATIONS = '''
    import torch
    from torch import nn


    @torch.jit.script
    def swish_forward(x):
        return x.mul(torch.sigmoid(x))


    @torch.jit.script
    def swish_backward(x, grad_output):
        s = torch.sigmoid(x)
        return grad_output * (s * (1 + x * (1 - s)))


    class SwishFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return swish_forward(x)

        @staticmethod
        def backward(ctx, grad_output):
            return swish_backward(ctx.saved_tensors[0], grad_output)


    def swish(x, inplace=False):
        return SwishFunction.apply(x)


    class Swish(nn.Module):
        def forward(self, x):
            return SwishFunction.apply(x)
'''

NETS_MODEL = '''
    import torch
    from torch import nn

    from nets.activations import Swish, swish, swish_forward


    class EffNet(nn.Module):
        """Eager layers, an activation layer and function on scripted code, and a scripted block."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Linear(8, 16)
            self.act = Swish()
            self.act_fn = swish  # kept as an attribute, as gen-efficientnet's blocks keep get_act_fn()
            self.head = torch.jit.script(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))

        def forward(self, x):
            return self.head(self.act_fn(self.act(self.stem(x))) + swish_forward(x).sum())


    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.body(x).softmax(-1)
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    files = {"hubconf.py": HUBCONF, "nets/__init__.py": "", "nets/activations.py": NETS_ACTIVATIONS, "nets/model.py": NETS_MODEL}
    return write_repo(tmp_path_factory.mktemp("jit") / "repo", files)


def in_process_result(repo, entrypoint):
    with imported_in_process(repo) as module:
        return in_process.get_entrypoint(module, entrypoint)()


def outputs_and_gradients(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    y.pow(2).sum().backward()  # through the scripted hand-written backward
    return y.detach(), x.grad


def test_a_model_on_module_level_scripted_functions(repo):
    model = run_isolated(repo, "load", model="effnet", sandbox=SANDBOX)
    expected = in_process_result(repo, "effnet")
    assert type(model).__name__ == "EffNet" and "nets.model" not in sys.modules
    x = torch.randn(5, 8)
    got, want = outputs_and_gradients(model, x), outputs_and_gradients(expected, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # The eager weights came as storages, the scripted block's inside its archive: all equal.
    assert list(model.state_dict()) == list(expected.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert isinstance(model.head, torch.jit.ScriptModule)
    assert model.stem.weight.grad is not None and all(p.grad is not None for p in model.head.parameters())


def test_a_traced_model(repo):
    model = run_isolated(repo, "load", model="traced", sandbox=SANDBOX)
    expected = in_process_result(repo, "traced")
    assert isinstance(model, torch.jit.ScriptModule)
    x = torch.randn(4, 8)
    assert torch.equal(model(x), expected(x))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_a_function_whose_globals_hold_scripted_functions(repo):
    act_fn = run_isolated(repo, "load", model="activation", sandbox=SANDBOX)
    expected = in_process_result(repo, "activation")
    x = torch.randn(3, 8)
    assert torch.equal(outputs_and_gradients(act_fn, x)[1], outputs_and_gradients(expected, x)[1])


# Two branches whose scripted functions share a qualified name (__torch__.acts.scale) but not a body.
BRANCH_HUBCONF = "dependencies = ['torch']\nfrom acts import Net\n\n\ndef net():\n    return Net()\n"


def branch_acts(op: str) -> str:
    return (
        "import torch\n\n\n"
        "@torch.jit.script\n"
        f"def scale(x):\n    return x {op} 3.0\n\n\n"
        "class Net(torch.nn.Module):\n"
        "    def forward(self, x):\n        return scale(x)\n"
    )


def test_two_branches_keep_their_own_scripted_code(make_repo):
    repo = make_repo("acme", "jit", {"hubconf.py": BRANCH_HUBCONF, "acts.py": branch_acts("+")})
    repo.checkout("dev", create=True)
    repo.commit("dev: multiply", files={"acts.py": branch_acts("*")})
    repo.checkout("main")
    x = torch.ones(2)
    models = {ref: safehub.load(f"acme/jit:{ref}", "net", isolate=True, returns="object", trust_repo=True) for ref in ("main", "dev")}
    assert models["main"](x).tolist() == [4.0, 4.0] and models["dev"](x).tolist() == [3.0, 3.0]
    assert models["main"](x).tolist() == [4.0, 4.0]  # the second load replaced nothing of the first
