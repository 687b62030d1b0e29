"""Import a hubconf.py and find its entrypoints. Standard library only.

Shared by the in-process path (the parent imports this file as ``safehub._worker.hubconf``) and
the worker (which loads it by path), so both answer ``list``, ``help`` and ``load`` the same way.
Errors are this module's own small classes; each side maps them to what its caller expects.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Any, Callable

MODULE_HUBCONF = "hubconf.py"
VAR_DEPENDENCY = "dependencies"


class HubconfMissing(Exception):
    """The folder has no hubconf.py."""


class HubconfUnreadable(HubconfMissing):
    pass


class MissingDependencies(Exception):
    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"Missing dependencies: {', '.join(missing)}")
        self.missing = missing


class EntrypointNotFound(Exception):
    def __init__(self, model: str) -> None:
        super().__init__(f"Cannot find callable {model} in hubconf")
        self.model = model


def import_hubconf(repo_dir: str, module_name: str = MODULE_HUBCONF) -> ModuleType:
    """Import ``repo_dir/hubconf.py`` the way torch.hub does (same module name, same sys.path)."""
    path = os.path.join(repo_dir, MODULE_HUBCONF)
    try:
        os.stat(path)
    except PermissionError:
        # Not missing: this process may not look (a private folder, or the sandbox's rules).
        raise HubconfUnreadable(
            f"The sandbox cannot read {path}: permission denied to uid {os.getuid()}. A folder on its "
            "way is private (mode 0700?); make it readable, or move the repository."
        ) from None
    except OSError:
        pass
    if not os.path.isfile(path):
        raise HubconfMissing(f"No {MODULE_HUBCONF} in {repo_dir}")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HubconfMissing(f"Cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def list_entrypoints(module: ModuleType) -> list[str]:
    # torch.hub takes names starting with '_' as internal helpers.
    return [name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")]


def missing_dependencies(module: ModuleType) -> list[str]:
    names = getattr(module, VAR_DEPENDENCY, None) or []
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def get_entrypoint(module: ModuleType, model: Any) -> Callable[..., Any]:
    if not isinstance(model, str):
        raise TypeError("Invalid input: model should be a string of function name")
    missing = missing_dependencies(module)
    if missing:
        raise MissingDependencies(missing)
    func = getattr(module, model, None) if model in dir(module) else None
    if func is None or not callable(func):
        raise EntrypointNotFound(model)
    return func


class prepended_sys_path:
    """Put a folder first on sys.path for the duration, as torch.hub does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        sys.path.insert(0, self.path)

    def __exit__(self, *exc: object) -> None:
        try:
            sys.path.remove(self.path)
        except ValueError:
            pass
