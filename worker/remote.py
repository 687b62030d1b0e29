"""A remote model in the work process (``returns="remote"``): held after the load, called by the parent.

``work.py`` calls the entrypoint as for any load; with ``returns="remote"`` it keeps the result
here (:func:`hold`), answers the CALL with the model's public methods, then hands the channel to
:func:`serve`: one INVOKE at a time, each answered with RETURNED (data only, ``values.py``; the
weights layout for ``state_dict``) or FAILED, until CLOSE, or until the parent hangs up or kills
the tree. The worker stays in its sandbox for its whole life; nothing here runs in the parent.

A call runs under ``torch.inference_mode()`` (entered once, for the whole serve loop) unless the
INVOKE says ``"inference": false``: that call, its arguments' decoding included, leaves it. The
repository's code may still ask the parent for things through ``work.Channel`` (a fetch): the
parent refuses every question during a call, and between calls nobody reads them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

from . import failures, pools, protocol, replicas, values, weights
from .layout import WEIGHTS_METADATA
from .protocol import EXIT_OK, EXIT_SOFTWARE, WorkerSettings

MAX_METHODS = 4096
MAX_METHOD_NAME = 256
CALL_METHOD = "__call__"  # the wire name of ``remote(*args)``: the model's own __call__ (forward)
GETATTR_METHOD = protocol.REMOTE_GETATTR  # ``remote.name`` for a plain (non-callable) attribute: (name,)
WEIGHTS_METHODS = protocol.REMOTE_WEIGHTS_METHODS  # answered in the weights layout
# The parent is trusted here; its frames carry a call's arguments, inline or in memfds.
_INVOKE_LIMITS = protocol.Limits(
    max_header_bytes=64 * 1024 * 1024, max_buffers=1, max_buffer_bytes=1 << 40, max_total_bytes=1 << 40,
    max_fds=protocol.MAX_VALUE_FDS,
    max_header_nodes=64 * 1024 * 1024,  # the parent's tree: values.unpack's caps say the rest, as a failed call

)

_held: list[Any] = []  # the model, once loaded with returns="remote"

Reply = tuple[str, dict[str, Any], list[Any], list[int]]


class NotOneModel(Exception):
    """The entrypoint returned several things (a model and its preprocessing) for one handle."""


def hold(model: Any) -> dict[str, Any]:
    """Keep ``model`` for the calls to come; return the RESULT's fields that describe it."""
    if isinstance(model, (tuple, list)) and any(callable(item) for item in model):
        kinds = ", ".join(type(item).__name__ for item in model[:8])
        raise NotOneModel(
            f"The entrypoint returned a {type(model).__name__} ({kinds}); returns=\"remote\" keeps one model "
            "per handle. Call an entrypoint that returns the model alone, or load its weights "
            "(returns=\"weights\") or the whole result (returns=\"object\", which needs trust).")
    _held[:] = [model]
    warm_up()
    return {"methods": public_methods(model), "class": type(model).__name__[:MAX_METHOD_NAME]}


