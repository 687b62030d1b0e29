"""The run step: a repository's hubconf.py in a sandboxed worker process (DESIGN 4).

Modules, each one job, with no import circle (``call`` -> ``returns`` -> ``remote`` -> ``replicas`` -> ``session``
-> ``conversation`` -> ``replies``, then ``process`` -> ``launch`` -> ``warm``)::

    call.py          one isolated call: the CALL, its conversation, the worker's end, the value
    returns.py       the ``returns`` modes, declared once: trust, the worker kept or not, the decoder
    remote.py        RemoteModule: the handle of a model that stays in its worker (returns="remote")
    session.py       that worker for the handle's life: each call an exchange of data, limits, the end
    replicas.py      replicas=N: the loaded worker as a template of N forked replicas; calls to an idle one
    conversation.py  every frame the worker sends: its questions answered or refused (one cap, one
                     at a time), its failures mapped to safehub errors (one table)
    replies.py       what a success carries, read as hostile data: entrypoints, docstring, results
    process.py       one worker's life: start, channel (protocol errors mapped here), tree kill, cleanup
    launch.py        how a worker starts: forked by the zygote (warm) or a fresh interpreter (cold)
    warm.py          the zygote, parent side: started once, shared by threads, restarted when it dies
    output.py        the worker's stdout and stderr relayed to the caller's, marked and capped
    scratch.py       each call's private scratch folder: made, removed, swept when stale

What the worker may ask for mid-call is served by ``safehub/_egress/`` (the broker), through the
handler contract of ``safehub/_asks.py``; this package imports neither the broker nor its view.
"""

from .call import run_isolated
from .warm import warmup

__all__ = ["run_isolated", "warmup"]
