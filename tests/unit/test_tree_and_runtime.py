"""The tree digest (from the disk and from the archive) and the per-user runtime folder."""

from __future__ import annotations

import os
import stat
import zipfile

import pytest

from safehub import _cache, _extract, _tree
from safehub.errors import SafeHubError


def make_zip(path, members) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, (mode, data) in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "a.zip"
    make_zip(path, {
        "top/": (stat.S_IFDIR | 0o755, b""),
        "top/hubconf.py": (stat.S_IFREG | 0o644, b"x = 1\n"),
        "top/run.sh": (stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
        "top/empty/": (stat.S_IFDIR | 0o755, b""),
        "top/pkg/mod.py": (stat.S_IFREG | 0o644, b"y = 2\n"),  # its folder has no entry of its own
        "top/link.py": (stat.S_IFLNK | 0o777, b"pkg/mod.py"),
    })
    return path


def test_the_digest_from_the_archive_is_the_digest_of_its_extraction(archive, tmp_path):
    (tmp_path / "x").mkdir()
    tree = _extract.extract_zip(archive, tmp_path / "x")
    on_disk, in_zip = _tree.of_dir(tree), _tree.of_zip(archive)
    assert on_disk.entries == in_zip.entries
    assert on_disk.digest == in_zip.digest
    assert in_zip.entries["empty"] == "D" and in_zip.entries["pkg"] == "D"
    assert in_zip.entries["link.py"] == "L pkg/mod.py" and in_zip.entries["run.sh"].startswith("F x ")


def test_every_kind_of_change_changes_the_digest(archive, tmp_path):
    (tmp_path / "x").mkdir()
    tree = _extract.extract_zip(archive, tmp_path / "x")
    reference = _tree.of_dir(tree)
    changes = [
        lambda: (tree / "hubconf.py").write_text("x = 2\n"),
        lambda: os.chmod(tree / "hubconf.py", 0o755),
        lambda: (tree / "new.py").write_text(""),
        lambda: (tree / "empty" / "pkg").mkdir(),
        lambda: (os.remove(tree / "link.py"), os.symlink("run.sh", tree / "link.py")),
    ]
    seen = {reference.digest}
    for change in changes:
        change()
        now = _tree.of_dir(tree)
        assert now.digest not in seen
        seen.add(now.digest)
    assert set(reference.changes(now)) == {"~ hubconf.py", "~ link.py", "+ empty/pkg", "+ new.py"}


def test_the_memo_is_used_only_for_unchanged_stamps(archive, tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    tree = _extract.extract_zip(archive, tmp_path / "x")
    memo = tmp_path / "memo.json"
    first = _tree.of_dir(tree, memo)
    hashed = []
    real = _tree._file_sha256
    monkeypatch.setattr(_tree, "_file_sha256", lambda p: hashed.append(os.path.basename(p)) or real(p))
    assert _tree.of_dir(tree, memo) == first and hashed == []
    (tree / "hubconf.py").write_text("x = 3\n")
    assert _tree.of_dir(tree, memo) != first and hashed == ["hubconf.py"]
    # A memo that lies about a file whose stamp changed is not believed.
    memo.write_text(memo.read_text().replace(real(str(tree / "hubconf.py")), "0" * 64))
    os.utime(tree / "hubconf.py", ns=(1, 1))
    assert _tree.of_dir(tree, memo).entries["hubconf.py"].endswith(real(str(tree / "hubconf.py")))


def test_the_runtime_folder_is_private(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFEHUB_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = _cache.runtime_dir()
    assert path == tmp_path / "safehub"
    st = os.lstat(path)
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == (0o711 if os.geteuid() == 0 else 0o700)
    os.chmod(path, 0o755)  # others could read the views' names
    with pytest.raises(SafeHubError, match="SAFEHUB_RUNTIME_DIR"):
        _cache.runtime_dir()
    os.chmod(path, 0o700)
    monkeypatch.setenv("SAFEHUB_RUNTIME_DIR", str(tmp_path / "link"))
    os.symlink(path, tmp_path / "link")  # a link someone planted
    with pytest.raises(SafeHubError, match="not a private folder"):
        _cache.runtime_dir()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("SAFEHUB_RUNTIME_DIR")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert _cache.runtime_dir() == tmp_path / f"safehub-{os.geteuid()}"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another uid")
def test_a_runtime_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    monkeypatch.setenv("SAFEHUB_RUNTIME_DIR", str(other))
    with pytest.raises(SafeHubError, match="owned by uid 0"):
        _cache.runtime_dir()


def test_a_read_only_hub_dir_is_not_writable(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    assert _cache.hub_is_writable(hub)
    assert _cache.hub_is_writable(tmp_path / "not" / "yet")  # made where it would be made
    if os.geteuid() != 0:
        os.chmod(hub, 0o555)
        try:
            assert not _cache.hub_is_writable(hub)
        finally:
            os.chmod(hub, 0o755)
