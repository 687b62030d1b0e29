"""``safehub run``: a third-party model called in the sandbox from a shell, with no trust.

Real subprocesses against the loopback GitHub emulator (as ``test_cli.py``): the corpus-like
repository of ``tests/remote_models.py`` is published as ``acme/zoo``, never trusted, and run on
tensors from a .safetensors file; the outputs match the same model called in this process.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from safehub import cli
from tests.integration.test_cli import assert_error, assert_ok, safehub_cli
from tests.remote_models import FILES, models_in_process, write_models_repo

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def zoo(make_repo):
    return make_repo("acme", "zoo", FILES)


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    repo = write_models_repo(tmp_path_factory.mktemp("zoo-local") / "repo")
    with models_in_process(repo) as hubconf:
        yield {"unet": hubconf.unet(channels=4), "tiny_lm": hubconf.tiny_lm()}


def test_run_an_untrusted_model_on_a_files_tensors(zoo, local_models, tmp_path):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    save_file({"0": x}, tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    proc = assert_ok(safehub_cli("run", "acme/zoo:main", "unet", "--arg", "channels=4",
                                 "--input", str(tmp_path / "in.safetensors"), "--output", str(out)))
    assert "Ran acme/zoo:main unet on 1 input(s)" in proc.stdout
    with torch.inference_mode():
        expected = local_models["unet"](x)
    torch.testing.assert_close(load_file(out)["output"], expected)


def test_keywords_methods_and_json(zoo, local_models, tmp_path):
    ids, labels = torch.tensor([[1, 5, 7, 2]]), torch.tensor([[5, 7, 2, 9]])
    save_file({"0": ids, "labels": labels}, tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    proc = assert_ok(safehub_cli("run", "acme/zoo", "tiny_lm", "--input", str(tmp_path / "in.safetensors"),
                                 "--output", str(out), "--json"))
    report = json.loads(proc.stdout)
    with torch.inference_mode():
        expected = local_models["tiny_lm"](ids, labels=labels)
    saved = load_file(out)
    assert sorted(saved) == ["hidden_states.0", "hidden_states.1", "hidden_states.2", "logits"]
    torch.testing.assert_close(saved["logits"], expected.logits)
    assert report["tensors"]["logits"] == {"dtype": "float32", "shape": [1, 4, 50]}
    assert report["values"]["loss"] == pytest.approx(expected.loss, rel=1e-5) and report["arguments"] == 2
    save_file({"0": ids}, tmp_path / "prompt.safetensors")
    assert_ok(safehub_cli("run", "acme/zoo", "tiny_lm", "--method", "generate", "--input", str(tmp_path / "prompt.safetensors"),
                          "--output", str(out)))
    with torch.inference_mode():
        assert torch.equal(load_file(out)["output"], local_models["tiny_lm"].generate(ids))


def test_mistakes_are_one_line_errors(zoo, tmp_path):
    save_file({"0": torch.ones(1), "2": torch.ones(1)}, tmp_path / "gap.safetensors")
    out = str(tmp_path / "out.safetensors")
    assert_error(safehub_cli("run", "acme/zoo", "unet", "--input", str(tmp_path / "missing.safetensors"), "--output", out),
                 cli.EXIT_ERROR, "no such file")
    assert_error(safehub_cli("run", "acme/zoo", "unet", "--input", str(tmp_path / "gap.safetensors"), "--output", out),
                 cli.EXIT_ERROR, "named 0, 1, ... without gaps")
    save_file({"0": torch.ones(1, 3, 8, 8)}, tmp_path / "in.safetensors")
    assert_error(safehub_cli("run", "acme/zoo", "unet", "--method", "nope", "--input", str(tmp_path / "in.safetensors"),
                             "--output", out), cli.EXIT_ERROR, "no public method")
    assert_error(safehub_cli("run", "acme/zoo", "unet", "--input", str(tmp_path / "in.safetensors"), "--output", out,
                             "--arg", "channels=nope"), cli.EXIT_ERROR, "raised")
    usage = safehub_cli("run", "acme/zoo", "unet", "--input", str(tmp_path / "in.safetensors"))
    assert usage.returncode == cli.EXIT_USAGE and "required: -o/--output" in usage.stderr
    assert not (tmp_path / "out.safetensors").exists()
