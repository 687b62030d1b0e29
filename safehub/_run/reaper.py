"""The end of a finished call's worker, in the background: the call returns as soon as its answer is in.

Once a worker has answered (its RESULT or ERROR read), nothing the caller gets depends on its
processes any more: they exit by themselves, their supervisor reaps them, and the parent waits
for that, kills what lingers, and removes the call's scratch folder, cgroup and view. A
:class:`Job` does that here, on one background thread, in the order the calls ended.

Still, no process of a call outlives the next one's start: :func:`settle` (which every isolated
call runs before it starts its worker) waits until the processes of every call that returned are
gone; the folders may go later. :func:`drain` waits for everything, folders included: the warm
path's ``stop`` runs it, at interpreter exit too. A call that fails (a timeout, a crash) is not
handed over: its tree is killed and reaped before the error is raised.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections import deque
from typing import Callable

from .. import _log

Step = Callable[[], None]


class Job:
    """One finished call's end: ``end`` until its processes are gone, then ``cleanup``."""

    def __init__(self, end: Step | None, cleanup: Step | None) -> None:
        self.end = end
        self.cleanup = cleanup
        self.processes_gone = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        for step, event in ((self.end, self.processes_gone), (self.cleanup, self.done)):
            try:
                if step is not None:
                    step()
            except Exception as exc:  # a cleanup that fails must not stop the ones after it
                _log.warning(f"cleaning up after a worker failed: {type(exc).__name__}: {exc}")
            finally:
                event.set()


_lock = threading.Lock()
_jobs: deque[Job] = deque()  # not yet done, oldest first
_thread: threading.Thread | None = None
_owner = os.getpid()


def later(*, end: Step | None = None, cleanup: Step | None = None) -> Job:
    """Run ``end`` (until the call's processes are gone), then ``cleanup``, in the background."""
    global _thread
    job = Job(end, cleanup)
    with _lock:
        _jobs.append(job)
        if _thread is None:  # the thread ends once the queue is empty: start one for this job
            _thread = threading.Thread(target=_run, name="safehub-reaper", daemon=True)
            _thread.start()
    return job


def settle() -> None:
    """Wait until no process of a call that returned is left (before a new call starts)."""
    for job in _pending():
        job.processes_gone.wait()


def drain() -> None:
    """Wait until every finished call is wholly cleaned up (processes and folders), and the
    background thread has ended (it ends whenever there is nothing left to do)."""
    for job in _pending():
        job.done.wait()
    with _lock:
        thread = _thread if os.getpid() == _owner else None
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def _pending() -> list[Job]:
    if os.getpid() != _owner:
        return []  # a forked child: the jobs are its parent's
    with _lock:
        return list(_jobs)


def _run() -> None:
    global _thread
    while True:
        with _lock:
            if not _jobs:
                _thread = None
                return  # nothing left: no thread lingers (later() starts one again)
            job = _jobs[0]
        job.run()
        with _lock:
            _jobs.popleft()


def _forget_after_fork() -> None:
    # The thread is not in the child, and the jobs are the parent's workers.
    global _lock, _thread, _owner, _jobs
    _lock = threading.Lock()
    _thread, _owner, _jobs = None, os.getpid(), deque()


os.register_at_fork(after_in_child=_forget_after_fork)
with contextlib.suppress(Exception):
    atexit.register(drain)
