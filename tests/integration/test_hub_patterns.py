"""HUB_PATTERNS.md's timm, dinov2 and fairseq rows, reproduced and loaded under isolate=True.

Each fixture repository (served by the GitHub emulator) fetches the way the real one does:

- timm (huggingface/pytorch-image-models): ``hf_hub_download`` of ``model.safetensors`` first,
  and on huggingface_hub's ``EntryNotFoundError`` the ``pytorch_model.bin``.
- dinov2 (facebookresearch/dinov2): ``load_state_dict_from_url(url, map_location="cpu")``, and a
  tokenizer through ``requests.get``.
- fairseq (pytorch/fairseq): ``requests.head`` for the ETag, then a streamed ``requests.get``
  into ``$TORCH_HOME/pytorch_fairseq/<sha256(url)>.<sha256(etag)>``, loaded with
  ``weights_only=False``.

Each loads with ``returns="weights"`` and ``returns="remote"``, and in-process as the control.
The Hub and the file hosts are the loopback stand-ins (``tests/hf_hub_emulator.py``, the GitHub
emulator's file server).
"""

from __future__ import annotations

import hashlib
import io
import os
import textwrap

import pytest
import torch
from safetensors.torch import save

import safehub

SANDBOX = safehub.Sandbox(timeout=120)
STATE = {"weight": torch.arange(12.0).reshape(3, 4) / 10, "bias": torch.tensor([0.5, -1.0, 2.0])}

TIMM = {
    "hubconf.py": '''
        dependencies = ["torch", "huggingface_hub"]
        from timm_like.models import tiny_net  # noqa: E402
    ''',
    "timm_like/__init__.py": "",
    "timm_like/_hub.py": '''
        import torch
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError


        def load_state_dict_from_hf(model_id, filename="pytorch_model.bin", cache_dir=None):
            # timm's _hub.py: the safetensors file first, the pickle only when there is none
            try:
                cached_safe_file = hf_hub_download(repo_id=model_id, filename="model.safetensors", cache_dir=cache_dir)
                import safetensors.torch
                return safetensors.torch.load_file(cached_safe_file, device="cpu")
            except EntryNotFoundError:
                pass
            cached_file = hf_hub_download(model_id, filename=filename, cache_dir=cache_dir)
            return torch.load(cached_file, map_location="cpu", weights_only=True)
    ''',
    "timm_like/models.py": '''
        import torch
        from ._hub import load_state_dict_from_hf


        def tiny_net(pretrained=False, hf_hub_id="timm/tiny_net.in1k"):
            model = torch.nn.Linear(4, 3)
            if pretrained:
                model.load_state_dict(load_state_dict_from_hf(hf_hub_id))
            return model
    ''',
}

DINOV2 = {
    "hubconf.py": '''
        dependencies = ["torch", "requests"]
        from dinov2_like.hub import dinov2_tiny  # noqa: E402
    ''',
    "dinov2_like/__init__.py": "",
    "dinov2_like/hub.py": '''
        import requests
        import torch


        def dinov2_tiny(weights_url, tokenizer_url, pretrained=True):
            model = torch.nn.Linear(4, 3)
            if pretrained:
                state_dict = torch.hub.load_state_dict_from_url(weights_url, map_location="cpu")
                model.load_state_dict(state_dict, strict=True)
            # the text tower's tokenizer: a plain requests.get
            vocab = requests.get(tokenizer_url, timeout=10).text.split()
            model.register_buffer("vocab_size", torch.tensor([len(vocab)]))
            return model
    ''',
}

FAIRSEQ = {
    "hubconf.py": '''
        dependencies = ["torch", "requests"]
        from fairseq_like.models import tiny_lm  # noqa: E402
    ''',
    "fairseq_like/__init__.py": "",
    "fairseq_like/file_utils.py": '''
        import os
        import shutil
        import tempfile
        from hashlib import sha256

        import torch


        def url_to_filename(url, etag=None):
            filename = sha256(url.encode("utf-8")).hexdigest()
            if etag:
                filename += "." + sha256(etag.encode("utf-8")).hexdigest()
            return filename


        def get_from_cache(url, cache_dir=None):
            # fairseq's file_utils: $TORCH_HOME/pytorch_fairseq, a HEAD for the ETag, a streamed GET
            cache_dir = cache_dir or os.getenv("PYTORCH_FAIRSEQ_CACHE", os.path.join(torch.hub._get_torch_home(), "pytorch_fairseq"))
            os.makedirs(cache_dir, exist_ok=True)
            import requests
            response = requests.head(url, allow_redirects=True, timeout=10)
            etag = response.headers.get("ETag") if response.status_code == 200 else None
            cache_path = os.path.join(cache_dir, url_to_filename(url, etag))
            if not os.path.exists(cache_path):
                with tempfile.NamedTemporaryFile() as temp_file:
                    req = requests.get(url, stream=True, timeout=10)
                    for chunk in req.iter_content(chunk_size=1024):
                        if chunk:
                            temp_file.write(chunk)
                    temp_file.flush()
                    temp_file.seek(0)
                    with open(cache_path, "wb") as cache_file:
                        shutil.copyfileobj(temp_file, cache_file)
            return cache_path
    ''',
    "fairseq_like/models.py": '''
        import torch
        from .file_utils import get_from_cache, url_to_filename


        def tiny_lm(checkpoint_url, etag):
            path = get_from_cache(checkpoint_url)
            assert path.endswith(url_to_filename(checkpoint_url, etag)), path
            model = torch.nn.Linear(4, 3)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
            return model
    ''',
}