def warm_up() -> None:
    """Run a call's whole path once at load (the INVOKE's header, the codec both ways, inference
    mode, :func:`invoke` on a small stand-in module, the RETURNED's header), so the first call
    costs what later ones do: a forked worker pays for first use of each code path (lazy
    initialisation, and the zygote's pages it copies on first write). The model itself is not
    called: a call may have effects."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        with torch.inference_mode():
            packed = values.pack_call((torch.ones(1, 8),), {"k": [1.0, "s"]})
            fields = {"method": CALL_METHOD, "call": packed.tree, "inference": True}
            invoke_message = protocol.MESSAGES[protocol.INVOKE]
            fields = protocol.decode_fields(invoke_message, protocol.encode_fields(invoke_message, fields), 0)
            frame = protocol.Frame(protocol.INVOKE, fields, [bytearray(b) for b in packed.buffers])
            protocol.check_message(frame, (protocol.INVOKE, protocol.CLOSE))
            kind, fields, buffers, fds = invoke(_StandIn(torch), frame)
            protocol.encode_head(kind, fields, [len(b) for b in buffers], len(fds))
            for fd in fds:
                os.close(fd)
    except Exception:
        pass  # only a head start: a call that cannot warm up here still runs


class _StandIn:
    """What :func:`warm_up` calls instead of the model: an ``nn.Linear(8, 2)`` and a dict result."""

    def __init__(self, torch: Any) -> None:
        self.linear = torch.nn.Linear(8, 2)

    def __call__(self, x: Any, k: Any = None) -> Any:
        return {"out": self.linear(x), "k": k}


def holding() -> bool:
    """True once :func:`hold` kept a model: the work process then serves it instead of exiting."""
    return bool(_held)


def public_methods(model: Any) -> list[str]:
    """The names a caller may call: public callables of the model (methods, submodules)."""
    names = []
    for name in dir(model):
        if name.startswith("_") or len(name) > MAX_METHOD_NAME:
            continue
        try:
            if callable(getattr(model, name)):
                names.append(name)
        except Exception:
            continue  # a property that raises is no method
        if len(names) >= MAX_METHODS:
            break
    return names


def serve(wire: protocol.Wire, settings: WorkerSettings, channel: Any, *, replicas_allowed: bool = True) -> int:
    """Answer the parent's INVOKEs until CLOSE; the work process's exit code.

    A REPLICATE before the first call (``replicas_allowed``) makes this process the template of
    a replica set instead (``replicas.py``).

    ``channel`` is the conversation's ``work.Channel`` (on the same ``wire``): each call gets a
    fresh deadline for the questions the repository's code may ask meanwhile, and its lock keeps
    their frames apart from the calls' own. Inference mode is entered once, for the whole loop
    (entering it costs microseconds a call); a call with ``"inference": false`` leaves it for
    the call, its arguments included.
    """
    torch = sys.modules.get("torch")
    with torch.inference_mode() if torch is not None else contextlib.nullcontext():
        return _serve(wire, settings, channel, _held[0], replicas_allowed)


def _serve(wire: protocol.Wire, settings: WorkerSettings, channel: Any, model: Any, replicas_allowed: bool) -> int:
    timeout, lock = settings.timeout, channel.lock
    served = _SERVED + (protocol.REPLICATE,) if replicas_allowed else _SERVED
    while True:
        try:
            with lock:
                frame = wire.receive(deadline=None, limits=_INVOKE_LIMITS)
            protocol.check_message(frame, served)
        except protocol.FrameEOF:
            return EXIT_OK  # the parent let the handle go
        except protocol.FrameError as exc:
            print(f"safehub worker: a remote call broke the protocol: {exc}", file=sys.stderr)
            return EXIT_SOFTWARE
        if frame.kind == protocol.CLOSE:
            frame.close_fds()
            return EXIT_OK
        if frame.kind == protocol.REPLICATE:  # replicas=N: this process serves no call, it forks them
            return replicas.template(wire, settings, channel, frame)
        served = _SERVED  # only before the first call: a template holds nothing of a call
        deadline = channel.deadline = time.monotonic() + timeout
        inputs = pools.Inputs()
        if frame.fields["inference"]:
            kind, fields, buffers, fds = invoke(model, frame, inputs)
        else:
            with _autograd():
                kind, fields, buffers, fds = invoke(model, frame, inputs)
        inputs.settle()  # an input the model kept is made its own before the parent may reuse the pool
        try:
            with lock:
                wire.send_and_close(kind, fields, buffers, fds, deadline=deadline)
        except (protocol.FrameError, OSError) as exc:
            print(f"safehub worker: could not send a remote call's answer: {exc}", file=sys.stderr)
            return EXIT_SOFTWARE
        finally:
            # Freed and unmapped once the answer is on its way: the caller does not wait for it.
            del buffers
            inputs.release()


_SERVED = (protocol.INVOKE, protocol.CLOSE)


def invoke(model: Any, frame: protocol.Frame, inputs: pools.Inputs | None = None) -> Reply:
    """Run one INVOKE on ``model`` (in the mode :func:`serve` set): its RETURNED or FAILED reply.
    ``inputs`` keeps the mappings of its arguments and its result, to be freed after the reply."""
    method = frame.fields["method"]
    inputs = pools.Inputs() if inputs is None else inputs
    pool = None
    try:
        fds = frame.fds
        if fds and frame.fields.get("result_pool") is True:
            fds, pool = fds[:-1], pools.result_pool(fds[-1])
        segments = [*frame.buffers, *map(inputs.map, fds)] if fds else frame.buffers
        args, kwargs = values.unpack_call(frame.fields["call"], segments)
        del segments
    except (ValueError, OSError) as exc:
        return _failed("arguments", f"the call's arguments could not be read: {exc}")
    finally:
        if frame.fds:
            frame.close_fds()
    if method == CALL_METHOD:
        target = model if callable(model) else None
    elif method in WEIGHTS_METHODS:
        return _weights(model, method)
    elif method == GETATTR_METHOD:
        return _attribute(model, args, pool)
    else:
        target = _target(model, method)
    if target is None:
        return _failed("no_method", f"the remote {type(model).__name__} has no public method {method[:MAX_METHOD_NAME]!r}")
    try:
        value = target(*args, **kwargs)
    except BaseException as exc:
        return (protocol.FAILED, _fields(failures.exception("call", exc)), [], [])
    finally:
        del args, kwargs  # views on the inputs' mappings: Inputs.settle counts what is left
    if value is model:  # eval(), train(), to("cpu"), float(): the parent returns its handle
        return (protocol.RETURNED, {"value": None, "self": True}, [], [])
    inputs.held = value  # freed after the reply
    try:
        packed = values.pack(value, root="result", pool=_fitting(pool))
    except (ValueError, OSError) as exc:  # NotData, NotWeights, a memfd that could not be written
        return _failed("bad_result", f"the result of a call to {_name(method)} cannot be sent: {exc}", exc)
    finally:
        del value
    return _returned(packed)


def _fitting(pool: memoryview | None) -> Any:
    """``values.pack``'s pool: the parent's result pool when the large blobs fit in it."""
    if pool is None:
        return None
    return lambda nbytes: pool if nbytes <= len(pool) else None


def _returned(packed: values.Packed) -> Reply:
    if not packed.pooled:
        return (protocol.RETURNED, {"value": packed.tree}, packed.buffers, packed.fds)
    # The bytes of the result pool the value uses: its segment, after the frame's memfds.
    return (protocol.RETURNED, {"value": packed.tree, "pooled": packed.pooled}, packed.buffers, packed.fds)


def _attribute(model: Any, args: Any, pool: memoryview | None = None) -> Reply:
    """A plain attribute's value (``m.training``, a config number), as data; never a private name."""
    name = args[0] if isinstance(args, (list, tuple)) and len(args) == 1 else None
    if not isinstance(name, str) or name.startswith("_") or len(name) > MAX_METHOD_NAME:
        return _failed("no_attribute", "an attribute is read by its public name")
    try:
        value = getattr(model, name)
    except AttributeError:
        return _failed("no_attribute", f"the remote {type(model).__name__} has no public method or attribute {name!r}")
    except BaseException as exc:  # a property of the model's that raised
        return (protocol.FAILED, _fields(failures.exception("call", exc)), [], [])
    try:
        packed = values.pack(value, root="result", pool=_fitting(pool))
    except (ValueError, OSError) as exc:
        return _failed("bad_result", f"the attribute {name!r} of the remote {type(model).__name__} is not data: {exc}", exc)
    return _returned(packed)


