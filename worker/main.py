"""The isolated worker's entry script. Standalone: standard library, torch and cloudpickle only.

The parent (``safehub/_run/``) starts it as a fresh interpreter, in one of three modes::

    python -I -B main.py --channel-fd FD --parent-pid PID --settings JSON   a cold worker, one call
    python -I -B main.py --zygote --control-fd FD --parent-pid PID          the warm path's zygote
    python -I -B main.py --probe                                            print the layer probe

This script is the one loader: it loads its own folder as the package ``_safehub_worker`` (by
path, under a private name), so the worker's modules import each other relatively, while
neither this folder nor the caller's paths are ever on ``sys.path`` and nothing of ``safehub``
(nor, through an editable install, the caller's checkout) is imported.

argv (cold)
    --channel-fd   an inherited AF_UNIX stream socket: the only channel to the parent
    --parent-pid   the parent's pid; a worker whose parent is already gone exits at once
                   (0: bubblewrap stands between, and its --die-with-parent takes the tree down)
    --settings     ``protocol.WorkerSettings`` as JSON: the sandbox's limits and layers, the
                   repository and scratch folders, the layers the parent applied

Environment
    Only the parent's allow-list. HOME, TMPDIR and the working directory are a private scratch
    folder (mode 0700) that the parent made and deletes after the call.

Channel: the conversation of ``protocol.py`` (CALL, ASK/ANSWER/REFUSE, then RESULT or ERROR),
held by ``work.py``. Processes: ``supervisor.py`` (P1) forks ``work.py``'s process (P2).
The zygote: ``zygote.py``. The probe: ``sandbox/probe.py``, printed as JSON.

Exit status (``protocol.EXIT_*``; P1 exits with P2's code, or dies of P2's signal)
    0    an answer (RESULT or ERROR) was sent
    64   bad command line
    70   the worker failed outside the repository's code (the channel broke, an internal error)
    71   the supervisor failed (prctl, fork), or the parent was already gone
    else the repository's code ended the process (os._exit(3) gives 3, a segfault SIGSEGV)
"""

import importlib
import importlib.util
import os
import sys
import types

PACKAGE = "_safehub_worker"


def load_package() -> types.ModuleType:
    """This folder as the package ``_safehub_worker``, loaded once by path."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(here, "__init__.py"), submodule_search_locations=[here])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the worker package from {here}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package  # relative imports and pickling look it up by name
    spec.loader.exec_module(package)
    return package


def main(argv: list[str]) -> None:
    load_package()
    if argv[:1] == ["--zygote"]:
        importlib.import_module(PACKAGE + ".zygote").main(argv[1:])
    if argv == ["--probe"]:
        import json

        print(json.dumps(importlib.import_module(PACKAGE + ".sandbox.probe").probe()))
        sys.exit(0)
    importlib.import_module(PACKAGE + ".supervisor").main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
