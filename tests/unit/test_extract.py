"""extract_zip and extract_single_file against hostile archives built here, in tmp_path."""

from __future__ import annotations

import io
import os
import stat
import struct
import time
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehub._extract import commit_in_comment, extract_single_file, extract_zip
from safehub.errors import ArchiveError

TOP = "owner-repo-abc1234"


# --- building archives ---------------------------------------------------------------------


def _info(name: str, mode: int | None = None, compress: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = compress
    if mode is not None:
        info.external_attr = mode << 16
    return info


def make_zip(path: Path, entries: list[tuple], compress: int = zipfile.ZIP_DEFLATED) -> Path:
    """Write ``entries`` — (name, data) or (name, data, unix_mode) — exactly as given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on the duplicate names we build on purpose
        with zipfile.ZipFile(path, "w") as zf:
            for entry in entries:
                name, data, mode = (*entry, None)[:3]
                zf.writestr(_info(name, mode, compress), data)
    return path


def link(name: str, target: str) -> tuple[str, str, int]:
    return (name, target, stat.S_IFLNK | 0o777)


def good_entries() -> list[tuple]:
    return [
        (f"{TOP}/", b""),
        (f"{TOP}/hubconf.py", b"dependencies = []\n"),
        (f"{TOP}/pkg/__init__.py", b""),
        (f"{TOP}/pkg/model.py", b"x = 1\n" * 1000),
        (f"{TOP}/run.sh", b"#!/bin/sh\n", stat.S_IFREG | 0o755),
    ]


def refused(tmp_path: Path, entries: list[tuple], match: str, **caps) -> Path:
    zip_path = make_zip(tmp_path / "a.zip", entries)
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    with pytest.raises(ArchiveError, match=match):
        extract_zip(zip_path, dest_dir, **caps)
    return dest_dir


def patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


# --- the good path -------------------------------------------------------------------------


def test_round_trip_returns_the_top_folder(tmp_path):
    zip_path = make_zip(tmp_path / "a.zip", good_entries())
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    old_umask = os.umask(0o022)
    try:
        top_dir = extract_zip(zip_path, dest_dir)
    finally:
        os.umask(old_umask)
    assert top_dir == dest_dir / TOP
    assert (top_dir / "pkg" / "model.py").read_bytes() == b"x = 1\n" * 1000
    assert (top_dir / "hubconf.py").read_bytes() == b"dependencies = []\n"
    assert stat.S_IMODE((top_dir / "hubconf.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((top_dir / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((top_dir / "pkg").stat().st_mode) == 0o755
    assert sorted(p.name for p in dest_dir.iterdir()) == [TOP]


def test_top_folder_without_its_own_entry(tmp_path):
    zip_path = make_zip(tmp_path / "a.zip", [(f"{TOP}/a/b.txt", b"b")])
    (tmp_path / "dest").mkdir()
    assert (extract_zip(zip_path, tmp_path / "dest") / "a" / "b.txt").read_bytes() == b"b"


def test_symlinks_inside_the_tree_are_recreated(tmp_path):
    entries = [
        *good_entries(),
        link(f"{TOP}/alias.py", "hubconf.py"),
        link(f"{TOP}/pkg/up.py", "../hubconf.py"),
        link(f"{TOP}/pkgdir", "pkg"),
        link(f"{TOP}/pkg/dangling", "missing.py"),
    ]
    zip_path = make_zip(tmp_path / "a.zip", entries)
    (tmp_path / "dest").mkdir()
    top_dir = extract_zip(zip_path, tmp_path / "dest")
    assert os.readlink(top_dir / "alias.py") == "hubconf.py"
    assert (top_dir / "pkg" / "up.py").read_bytes() == b"dependencies = []\n"
    assert (top_dir / "pkgdir").is_symlink() and (top_dir / "pkgdir" / "model.py").exists()
    assert (top_dir / "pkg" / "dangling").is_symlink()


# --- not a zip, corrupt --------------------------------------------------------------------


def test_not_a_zip(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"<html>rate limited</html>" * 10)
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="not a zip"):
        extract_zip(tmp_path / "a.zip", tmp_path / "dest")


def test_truncated_zip(tmp_path):
    zip_path = make_zip(tmp_path / "a.zip", good_entries())
    zip_path.write_bytes(zip_path.read_bytes()[:-30])
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError):
        extract_zip(zip_path, tmp_path / "dest")


def test_crc_mismatch(tmp_path):
    zip_path = make_zip(tmp_path / "a.zip", [(f"{TOP}/data.bin", b"A" * 100)], compress=zipfile.ZIP_STORED)
    patch_bytes(zip_path, b"A" * 100, b"A" * 50 + b"B" + b"A" * 49)
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match=r"CRC.*data\.bin"):
        extract_zip(zip_path, tmp_path / "dest")


def test_empty_archive(tmp_path):
    refused(tmp_path, [], match="empty")


def test_encrypted_member(tmp_path):
    zip_path = make_zip(tmp_path / "a.zip", [(f"{TOP}/secret", b"x")])
    data = bytearray(zip_path.read_bytes())
    # Set bit 0 of the general-purpose flags in the local header and the central directory.
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(sig) + offset
        data[at] |= 0x1
    zip_path.write_bytes(bytes(data))
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="encrypted"):
        extract_zip(zip_path, tmp_path / "dest")


# --- layout --------------------------------------------------------------------------------


def test_two_top_folders(tmp_path):
    refused(tmp_path, [(f"{TOP}/a", b""), ("other/b", b"")], match="one top-level folder")


def test_file_at_top_level(tmp_path):
    refused(tmp_path, [(f"{TOP}/", b""), (f"{TOP}", b"x")], match="at the top level")


def test_lone_file_at_top_level(tmp_path):
    refused(tmp_path, [("hubconf.py", b"x")], match="at the top level")


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("/etc/passwd", "absolute"),
        (f"/{TOP}/a", "absolute"),
        ("C:/Windows/x", "drive letter"),
        ("c:evil", "drive letter"),
        (f"{TOP}\\..\\evil", "backslash"),
        (f"{TOP}/a\\b", "backslash"),
        (f"{TOP}/../evil", r"'\.\.'"),
        (f"{TOP}/a/../../evil", r"'\.\.'"),
        (f"../{TOP}/a", r"'\.\.'"),
        (f"{TOP}/./a", r"'\.'"),
        (f"{TOP}//a", "empty"),
        (f"{TOP}/a\x01b", "control"),
        (f"{TOP}/a\nb", "control"),
        (f"{TOP}/a\x1b[31mb", "control"),
    ],
)
def test_hostile_names(tmp_path, name, match):
    dest_dir = refused(tmp_path, [(f"{TOP}/ok", b"ok"), (name, b"evil")], match=match)
    assert not (tmp_path / "evil").exists()
    assert list(dest_dir.iterdir()) == []  # refused before anything was written


def test_nul_in_name(tmp_path):
    # zipfile cuts names at NUL when writing, so plant the byte by hand.
    zip_path = make_zip(tmp_path / "a.zip", [(f"{TOP}/okXevil", b"x")])
    patch_bytes(zip_path, b"okXevil", b"ok\x00evil")
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="NUL"):
        extract_zip(zip_path, tmp_path / "dest")


def test_duplicate_names(tmp_path):
    refused(tmp_path, [(f"{TOP}/a.py", b"checked"), (f"{TOP}/a.py", b"evil")], match="more than once")


def test_file_and_folder_of_the_same_name(tmp_path):
    refused(tmp_path, [(f"{TOP}/a", b"x"), (f"{TOP}/a/", b"")], match="more than once")


def test_file_used_as_a_folder(tmp_path):
    refused(tmp_path, [(f"{TOP}/a", b"x"), (f"{TOP}/a/b", b"y")], match=r"a/b")


# --- caps ----------------------------------------------------------------------------------


def test_member_count_over_the_cap(tmp_path):
    entries = [(f"{TOP}/f{i}", b"") for i in range(5)]
    refused(tmp_path, entries, match="over the limit of 3", max_members=3)


def test_member_count_understated_in_the_end_record(tmp_path):
    zip_path = make_zip(tmp_path / "a.zip", [(f"{TOP}/f{i}", b"") for i in range(5)])
    data = bytearray(zip_path.read_bytes())
    at = data.rindex(b"PK\x05\x06")
    data[at + 8 : at + 12] = struct.pack("<HH", 1, 1)  # entries on this disk, entries in total
    zip_path.write_bytes(bytes(data))
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="5 members"):
        extract_zip(zip_path, tmp_path / "dest", max_members=3)


def test_zip_bomb_is_refused_quickly(tmp_path):
    entries = [(f"{TOP}/", b""), (f"{TOP}/zeros", b"\0" * (50 * 1024 * 1024))]
    zip_path = make_zip(tmp_path / "bomb.zip", entries)
    assert zip_path.stat().st_size < 1024 * 1024
    (tmp_path / "dest").mkdir()
    start = time.monotonic()
    with pytest.raises(ArchiveError, match="limit"):
        extract_zip(zip_path, tmp_path / "dest", max_bytes=10 * 1024 * 1024)
    assert time.monotonic() - start < 2


def test_zip_bomb_with_lying_headers(tmp_path):
    """Sizes understated in the central directory: never more than the lie is written."""
    size = 20 * 1024 * 1024
    zip_path = make_zip(tmp_path / "bomb.zip", [(f"{TOP}/zeros", b"\0" * size)])
    data = bytearray(zip_path.read_bytes())
    at = data.index(b"PK\x01\x02")
    data[at + 24 : at + 28] = struct.pack("<I", 1000)  # uncompressed size
    zip_path.write_bytes(bytes(data))
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="zeros"):
        extract_zip(zip_path, tmp_path / "dest", max_bytes=10 * 1024 * 1024)
    written = tmp_path / "dest" / TOP / "zeros"
    assert not written.exists() or written.stat().st_size <= 1000


def test_total_size_counts_every_member(tmp_path):
    entries = [(f"{TOP}/f{i}", b"x" * 400) for i in range(3)]
    refused(tmp_path, entries, match="limit", max_bytes=1000)


# --- file types and links ------------------------------------------------------------------


@pytest.mark.parametrize("file_type", [stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK])
def test_special_files(tmp_path, file_type):
    refused(tmp_path, [(f"{TOP}/dev", b"", file_type | 0o644)], match="special file")


@pytest.mark.parametrize(
    "target",
    ["/etc/passwd", "../../etc/passwd", "..", "../other", "pkg/../../x", "C:/x", "a\\..\\..\\x", ""],
)
def test_symlink_out_of_the_tree(tmp_path, target):
    dest_dir = refused(tmp_path, [(f"{TOP}/pkg/", b""), link(f"{TOP}/evil", target)], match="evil")
    assert not (dest_dir / TOP / "evil").exists() and not (dest_dir / TOP / "evil").is_symlink()


def test_symlink_target_too_long(tmp_path):
    refused(tmp_path, [link(f"{TOP}/l", "a/" * 3000)], match="over 4096 bytes")


def test_symlink_with_a_bad_crc(tmp_path):
    zip_path = make_zip(tmp_path / "a.zip", [link(f"{TOP}/l", "targetAAA")], compress=zipfile.ZIP_STORED)
    patch_bytes(zip_path, b"targetAAA", b"targetAAB")
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="CRC"):
        extract_zip(zip_path, tmp_path / "dest")


def test_symlink_chain_that_climbs_out(tmp_path):
    # Each target is inside the tree read lexically; resolved on disk, "b" lands in dest_dir.
    entries = [(f"{TOP}/sub/", b""), link(f"{TOP}/sub/up", ".."), link(f"{TOP}/b", "sub/up/../x")]
    refused(tmp_path, entries, match="outside")


def test_member_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = [(f"{TOP}/sub/", b""), link(f"{TOP}/sub/l", "."), link(f"{TOP}/l", "sub"), (f"{TOP}/l/evil.py", b"x")]
    refused(tmp_path, entries, match="through the symlink")


def test_symlink_named_like_a_folder(tmp_path):
    refused(tmp_path, [link(f"{TOP}/d/", "x")], match="symlink")


def test_never_follows_a_link_planted_in_dest(tmp_path):
    """A link already standing where the tree goes (a race, or a careless caller) is not followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    zip_path = make_zip(tmp_path / "a.zip", good_entries())
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    (dest_dir / TOP).symlink_to(outside)
    with pytest.raises(ArchiveError, match=TOP):
        extract_zip(zip_path, dest_dir)
    assert list(outside.iterdir()) == []


# --- property: whatever the names, nothing lands outside dest_dir -----------------------------

_PART = st.sampled_from(["a", "b", "..", ".", "", "\\", "c:", "/", "x\x00", "sub", TOP])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.lists(_PART, min_size=1, max_size=4).map("/".join), min_size=1, max_size=4))
def test_nothing_lands_outside(tmp_path, names):
    case_dir = Path(os.path.join(tmp_path, os.urandom(6).hex()))
    dest_dir = case_dir / "dest"
    dest_dir.mkdir(parents=True)
    zip_path = make_zip(case_dir / "a.zip", [(n or "x", b"x") for n in names])
    try:
        top_dir = extract_zip(zip_path, dest_dir)
    except ArchiveError:
        pass
    else:
        assert top_dir.parent == dest_dir
    assert sorted(p.name for p in case_dir.iterdir()) == ["a.zip", "dest"]


