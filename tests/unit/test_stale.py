"""safehub._stale: folders named after a really dead process are removed, nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from safehub import _stale

PREFIX = "safehub-test-"


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that ran, exited and was reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not _stale.pid_alive(proc.pid), "the pid was taken again at once; rerun"
    return proc.pid


def locked_up_tree(path) -> None:
    """What a worker can leave: files under folders it took every permission away from."""
    deep = path / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "f.txt").write_text("x")
    (path / "top.txt").write_text("x")
    os.chmod(deep, 0)
    os.chmod(path / "a", 0)


def test_removes_the_folders_of_dead_processes_even_locked_up(tmp_path, dead_pid):
    stale = tmp_path / f"{PREFIX}{dead_pid}-abc"
    locked_up_tree(stale)
    removed = _stale.sweep(tmp_path, PREFIX, owners={os.geteuid()})
    assert removed == [stale]
    assert not os.path.lexists(stale)


def test_leaves_live_foreign_unrelated_and_linked_folders(tmp_path, dead_pid):
    alive = tmp_path / f"{PREFIX}{os.getpid()}-mine"
    other_prefix = tmp_path / f"other-{dead_pid}-x"
    no_pid = tmp_path / f"{PREFIX}abc"
    a_file = tmp_path / f"{PREFIX}{dead_pid}-file"
    for folder in (alive, other_prefix, no_pid):
        folder.mkdir()
    a_file.write_text("not a folder")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    link = tmp_path / f"{PREFIX}{dead_pid}-link"
    link.symlink_to(outside, target_is_directory=True)

    assert _stale.sweep(tmp_path, PREFIX, owners={os.geteuid()}) == []
    for path in (alive, other_prefix, no_pid, a_file, link):
        assert os.path.lexists(path), path
    assert (outside / "keep.txt").read_text() == "precious"


def test_another_owners_folder_is_left_alone(tmp_path, dead_pid):
    stale = tmp_path / f"{PREFIX}{dead_pid}-theirs"
    stale.mkdir()
    # Owned by us, but we say only another uid's folders are ours to sweep.
    assert _stale.sweep(tmp_path, PREFIX, owners={os.geteuid() + 1}) == []
    assert stale.is_dir()


def test_empty_prefix_reads_the_pid_at_the_start(tmp_path, dead_pid):
    stale = tmp_path / f"{dead_pid}.acme_models_main.x1"
    stale.mkdir()
    (tmp_path / f"{os.getpid()}.acme_models_main.x2").mkdir()
    assert _stale.sweep(tmp_path, "", owners={os.geteuid()}) == [stale]


def test_missing_top_is_a_no_op(tmp_path):
    assert _stale.sweep(tmp_path / "nope", PREFIX, owners={os.geteuid()}) == []


def test_remove_tree_never_walks_through_a_link(tmp_path):
    target = tmp_path / "target"
    locked_up_tree(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    _stale.remove_tree(link)
    assert os.stat(target / "a").st_mode & 0o777 == 0, "the link's target was opened up"
    os.chmod(target / "a", 0o700)
    os.chmod(target / "a" / "b", 0o700)
    assert (target / "a" / "b" / "f.txt").read_text() == "x"


def test_pid_alive():
    assert _stale.pid_alive(os.getpid())
    assert _stale.pid_alive(1)  # init: alive, and not ours to signal unless root
    assert _stale.pid_alive(0) and _stale.pid_alive(-5)  # process groups, never a folder's maker
    assert _stale.pid_alive(10**30)  # no such pid can exist: never swept
