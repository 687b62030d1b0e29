"""The worker's code stands alone: it imports nothing of safehub, and ships inside the package."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER_DIR = ROOT / "safehub" / "_worker"


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_worker_modules_import_nothing_of_safehub():
    # The worker loads its siblings by path; a package import would pull in the parent side
    # (and, through an editable install, code outside the sandbox's read paths).
    for path in sorted(WORKER_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        bad = {name for name in imported_names(path) if name.startswith((".", "safehub"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_protocol_is_standard_library_only():
    # The worker loads safehub/_protocol.py by path as well.
    bad = {n for n in imported_names(ROOT / "safehub" / "_protocol.py") if n.startswith((".", "safehub"))}
    assert not bad


def test_no_top_level_worker_package_is_installed():
    with open(ROOT / "pyproject.toml", "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]
    assert "safehub._worker" in packages
    assert all(p == "safehub" or p.startswith("safehub.") for p in packages)
