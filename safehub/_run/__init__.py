"""The run step: a repository's hubconf.py in a sandboxed worker process (DESIGN 4).

Modules, each one job, with no import circle (``call`` -> ``remote`` -> ``session`` -> ``process`` -> ``launch`` -> ``warm``)::

    call.py     one isolated call: CALL, the conversation (ASKs answered or refused), the final reply
    remote.py   RemoteModule: the handle of a model that stays in its worker (returns="remote")
    session.py  that worker for the handle's life: each call an exchange of data, limits, the end
    replies.py  the worker's final RESULT or ERROR as a value or a safehub error (read as hostile)
    process.py  one worker's life: start, channel (protocol errors mapped here), tree kill, cleanup
    launch.py   how a worker starts: forked by the zygote (warm) or a fresh interpreter (cold)
    warm.py     the zygote, parent side: started once, shared by threads, restarted when it dies
    output.py   the worker's stdout and stderr relayed to the caller's, marked and capped
    scratch.py  each call's private scratch folder: made, removed, swept when stale
"""

from .call import run_isolated
from .warm import warmup

__all__ = ["run_isolated", "warmup"]