def _weights(model: Any, method: str) -> Reply:
    """The model's weights (``state_dict``) or parameters (``named_parameters``) in the weights
    layout (``returns="weights"``'s), for the weights decoder."""
    try:
        if method == "named_parameters":
            tensors: Any = {name: p.detach() for name, p in model.named_parameters()}
        else:
            tensors = weights.collect_tensors(model)
        parts = weights.weights_parts(tensors)
        transport, buffers, fds = weights.encode_shards(parts, WEIGHTS_METADATA)
    except weights.NotWeights as exc:
        return _failed("bad_result", f"{method}() cannot be sent: {exc}", exc)
    except BaseException as exc:  # the model's own state_dict() raised
        return (protocol.FAILED, _fields(failures.exception("call", exc)), [], [])
    return (protocol.RETURNED, {"value": None, **transport}, buffers, fds)


def _target(model: Any, method: str) -> Any:
    if method == CALL_METHOD:
        return model if callable(model) else None
    if method.startswith("_"):
        return None  # private names and dunders are the model's own business
    try:
        target = getattr(model, method)
    except Exception:
        return None
    return target if callable(target) else None


def _autograd() -> Any:
    """Out of inference mode, for a call that asked for autograd (``"inference": false``)."""
    torch = sys.modules.get("torch")
    return torch.inference_mode(False) if torch is not None else contextlib.nullcontext()


def _name(method: str) -> str:
    return "the model" if method == CALL_METHOD else f"{method[:MAX_METHOD_NAME]}()"


def _failed(category: str, message: str, exc: BaseException | None = None) -> Reply:
    facts = {"type": type(exc).__name__, "traceback": failures.format_traceback(exc)} if exc is not None else {}
    return (protocol.FAILED, _fields(failures.error(category, message, **facts)), [], [])


def _fields(reply: tuple[str, dict[str, Any], list[Any], list[int]]) -> dict[str, Any]:
    fields = reply[1]
    fields.pop("phase", None)  # FAILED always means the call itself
    return fields
