"""safehub: torch.hub, with the option to run the repository's code in a locked-down worker.

``import safehub as hub`` runs code written for ``torch.hub`` unchanged; ``isolate=True`` on
``list``, ``help`` and ``load`` runs ``hubconf.py`` in a sandboxed process instead of this one,
forked from a warm zygote that ``warmup()`` starts ahead of the first call; ``load(...,
returns="remote")`` keeps the model there and gives a ``RemoteModule`` whose calls run there.
"""

from ._api import help, list, load
from ._cache import get_dir, set_dir
from ._download import download_url_to_file, load_state_dict_from_url
from ._sandbox import Sandbox, sandbox_report
from ._run.remote import RemoteModule
from ._run.warm import warmup
from .errors import SafeHubError

__all__ = [
    "RemoteModule",
    "SafeHubError",
    "Sandbox",
    "download_url_to_file",
    "get_dir",
    "help",
    "list",
    "load",
    "load_state_dict_from_url",
    "sandbox_report",
    "set_dir",
    "warmup",
]

__version__ = "0.1.0"
