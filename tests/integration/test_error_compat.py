"""safehub's errors subclass what torch.hub raises (README "Errors"): one table of bad inputs, each
given to the installed torch 2.13's ``torch.hub`` and to safehub, in-process and isolated.

An ``except`` clause written for torch.hub must still catch safehub's error: for each input the
test asserts ``isinstance(safehub_error, type(torch_error))``. Inputs that would make torch.hub
reach github.com are left out (no test touches the internet); downloads go to a loopback server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safehub
from tests.local_repos import write_repo

pytestmark = pytest.mark.timeout(300)

GOOD = 'dependencies = ["torch"]\n\ndef net():\n    """A net."""\n    return 1\n'
DEPS = 'dependencies = ["torch", "surely_not_installed_pkg"]\n\ndef net():\n    return 1\n'
BROKEN = "import surely_not_installed_pkg\n\ndef net():\n    return 1\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("compat")
    (root / "empty").mkdir()
    return {
        "good": str(write_repo(root / "good", {"hubconf.py": GOOD})),
        "deps": str(write_repo(root / "deps", {"hubconf.py": DEPS})),
        "broken": str(write_repo(root / "broken", {"hubconf.py": BROKEN})),
        "empty": str(root / "empty"),
        "missing": str(root / "no" / "such" / "folder"),
    }


# (name, function, positional arguments with {folder} placeholders, keyword arguments)
CASES = [
    ("load a folder that does not exist", "load", ("{missing}", "x"), {"source": "local"}),
    ("load a folder without hubconf.py", "load", ("{empty}", "x"), {"source": "local"}),
    ("an unknown entrypoint", "load", ("{good}", "nope"), {"source": "local"}),
    ("missing dependencies", "load", ("{deps}", "net"), {"source": "local"}),
    ("an unknown source", "load", ("{good}", "net"), {"source": "gitlab"}),
    ("an entrypoint name that is no str", "load", ("{good}", 3), {"source": "local"}),
    ("a repository string with too many parts", "load", ("a/b/c", "net"), {}),
    ("a repository string without owner", "list", ("justarepo",), {}),
]
# (torch.hub's list and help take no source: a local folder is load's alone there)
ISOLATED_TOO = {"load a folder without hubconf.py", "an unknown entrypoint", "missing dependencies",
                "an entrypoint name that is no str"}


def _call(module, function, args, kwargs, folders, **extra):
    args = tuple(a.format(**folders) if isinstance(a, str) else a for a in args)
    kwargs = {**kwargs, **extra}
    if function in ("list", "help") and "trust_repo" not in kwargs:
        kwargs["trust_repo"] = True if module is torch.hub else "check"
    with pytest.raises(Exception) as info:
        getattr(module, function)(*args, **kwargs)
    if hasattr(info.value, "fp") and hasattr(info.value, "close"):
        info.value.close()  # urllib's HTTPError holds the response's socket open
    return info.value


@pytest.mark.parametrize(("name", "function", "args", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_safehub_raises_what_torch_hub_raises(name, function, args, kwargs, folders, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    expected = _call(torch.hub, function, args, kwargs, folders)
    got = _call(safehub, function, args, kwargs, folders)
    assert isinstance(got, safehub.errors.SafeHubError), (name, got)
    assert isinstance(got, type(expected)), (name, type(expected).__mro__, type(got).__mro__, got)
    if name in ISOLATED_TOO:
        isolated = _call(safehub, function, args, kwargs, folders, isolate=True)
        assert isinstance(isolated, type(expected)), (name, "isolated", type(isolated).__mro__, isolated)


def test_an_import_error_of_the_repository_stays_itself_in_process(folders):
    expected = _call(torch.hub, "load", ("{broken}", "net"), {"source": "local"}, folders)
    got = _call(safehub, "load", ("{broken}", "net"), {"source": "local"}, folders)
    assert type(got) is type(expected) is ModuleNotFoundError


def test_a_failed_download_is_an_oserror_as_urllib_makes_it(github, tmp_path):
    url = github.url + "/files/not-there.pth"  # the emulator answers 404
    expected = _call(torch.hub, "download_url_to_file", (url, str(tmp_path / "a")), {"progress": False}, {})
    got = _call(safehub, "download_url_to_file", (url, str(tmp_path / "b")), {"progress": False}, {})
    # torch.hub raises urllib's HTTPError, an OSError: safehub's DownloadError is one too.
    assert isinstance(expected, OSError) and isinstance(got, OSError) and isinstance(got, safehub.errors.DownloadError)
    expected = _call(torch.hub, "load_state_dict_from_url", (url,), {"model_dir": str(tmp_path / "m1"), "progress": False}, {})
    got = _call(safehub, "load_state_dict_from_url", (url,), {"model_dir": str(tmp_path / "m2"), "progress": False}, {})
    assert isinstance(expected, OSError) and isinstance(got, OSError)


def test_the_missing_folder_is_named(folders):
    with pytest.raises(FileNotFoundError, match="No such folder: .*no/such/folder"):
        safehub.load(folders["missing"], "x", source="local")
    assert not Path(folders["missing"]).exists()


def test_a_hash_mismatch_and_a_missing_destination_folder(github, tmp_path):
    url = github.add_file("w-deadbeef.pth", b"not the hashed bytes")
    kwargs = {"progress": False, "check_hash": True}
    expected = _call(torch.hub, "load_state_dict_from_url", (url,), {**kwargs, "model_dir": str(tmp_path / "m1")}, {})
    got = _call(safehub, "load_state_dict_from_url", (url,), {**kwargs, "model_dir": str(tmp_path / "m2")}, {})
    assert type(expected) is RuntimeError and isinstance(got, RuntimeError), (expected, got)
    nowhere = str(tmp_path / "no" / "folder" / "w.pth")
    expected = _call(torch.hub, "download_url_to_file", (url, nowhere), {"progress": False}, {})
    got = _call(safehub, "download_url_to_file", (url, nowhere), {"progress": False}, {})
    assert isinstance(got, type(expected)), (expected, got)
