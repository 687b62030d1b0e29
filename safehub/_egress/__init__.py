"""What may leave the machine on a worker's behalf, and how it is fetched (DESIGN 4b).

The worker has no network; what it fetches, the parent fetches for it, under one policy, one
set of limits and the call's deadline, into the cache, and shows it in a read-only view.
Modules, each one job, each importing only those below it::

    broker.py      the worker's fetch, get and repo questions answered or refused
    view.py        the call's read-only view of the cache: exactly what the worker was served
    connection.py  one checked fetch: every address checked, then connected to; redirects, caps
    policy.py      which URLs and addresses may be fetched (public only, unless allow-listed)
    limits.py      one frozen Limits holding every cap; the call's deadline and budget
    record.py      one FetchRecord per fetch, from the connection up to the CLI's --json

The download mechanics (temporary file, lock, hash, atomic move) are ``safehub._download``'s;
the broker lends it the checked connection.
"""
