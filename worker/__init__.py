"""The code that runs inside the sandbox, and nothing else (DESIGN 4).

This folder is the top-level ``worker/`` of the repository and ships inside the wheel as the
package ``safehub._worker`` (``package-dir`` in pyproject.toml); a top-level package named
``worker`` is never installed. Inside a worker it is loaded by ``main.py`` under the private name
``_safehub_worker``, from its own folder, without that folder or the caller's paths ever being on
``sys.path``: its modules import each other relatively and import nothing of ``safehub``.

The parent imports from here only the shared wire format and the entry script's path (the
pattern of pyproject-hooks ``_in_process/__init__.py``), pinned by
``tests/unit/test_worker_boundary.py``:

- :data:`ENTRY_SCRIPT`: the path of ``main.py``, which the parent runs as ``python -I -B``;
- ``protocol``: frames, message kinds and their fields, the worker's settings, exit codes;
- ``layout``: the result layout's dtype names and metadata;
- ``grants``: the folders the sandbox lets a worker read (bubblewrap's binds, Landlock's rules);
- ``values``: the data-only arguments and results of remote calls;
- ``hubconf``: the hubconf handling in-process loads share, so both answer alike.

Layout::

    main.py        entry script: argv, the one package loader, supervisor or zygote
    supervisor.py  P1 of a call: forks the work process, kills the tree, mirrors its end
    work.py        P2: applies the sandbox, holds the conversation with the parent, answers
    zygote.py      the warm path: torch imported once, a supervisor forked per call
    hubconf.py     import hubconf.py, check dependencies, find entrypoints (parent uses it in-process too)
    weights.py     encode tensors as data (the safetensors-like layout) into sealed memfds
    objects.py     encode an object: cloudpickle of its structure, storages and TorchScript archives beside it
    shims.py       torch.hub, urllib and requests fetches, asked of the parent
    repo_view.py   the repository's private writable view in scratch
    remote.py      a remote model: serves calls on the model it keeps
    failures.py    a failure as a frame's fields
    protocol.py    the wire format, versioned (shared with the parent)
    values.py      the data-only values of remote calls (shared with the parent)
    layout.py      dtype names and result metadata (shared with the parent)
    grants.py      read paths of the sandbox (shared with the parent)
    sandbox/       the layers: confine (the one hook), namespaces, landlock, seccomp, limits, probe
"""

import os

WORKER_DIR = os.path.dirname(os.path.abspath(__file__))
ENTRY_SCRIPT = os.path.join(WORKER_DIR, "main.py")


def with_article(noun: str) -> str:
    """``noun`` after "a" or "an", as English reads it: "an Encoder", "a Linear", "an int".

    One rule for every message that names a type (worker and parent alike)."""
    return f"{'an' if noun[:1].lower() in 'aeiou' and noun[:1] else 'a'} {noun}"