# --- legacy checkpoint zip: one plain file ----------------------------------------------------


def test_single_file_round_trip(tmp_path):
    zip_path = make_zip(tmp_path / "ckpt.zip", [("weights.pth", b"w" * 1000)])
    out = extract_single_file(zip_path, tmp_path)
    assert out == tmp_path / "weights.pth" and out.read_bytes() == b"w" * 1000
    # A second extraction replaces the file in place.
    assert extract_single_file(zip_path, tmp_path).read_bytes() == b"w" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.zip", "weights.pth"]


@pytest.mark.parametrize(
    "entries",
    [
        [("../weights.pth", b"x")],
        [("sub/weights.pth", b"x")],
        [("/tmp/weights.pth", b"x")],
        [("sub/", b"")],
        [link("weights.pth", "/etc/passwd")],
        [("a.pth", b"x"), ("b.pth", b"x")],
    ],
)
def test_single_file_refusals(tmp_path, entries):
    zip_path = make_zip(tmp_path / "ckpt.zip", entries)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ArchiveError):
        extract_single_file(zip_path, out_dir)
    assert list(out_dir.iterdir()) == []


def test_single_file_over_the_cap_leaves_nothing(tmp_path):
    zip_path = make_zip(tmp_path / "ckpt.zip", [("w.pth", b"\0" * 5000)])
    with pytest.raises(ArchiveError, match="limit"):
        extract_single_file(zip_path, tmp_path, max_bytes=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.zip"]


def test_single_file_not_a_zip(tmp_path):
    (tmp_path / "ckpt.zip").write_bytes(io.BytesIO(b"nope").getvalue())
    with pytest.raises(ArchiveError):
        extract_single_file(tmp_path / "ckpt.zip", tmp_path)


def test_stream_cap_stops_past_the_limit(tmp_path, monkeypatch):
    """Even when the declared sizes pass, decompression stops once the bytes written pass the cap."""
    from safehub import _extract

    checked = _extract._validate_members
    monkeypatch.setattr(_extract, "_validate_members", lambda infos, _max, count: checked(infos, 2**62, count))
    entries = [(f"{TOP}/zeros", b"\0" * (50 * 1024 * 1024))]
    zip_path = make_zip(tmp_path / "bomb.zip", entries)
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="size limit while writing member 'owner-repo-abc1234/zeros'"):
        extract_zip(zip_path, tmp_path / "dest", max_bytes=10 * 1024 * 1024)
    assert (tmp_path / "dest" / TOP / "zeros").stat().st_size <= 10 * 1024 * 1024


# --- the commit in the zip comment (git archive writes it; skip_validation reads it) ------------


@pytest.mark.parametrize(
    ("comment", "expected"),
    [
        (b"0123456789abcdef0123456789abcdef01234567", "0123456789abcdef0123456789abcdef01234567"),
        (b"", None),
        (b"0123456789ABCDEF0123456789ABCDEF01234567", None),  # git writes lowercase only
        (b"0123456789abcdef", None),  # a short SHA names no commit for sure
        (b"0123456789abcdef0123456789abcdef01234567\n", None),
        (b"made by a mirror", None),
    ],
)
def test_commit_in_comment(tmp_path, comment, expected):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("top/hubconf.py", "x = 1\n")
        zf.comment = comment
    assert commit_in_comment(path) == expected


def test_commit_in_comment_of_a_corrupt_archive(tmp_path):
    path = tmp_path / "a.zip"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(ArchiveError):
        commit_in_comment(path)
