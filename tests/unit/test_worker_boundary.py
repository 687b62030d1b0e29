"""The trust boundary in the source tree: worker/ runs in the sandbox, safehub/ in the parent.

Both directions are pinned: the worker imports nothing of safehub (its modules import each
other relatively and stay inside worker/), and the parent imports from the worker only the
allow-list. The wheel ships the worker as ``safehub._worker`` and no top-level ``worker``, and
the parent package has no import circle, not even one hidden inside a function.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER_DIR = ROOT / "worker"
PARENT_DIR = ROOT / "safehub"
# What the parent may take from the worker: the entry script's path (ENTRY_SCRIPT, WORKER_DIR
# from the package itself), the wire format, the result layout's names, the read grants, the
# hubconf handling that in-process loads share with the worker (so both answer alike), and the
# value codec of remote models (both sides pack and unpack the same data trees).
PARENT_MAY_IMPORT = {"safehub._worker", "safehub._worker.protocol", "safehub._worker.layout",
                     "safehub._worker.grants", "safehub._worker.hubconf", "safehub._worker.values"}


def module_name(path: Path, top: Path, package: str) -> str:
    parts = list(path.relative_to(top).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imports(path: Path, top: Path, package: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (function bodies included), resolved to full names."""
    here = module_name(path, top, package).split(".")
    if path.name != "__init__.py":
        here.pop()  # a module's relative imports start at its package
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                assert node.level <= len(here), f"{path}: a relative import leaves the package"
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` names a submodule or an attribute of the package
                candidate = f"{base}.{alias.name}"
                relative = candidate.split(".")[1:]
                if (top.joinpath(*relative).with_suffix(".py")).exists() or (top.joinpath(*relative) / "__init__.py").exists():
                    found.add(candidate)
                else:
                    found.add(base)
    return found


def test_worker_modules_import_nothing_of_safehub():
    for path in sorted(WORKER_DIR.rglob("*.py")):
        bad = {name for name in imports(path, WORKER_DIR, "safehub._worker") if name.startswith("safehub") and not name.startswith("safehub._worker")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_parent_imports_only_the_allow_list_from_the_worker():
    for path in sorted(PARENT_DIR.rglob("*.py")):
        taken = {name for name in imports(path, PARENT_DIR, "safehub") if name.startswith("safehub._worker")}
        assert taken <= PARENT_MAY_IMPORT, f"{path.relative_to(ROOT)} imports {sorted(taken - PARENT_MAY_IMPORT)}"


def test_the_shared_modules_are_standard_library_only():
    stdlib = sys.stdlib_module_names
    for name in ("protocol", "layout", "grants", "__init__"):
        path = WORKER_DIR / f"{name}.py"
        outside = {n for n in imports(path, WORKER_DIR, "safehub._worker") if n.split(".")[0] not in stdlib and not n.startswith("safehub._worker")}
        assert not outside, f"{name}.py imports {sorted(outside)}"


def test_no_import_circle_in_the_parent_package():
    graph = {}
    for path in PARENT_DIR.rglob("*.py"):
        name = module_name(path, PARENT_DIR, "safehub")
        graph[name] = {n for n in imports(path, PARENT_DIR, "safehub") if n.startswith("safehub.") and n != name}
    seen, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in seen or node not in graph:
            return
        stack.append(node)
        for target in sorted(graph[node]):
            visit(target)
        stack.pop()
        seen.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_wheel_ships_the_worker_inside_safehub_and_no_top_level_worker(tmp_path):
    with open(ROOT / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert all(p == "safehub" or p.startswith("safehub.") for p in setuptools["packages"])
    assert setuptools["package-dir"] == {"safehub._worker": "worker"}
    # Built from a copy (CI's user run has no git checkout), so the build leaves nothing in the tree.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "build", "*.egg-info", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("safehub-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"safehub"}
    worker_files = {n.removeprefix("safehub/_worker/") for n in names if n.startswith("safehub/_worker/")}
    assert worker_files == {str(p.relative_to(WORKER_DIR)) for p in WORKER_DIR.rglob("*.py")}
    parent_files = {n.removeprefix("safehub/") for n in names if n.startswith("safehub/") and not n.startswith("safehub/_worker/")}
    assert parent_files >= {str(p.relative_to(PARENT_DIR)) for p in PARENT_DIR.rglob("*.py")}


def test_the_worker_is_granted_its_own_folder_only():
    from safehub import _bwrap
    from safehub._run import launch
    from safehub._worker import ENTRY_SCRIPT, grants

    assert Path(grants.WORKER_DIR) == Path(ENTRY_SCRIPT).parent == WORKER_DIR
    read = grants.worker_read_paths("/some/repo")
    assert str(WORKER_DIR) in read
    for too_wide in (ROOT, ROOT / ".git", PARENT_DIR):
        assert str(too_wide) not in read
    argv, _ = launch.worker_argv(__import__("safehub").Sandbox().worker_settings("/some/repo", "/tmp"), 3)
    if _bwrap.bwrap_works():
        binds = {argv[i + 1] for i, arg in enumerate(argv) if arg == "--ro-bind"}
        assert str(WORKER_DIR) in binds
        assert not binds & {str(ROOT), str(ROOT / ".git"), str(PARENT_DIR)}
