"""The fetch step has one door (``_fetch.entry_for``) and offline is decided in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import safehub

PARENT_DIR = Path(safehub.__file__).resolve().parent


def _modules() -> dict[str, str]:
    return {str(p.relative_to(PARENT_DIR)): p.read_text() for p in sorted(PARENT_DIR.rglob("*.py"))}


def test_the_api_enters_the_fetch_step_by_one_door():
    tree = ast.parse((PARENT_DIR / "_api.py").read_text())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "_fetch"}
    assert used == {"entry_for"}
    # The lock file's repository pin is read by the fetch step alone.
    readers = sorted(name for name, text in _modules().items() if "pin_for(" in text and name != "_pins.py")
    assert readers == ["_fetch.py"]


def test_offline_is_refused_in_one_place():
    raisers = sorted(name for name, text in _modules().items() if "raise OfflineError" in text)
    assert raisers == ["_http.py"]  # _http.require_online, asked by every fetch
    readers = sorted(name for name, text in _modules().items() if "constants.SAFEHUB_OFFLINE" in text)
    # the check; whether a changed pinned tree may be fetched again; the Hugging Face path, which
    # also honours HF_HUB_OFFLINE; doctor's report of the setting
    assert readers == ["_egress/hf.py", "_fetch.py", "_http.py", "cli/doctor.py"]
