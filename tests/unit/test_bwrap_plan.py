"""bubblewrap's command line as a plan, then its rendering (``safehub/_bwrap.py``).

The plan is checked here without running bwrap: every step comes after the folders that lead to
it, the repository is read-only and the scratch folder writable (or a tmpfs of its size), and a
root caller that drops its uid does it through setpriv, never through a user namespace that
would map it back to root. ``tests/security/test_layers.py`` runs the command lines for real.
"""

from __future__ import annotations

import os
import shutil

import pytest

from safehub import _bwrap

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
ALL_FEATURES = {"path": "/usr/bin/bwrap", "disable_userns": True, "perms": True, "size": True}


def make_plan(tmp_path, **kw):
    repo, scratch = tmp_path / "deep" / "repo", tmp_path / "scratch"
    repo.mkdir(parents=True)
    scratch.mkdir()
    options = dict(read_only_paths=(), network=False, uid=None, feats=ALL_FEATURES, python_prefixes=None, env=None,
                   tmpfs_size=1 << 20, scratch_size=None)
    options.update(kw)
    return _bwrap.plan(repo, scratch, **options), os.path.realpath(repo), os.path.realpath(scratch)


def test_every_step_comes_after_the_folders_leading_to_it(tmp_path):
    plan, repo, scratch = make_plan(tmp_path)
    made: set[str] = set()
    for op in plan.ops:
        parent = os.path.dirname(op.dest)
        assert parent == "/" or any(parent == m or parent.startswith(m + "/") for m in made), (op, made)
        made.add(op.dest)
    by_dest = {op.dest: op for op in plan.ops}
    assert by_dest[repo].option == "--ro-bind" and by_dest[scratch].option == "--bind"
    assert plan.chdir == scratch and not plan.network


def test_the_scratch_folder_becomes_a_tmpfs_of_its_size_where_bwrap_can(tmp_path):
    plan, _, scratch = make_plan(tmp_path, scratch_size=16 << 20)
    (op,) = [op for op in plan.ops if op.dest == scratch]
    assert (op.option, op.size, op.perms) == ("--tmpfs", 16 << 20, "0700")
    plan, _, scratch = make_plan(tmp_path / "again", scratch_size=16 << 20, feats={**ALL_FEATURES, "size": False})
    (op,) = [op for op in plan.ops if op.dest == scratch]
    assert op.option == "--bind"  # no --size: the host's folder, bound


def test_render_writes_each_step_with_only_the_options_this_bwrap_has(tmp_path):
    plan, repo, _ = make_plan(tmp_path)
    argv = _bwrap.render(plan, {**ALL_FEATURES, "perms": False, "size": False, "disable_userns": False})
    assert "--perms" not in argv and "--size" not in argv and "--disable-userns" not in argv
    i = argv.index(repo)
    assert argv[i - 1 : i + 2] == ["--ro-bind", repo, repo] and argv[-1] == "--"
    assert argv[:6] == [ALL_FEATURES["path"], "--die-with-parent", "--new-session", "--unshare-user", "--cap-drop", "ALL"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="a uid drop needs root and setpriv")
def test_root_drops_its_uid_through_setpriv_not_a_user_namespace(tmp_path):
    plan, _, _ = make_plan(tmp_path, uid=_bwrap.UNPRIVILEGED_UID)
    argv = _bwrap.render(plan, ALL_FEATURES)
    assert "--unshare-user" not in argv and "--uid" not in argv
    tail = argv[argv.index("--") + 1 :]
    assert tail[0] == plan.setpriv and f"--reuid={_bwrap.UNPRIVILEGED_UID}" in tail and tail[-1] == "--"
    assert {op.dest for op in plan.ops} >= {plan.setpriv} or any(
        plan.setpriv.startswith(op.dest.rstrip("/") + "/") for op in plan.ops)
