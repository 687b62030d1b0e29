"""safehub's main job on the bundled example: load a hub repository without running it here.

Run from the repository root after setup:  .venv/bin/python examples/demo.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import safehub

REPO_DIR = Path(__file__).resolve().parent / "tinyhub"


def main() -> int:
    print(f"Repository: {REPO_DIR} (a hubconf.py and a helper package 'models')\n")

    entrypoints = safehub.list(str(REPO_DIR), source="local", isolate=True)
    print("Entrypoints, listed in the sandbox:", entrypoints)
    print("Docstring of tiny_mlp:", (safehub.help(str(REPO_DIR), "tiny_mlp", source="local", isolate=True) or "").splitlines()[0])

    # Weights only: tensors come back as data, nothing of the repository runs in this process.
    weights = safehub.load(str(REPO_DIR), "tiny_mlp", hidden=8, source="local", isolate=True, returns="weights")
    print("\nWeights from the sandbox:")
    for name, tensor in weights.items():
        print(f"  {name:<16} {str(tuple(tensor.shape)):<10} {tensor.dtype}")

    # The whole object: its classes are pickled by value, so 'models' never enters sys.modules.
    model = safehub.load(str(REPO_DIR), "tiny_mlp", hidden=8, source="local", isolate=True)
    output = model(torch.ones(1, 4))
    print(f"\nObject from the sandbox: {type(model).__name__}, forward(ones) = {output.detach().numpy().round(4)}")
    print("'models' imported into this process:", "models" in sys.modules)
    same = all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    print("Weights and object agree:", same)
    return 0 if same and "models" not in sys.modules else 1


if __name__ == "__main__":
    sys.exit(main())