def dedented(files):
    return {name: textwrap.dedent(text) for name, text in files.items()}


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(params=["weights", "remote", "in-process"])
def mode(request):
    if request.param == "in-process":
        request.getfixturevalue("hf_in_process")  # this process's huggingface_hub on the stand-in
    return request.param


def run(repo, entry, mode, **kwargs):
    """The model's weights and its output on a fixed input, however it was loaded."""
    x = torch.ones(2, 4)
    if mode == "in-process":
        model = safehub.load(repo, entry, trust_repo=True, **kwargs)
        return {k: v.detach() for k, v in model.state_dict().items()}, model(x).detach()
    if mode == "remote":
        with safehub.load(repo, entry, isolate=SANDBOX, returns="remote", **kwargs) as model:
            return model.state_dict(), model(x)
    weights = safehub.load(repo, entry, isolate=SANDBOX, returns="weights", **kwargs)
    return weights, x @ weights["weight"].T + weights["bias"]


def expected_output():
    return torch.ones(2, 4) @ STATE["weight"].T + STATE["bias"]


@pytest.mark.parametrize("hosted", ["model.safetensors", "pytorch_model.bin"])
def test_timm_hf_hub_download_with_its_safetensors_first_fallback(make_repo, hf_hub, hf_cache, mode, hosted):
    make_repo("huggingface", "pytorch-image-models", dedented(TIMM))
    data = save(STATE) if hosted == "model.safetensors" else pickled(STATE)
    commit = hf_hub.add_repo("timm/tiny_net.in1k", {"config.json": b"{}", hosted: data})
    weights, out = run("huggingface/pytorch-image-models", "tiny_net", mode, pretrained=True)
    assert torch.equal(weights["weight"], STATE["weight"]) and torch.allclose(out, expected_output())
    assert (hf_cache / "models--timm--tiny_net.in1k" / "snapshots" / commit / hosted).is_file()


def test_dinov2_load_state_dict_from_url_and_a_requests_tokenizer(make_repo, github, hub_dir, mode):
    make_repo("facebookresearch", "dinov2", dedented(DINOV2))
    weights_url = github.add_file("dinov2_tiny_pretrain.pth", pickled(STATE))
    tokenizer_url = github.add_file("bpe_simple_vocab.txt", b"a b c d e")
    weights, out = run("facebookresearch/dinov2", "dinov2_tiny", mode, weights_url=weights_url, tokenizer_url=tokenizer_url)
    assert weights["vocab_size"].tolist() == [5] and torch.allclose(out, expected_output())
    assert (hub_dir / "checkpoints" / "dinov2_tiny_pretrain.pth").is_file()  # torch.hub's layout, shared


def test_fairseq_requests_head_then_get_into_its_torch_home_folder(make_repo, hf_hub, hub_dir, mode):
    make_repo("pytorch", "fairseq", dedented(FAIRSEQ))
    data = pickled({"model": STATE, "args": {"arch": "tiny_lm"}})
    digest = hashlib.sha256(data).hexdigest()
    hf_hub.blobs[digest] = data  # the stand-in's CDN as fairseq's file host (HEAD with an ETag, GET)
    url = f"{hf_hub.cdn_url}/lfs/{digest}"
    weights, out = run("pytorch/fairseq", "tiny_lm", mode, checkpoint_url=url, etag=f'"{digest}"')
    assert torch.equal(weights["weight"], STATE["weight"]) and torch.allclose(out, expected_output())
    assert [r.method for r in hf_hub.requests("cdn")] == ["HEAD", "GET"]
    kept = hub_dir.parent / "pytorch_fairseq"
    # in-process it lands in the user's TORCH_HOME as with torch.hub; the sandbox keeps it in its scratch
    assert kept.is_dir() == (mode == "in-process")
    assert os.listdir(kept) if kept.is_dir() else True
