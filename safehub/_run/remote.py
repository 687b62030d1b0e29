"""The handle of a remote model: ``safehub.load(..., isolate=True, returns="remote")`` (DESIGN 1).

:class:`RemoteModule` looks like the model to its caller (call it, call its methods by name, its
``state_dict``, ``eval`` and ``train``), but the model never leaves its sandboxed worker: every
call is sent there as data and its result comes back as data (``session.py`` holds the worker;
``safehub/_worker/values.py`` says what data is). No code of the repository runs in this process,
so no trust is needed. :func:`open_remote` turns a worker's answer to the load into a handle.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .process import Worker
from .replicas import ReplicaSet, open_replicas
from .replies import MAX_NAME
from .session import CALL_METHOD, GETATTR_METHOD, SELF, RemoteSession

if TYPE_CHECKING:
    import torch



class RemoteModule:
    """A model that stays in its sandboxed worker; each call runs there, with data in and data out.

    Made by ``safehub.load(repo, model, ..., isolate=True, returns="remote")`` (or
    ``isolate=safehub.Sandbox(...)``). The worker lives as long as the handle: until
    :meth:`close`, the end of a ``with`` block, the handle being garbage-collected, or the
    interpreter's exit; if this process dies, its supervisor takes the worker's whole process tree
    down. Several handles (two branches of one repository) each have their own worker; calls
    from several threads on one handle take turns. With ``replicas=N`` the model is served by N
    sandboxed workers that share one copy of its weights, and each call goes to an idle one
    (:attr:`replicas`, :attr:`replica_pids`). A handle cannot be pickled or sent to another
    process (a Ray task or actor, a ``multiprocessing`` child): load the model in the process
    that calls it (README "Many nodes: Ray").

    Calls:

    - ``remote(*args, **kwargs)`` calls the model (its ``forward``, for an ``nn.Module``);
    - ``remote.encode(x)``, ``remote.generate(ids, max_new_tokens=8)``: any public method (or
      submodule) of the model, by name; :attr:`methods` lists them, :meth:`call` calls one by
      name (also one whose name this class uses itself, such as ``close``);
    - :meth:`state_dict`, :meth:`named_parameters` and :meth:`parameters` give the weights as
      data; a plain attribute (``remote.training``, a config value) is read in the worker and
      comes back as data (``AttributeError`` if the model has none); a method that returns the
      model itself (``eval()``, ``train()``, ``to("cpu")``, ``float()``) returns this handle.

    Arguments and results are data, never pickles: tensors (the dtypes of
    ``returns="weights"``: float64/32/16, bfloat16, int64/32/16/8, uint8, bool), int, float,
    bool, None, str, bytes, and lists, tuples and str-keyed dicts of them, at most 32 containers
    deep. A namedtuple comes back as a tuple, a ``ModelOutput`` or other mapping as a dict, a
    dataclass as a dict of its fields. Tensors cross through shared memory (sealed memfds; a small
    one inside the message): the worker works on a copy of each input, so it cannot change the
    caller's tensors, and a result is a view on the worker's sealed memory, not a copy, which the
    caller may write. Calls run under ``torch.inference_mode()`` unless :attr:`inference_mode`
    is set to False (for a method that needs autograd inside; its results are still data).

    Limits: ``Sandbox(timeout=...)`` bounds the load and then each call; ``idle_timeout`` and
    ``lifetime`` bound the worker's time between calls and its whole life; memory, CPU and
    process limits hold for its whole life. A call past its time limit, a worker that crashes
    or sends a reply that breaks the protocol: the worker is ended, that call raises what
    happened, and every later call raises :class:`~safehub.errors.RemoteClosedError` saying why.
    An exception in the model's own code is raised as :class:`~safehub.errors.RemoteError`
    (with the worker's traceback) and the model stays. A call cannot fetch: the worker's
    requests to the parent are refused while it runs.

    Example::

        import safehub, torch

        with safehub.load("someone/models:v1.2", "unet", isolate=True, returns="remote") as unet:
            mask = unet(torch.rand(1, 3, 64, 64))
            features = unet.encode(torch.rand(1, 3, 64, 64))
            weights = unet.state_dict()
    """

    def __init__(self, session: RemoteSession | ReplicaSet, methods: list[str], class_name: str) -> None:
        self._session = session
        self._methods = frozenset(methods)
        self._class_name = class_name
        #: Run calls under ``torch.inference_mode()`` (default True); False for autograd inside a call.
        self.inference_mode = True
        # The worker goes with the handle: when it is collected, or at exit, whichever is first.
        self._finalizer = weakref.finalize(self, session.close)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model in the worker (``model(*args, **kwargs)``: ``forward`` for an ``nn.Module``).

        Returns:
            The model's result, as data (see the class docstring).

        Raises:
            RemoteError: the model's code raised (``remote_traceback`` holds the worker's traceback).
            InvalidArgumentError: an argument is not data.
            RemoteClosedError: the model is gone (``reason`` says why).
            WorkerTimeoutError, WorkerCrashedError, ProtocolError: this call ended the worker.

        Example::

            logits = remote(torch.rand(1, 3, 32, 32))
        """
        return self._result(self._session.call(CALL_METHOD, args, kwargs, inference=self.inference_mode))

    def _result(self, value: Any) -> Any:
        # A method that returns the model itself (to("cpu"), float(), eval()) gives this handle.
        return self if value is SELF else value

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the model's public method ``method`` in the worker; as ``remote.<method>(...)``.

        Args:
            method: a name of :attr:`methods`.
            *args, **kwargs: data (see the class docstring).

        Returns:
            The method's result, as data.

        Raises:
            AttributeError: the model has no public method of that name.
            RemoteError, InvalidArgumentError, RemoteClosedError: as for calling the handle.

        Example::

            tokens = remote.call("generate", prompt, max_new_tokens=16)
        """
        if not isinstance(method, str) or method not in self._methods:
            raise AttributeError(f"the remote {self._class_name} has no public method {str(method)[:MAX_NAME]!r}")
        return self._result(self._session.call(method, args, kwargs, inference=self.inference_mode))

    def __getattr__(self, name: str) -> Any:
        # Only for names the class lacks: the model's public methods become callables here, and
        # any other public attribute (m.training, a config value) is read in the worker, as data.
        if name.startswith("_"):
            raise AttributeError(f"the remote {self._class_name}'s private attributes stay in its worker ({name!r})")
        if name in self._methods:
            return _RemoteMethod(self, name)
        return self._session.call(GETATTR_METHOD, (name,), {}, inference=self.inference_mode)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | self._methods)

    @property
    def methods(self) -> tuple[str, ...]:
        """The public methods (and submodules) of the model that can be called by name."""
        return tuple(sorted(self._methods))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights, as data: what ``safehub.load(..., returns="weights")`` gives.

        Returns:
            ``dict[str, torch.Tensor]``: the ``state_dict()`` of an ``nn.Module`` (or the
            tensors of a mapping), parsed by the weights decoder, never unpickled.

        Raises:
            ResultDecodeError: the model holds no tensors, or ones the format cannot carry.
            RemoteClosedError: the model is gone.

        Example::

            my_model.load_state_dict(remote.state_dict())
        """
        return self._session.call("state_dict", (), {}, inference=self.inference_mode)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each parameter of the model, as data (like :meth:`state_dict`).

        Example::

            total = sum(p.numel() for _, p in remote.named_parameters())
        """
        return iter(self._session.call("named_parameters", (), {}, inference=self.inference_mode).items())

    def parameters(self) -> Iterator[torch.Tensor]:
        """The model's parameters, as data (tensors, not ``nn.Parameter``s bound to the model)."""
        return (tensor for _, tensor in self.named_parameters())

    def eval(self) -> RemoteModule:
        """Put the model in evaluation mode (``model.eval()`` in the worker); returns the handle."""
        self._session.call("eval", (), {}, inference=self.inference_mode)
        return self

    def train(self, mode: bool = True) -> RemoteModule:
        """Put the model in training mode, or not (``model.train(mode)`` in the worker); returns the handle."""
        if type(mode) is not bool:
            raise TypeError(f"train(mode=...) takes a bool, not {type(mode).__name__}")
        self._session.call("train", (mode,), {}, inference=self.inference_mode)
        return self

    def close(self) -> None:
        """End the worker and everything it started; later calls raise ``RemoteClosedError``.

        Idempotent, and safe from any thread: a call running meanwhile is cut off. Collecting the
        handle, leaving its ``with`` block and the interpreter's exit close it too.

        Example::

            remote.close()
            assert remote.closed
        """
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True once the model is gone (closed, timed out, crashed, past its idle or whole life)."""
        return self._session.gone is not None

    @property
    def pid(self) -> int | None:
        """The pid of the worker's supervisor, the top of its process tree; None once it is gone."""
        return self._session.pid

    @property
    def replicas(self) -> int:
        """How many workers serve calls: ``replicas=N`` at load, fewer once one ended (they are not
        replaced), 0 once the model is gone."""
        return len(self.replica_pids) if isinstance(self._session, ReplicaSet) else int(not self.closed)

    @property
    def replica_pids(self) -> tuple[int, ...]:
        """The pid of each replica still serving (``replicas=N``); a single worker's supervisor otherwise."""
        if isinstance(self._session, ReplicaSet):
            return () if self.closed else self._session.replica_pids
        pid = self.pid
        return () if pid is None or self.closed else (pid,)

    def __enter__(self) -> RemoteModule:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"gone: {self._session.gone}" if self.closed else f"worker pid {self.pid}"
        return f"<safehub.RemoteModule {self._session.model!r} ({self._class_name}), {state}>"

    def __reduce__(self) -> Any:
        # A copy elsewhere would hold a channel to a worker it does not own: refuse, and say what works.
        raise TypeError(
            f"a safehub.RemoteModule cannot be pickled, copied or sent to another process (a Ray task or actor, "
            f"ray.put, a multiprocessing child): its model {self._session.model!r} lives in a sandboxed worker that "
            f"belongs to process {self._session.owner}. Send the repository and entrypoint instead, and load the model "
            f"in the process that calls it: safehub.load(..., returns=\"remote\") in the Ray actor's __init__ (or the "
            f"map_batches class's __init__, or the child process); see the README's Ray recipe."
        )


class _RemoteMethod:
    """``remote.<name>``: calls the model's method ``name`` in the worker."""

    def __init__(self, handle: RemoteModule, name: str) -> None:
        self.handle = handle
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.handle.call(self.__name__, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<remote method {self.__name__} of {self.handle!r}>"


def open_remote(worker: Worker, model: str, methods: list[str], class_name: str, *,
                replicas: int = 1, applied: object = None) -> RemoteModule:
    """The handle of a worker that answered a ``returns="remote"`` load (``replies.remote_model``
    checked the answer); it owns the worker from here. ``replicas`` above 1: the worker becomes
    the template of that many replicas (``replicas.py``; ``applied``: the layers it reported)."""
    session: RemoteSession | ReplicaSet
    session = RemoteSession(worker, model) if replicas == 1 else open_replicas(worker, model, replicas, applied)
    session.warm_up()
    return RemoteModule(session, methods, class_name)
