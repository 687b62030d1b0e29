"""A hub repository of corpus-like models, for remote calls to be compared with in-process ones.

The shapes of what real hub repositories publish (HUB_PATTERNS.md): an image classifier (a small
conv net with batch norm and dropout), a segmentation UNet (skip connections, an ``encode``
method giving its features), and a tiny language model whose ``forward`` returns several
outputs in a dataclass (as ``transformers``' ``ModelOutput`` does) and whose ``generate`` is a
greedy decoding loop. Every entrypoint seeds torch, so a worker and this process build the same
weights. Its helper package is ``models``, the name branches of one repository collide on.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from tests.local_repos import write_repo
from safehub._worker import hubconf as in_process

HUBCONF = '''
dependencies = ["torch"]

import torch

from models.convnet import ConvNet
from models.lm import TinyLM
from models.unet import UNet


def convnet(num_classes=10):
    """A small image classifier: conv, batch norm, pooling, dropout, linear."""
    torch.manual_seed(0)
    return ConvNet(num_classes)


def unet(channels=8):
    """A small segmentation UNet with skip connections."""
    torch.manual_seed(1)
    return UNet(channels)


def tiny_lm(vocab=50, width=32):
    """A tiny causal language model with several outputs and a greedy generate()."""
    torch.manual_seed(2)
    return TinyLM(vocab, width)
'''

CONVNET = '''
import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(torch.flatten(self.features(x), 1)))

    def predict(self, x, top=3):
        """Labels and scores of the top classes, as plain Python data."""
        scores, labels = self.forward(x).softmax(-1).topk(top)
        return {"labels": labels.tolist(), "scores": scores.tolist(), "top": top}
'''

UNET = '''
import torch
from torch import nn


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.down1, self.down2, self.bottom = block(3, c), block(c, 2 * c), block(2 * c, 4 * c)
        self.pool = nn.MaxPool2d(2)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2), block(4 * c, 2 * c)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2), block(2 * c, c)
        self.head = nn.Conv2d(c, 1, 1)

    def encode(self, x):
        """The encoder's features at each scale, finest first."""
        d1 = self.down1(x)
        d2 = self.down2(self.pool(d1))
        return [d1, d2, self.bottom(self.pool(d2))]

    def forward(self, x):
        d1, d2, b = self.encode(x)
        u2 = self.dec2(torch.cat([self.up2(b), d2], 1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], 1))
        return torch.sigmoid(self.head(u1))
'''

LM = '''
from collections import namedtuple
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LMOutput:
    logits: torch.Tensor
    hidden_states: tuple
    loss: object = None


Generated = namedtuple("Generated", ["sequences", "scores"])


class TinyLM(nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        hidden = [h]
        for layer in self.layers:
            h = h + torch.tanh(layer(h)).cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
            hidden.append(h)
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
        return LMOutput(logits=logits, hidden_states=tuple(hidden), loss=loss)

    def generate(self, input_ids, max_new_tokens=5, return_scores=False):
        """Greedy decoding: the prompt and the new tokens; with return_scores, each step's best score."""
        ids, scores = input_ids, []
        for _ in range(max_new_tokens):
            best = self.forward(ids).logits[:, -1].max(-1)
            ids = torch.cat([ids, best.indices[:, None]], 1)
            scores.append(float(best.values[0]))
        return Generated(ids, scores) if return_scores else ids
'''

FILES = {
    "hubconf.py": HUBCONF,
    "models/__init__.py": "",
    "models/convnet.py": CONVNET,
    "models/unet.py": UNET,
    "models/lm.py": LM,
}


def write_models_repo(root: Path) -> Path:
    """The repository, written under ``root``; returns ``root``."""
    return write_repo(root, FILES)


@contextlib.contextmanager
def models_in_process(repo: Path) -> Iterator[ModuleType]:
    """The repository's hubconf imported here, and its own modules forgotten afterwards.

    Only the repository's: torch imports submodules lazily while the models run, and forgetting
    those would make the next import register torch's operators twice.
    """
    try:
        with in_process.prepended_sys_path(str(repo)):
            yield in_process.import_hubconf(str(repo))
    finally:
        for name, module in list(sys.modules.items()):
            if name == "hubconf" or str(getattr(module, "__file__", "")).startswith(str(repo)):
                del sys.modules[name]
