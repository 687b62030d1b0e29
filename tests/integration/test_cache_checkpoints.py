"""The cache commands cover what the cache holds: checkpoints beside repositories."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import safehub
from safehub import _api, _cache, _fill, _pins, cli

HUBCONF = "dependencies = []\n\n\ndef which():\n    return 1\n"


@pytest.fixture
def lock(make_repo, github, tmp_path):
    make_repo("acme", "models", {"hubconf.py": HUBCONF})
    data = b"weights " * 1000
    url = github.add_file("net-0123abcd.pth", data)
    key, pin = _api.pin("acme/models:main")
    files = {url: _pins.FilePin(hashlib.sha256(data).hexdigest(), len(data), "net-0123abcd.pth", "hub/checkpoints")}
    path = tmp_path / "safehub.lock"
    path.write_text(_pins.dumps({key: pin}, files))
    return path


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))  # download locks stay


def cache_json(capsys, *args: str) -> tuple[int, dict]:
    code = cli.main(["cache", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_list_verify_and_clean_cover_checkpoints(lock, capsys):
    report = _fill.fill(lock, progress=False)
    assert [f["fetched"] for f in report.files] == [True]
    checkpoints = Path(safehub.get_dir()) / "checkpoints"
    (checkpoints / "torch-hubs-own.pth").write_bytes(b"x" * 10)  # torch.hub fetched it: no record

    code, data = cache_json(capsys, "list")
    assert code == 0
    rows = {c["name"]: c for c in data["checkpoints"]}
    assert rows["net-0123abcd.pth"]["size_bytes"] == 8000 and rows["net-0123abcd.pth"]["url"].endswith("/files/net-0123abcd.pth")
    assert rows["torch-hubs-own.pth"]["size_bytes"] == 10 and rows["torch-hubs-own.pth"]["sha256"] == ""
    assert [e["folder"] for e in data["entries"]] == ["acme_models_main"]

    code, data = cache_json(capsys, "verify", "--locked", str(lock))
    assert code == 0 and data["ok"]
    assert {c["name"]: c["known"] for c in data["checkpoints"]} == {"net-0123abcd.pth": True, "torch-hubs-own.pth": False}

    (checkpoints / "net-0123abcd.pth").write_bytes(b"tampered" * 1000)
    assert cli.main(["cache", "verify"]) == cli.EXIT_INTEGRITY
    out = capsys.readouterr()
    assert "CHANGED  hub/checkpoints/net-0123abcd.pth: changed since it was fetched" in out.out
    assert cli.main(["cache", "verify", "--locked", str(lock)]) == cli.EXIT_INTEGRITY
    assert "not the file the lock file pins" in capsys.readouterr().out
    # fill checks what is there: a changed file is refused, not served.
    with pytest.raises(safehub.errors.HashMismatchError):
        _fill.fill(lock, progress=False)

    code, data = cache_json(capsys, "clean", "--checkpoints", "--dry-run")
    assert code == 0 and data["dry_run"] and data["entries"] == []
    assert sorted(c["name"] for c in data["checkpoints"]) == ["net-0123abcd.pth", "torch-hubs-own.pth"]
    assert (checkpoints / "net-0123abcd.pth").exists()
    code, data = cache_json(capsys, "clean", "--checkpoints")
    assert code == 0 and files_in(checkpoints) == []
    assert [e.folder for e in _cache.iter_records()] == ["acme_models_main"]  # repositories stay

    # Filled again, then --all removes repositories and checkpoints.
    _fill.fill(lock, progress=False)
    code, data = cache_json(capsys, "clean", "--all")
    assert [e["folder"] for e in data["entries"]] == ["acme_models_main"] and len(data["checkpoints"]) == 1
    assert list(_cache.iter_records()) == [] and files_in(checkpoints) == []
