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


# Import names whose pip distribution is called otherwise (the common ones of hub repositories).
PIP_NAMES = {"PIL": "pillow", "cv2": "opencv-python", "sklearn": "scikit-learn", "yaml": "pyyaml",
             "skimage": "scikit-image", "google.protobuf": "protobuf", "attr": "attrs", "Crypto": "pycryptodome",
             "bs4": "beautifulsoup4", "dateutil": "python-dateutil", "fitz": "pymupdf", "git": "gitpython"}


def missing_dependencies_message(missing: list[str]) -> str:
    """torch.hub's words, then the command that fixes it."""
    wheels = " ".join(PIP_NAMES.get(name, name.split(".")[0]) for name in missing)
    return f"Missing dependencies: {', '.join(missing)}. Install them with: pip install {wheels}"


def entrypoint_not_found_message(model: str, suggestions: list[str]) -> str:
    """torch.hub's words, then the closest names the repository has."""
    message = f"Cannot find callable {model} in hubconf"
    if suggestions:
        message += f"; did you mean {' or '.join(repr(s) for s in suggestions)}?"
    return message


class MissingDependencies(Exception):
    def __init__(self, missing: list[str]) -> None:
        super().__init__(missing_dependencies_message(missing))
        self.missing = missing


class EntrypointNotFound(Exception):
    def __init__(self, model: str, suggestions: list[str] | None = None) -> None:
        self.suggestions = list(suggestions or [])
        super().__init__(entrypoint_not_found_message(model, self.suggestions))
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
        import difflib

        raise EntrypointNotFound(model, difflib.get_close_matches(model, list_entrypoints(module), n=3, cutoff=0.6))
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
