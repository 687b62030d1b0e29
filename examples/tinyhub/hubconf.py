"""A tiny hub repository: what safehub's README demo loads."""

dependencies = ["torch"]

from models.mlp import TinyMLP  # noqa: E402  (a helper package of this repository)


def tiny_mlp(hidden: int = 16, seed: int = 0):
    """A two-layer perceptron, 4 inputs to 2 outputs, with weights drawn from ``seed``.

    Args:
        hidden: width of the hidden layer.
        seed: seed for the weights, so every load gives the same model.
    """
    import torch

    torch.manual_seed(seed)
    return TinyMLP(hidden)


def greeting(name: str = "world") -> str:
    """Say hello (an entrypoint that returns no tensors)."""
    return f"hello, {name}, from tinyhub"
