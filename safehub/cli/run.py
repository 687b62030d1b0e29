"""``safehub run``: call a model in the sandbox on tensors from a file, and save what it returns.

The smoke test of a third-party model in CI with no trust: the entrypoint is loaded with
``returns="remote"``, so the model and every call on it stay in the sandboxed worker; only data
crosses (tensors read from ``--input``, values from ``--call-arg``, results written to
``--output``). torch and safetensors are imported only when the command runs.

Inputs: ``--input`` is a .safetensors file, a .pt/.pth file (read with ``weights_only=True``) of a
tensor, a list or a dict of tensors, or a .npy array; a tensor named ``0``, ``1``, ... is that
positional argument, any other name a keyword argument of that name. ``--call-arg NAME=VALUE``
adds a keyword argument that is no tensor (JSON when it parses). Outputs, as the extension of
``--output`` says (.safetensors, or .pt/.pth for ``torch.save``): a tensor result is saved as ``output``; a tuple, list or dict is
flattened with dotted names (``logits``, ``hidden_states.0``); bytes become uint8 tensors; numbers,
strings, bools and None go to the file's metadata as ``safehub.values`` (JSON) and to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .. import _api
from .._worker import with_article
from ._errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, CommandError
from ._options import add_command, check_repo, entrypoint_arguments, parse_kwarg, repo_options, sandbox_from_options, sandbox_options
from ._output import TENSOR_FORMATS, check_output_path, format_size, print_json, stdout_to_stderr, write_tensors


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "run", func=cmd_run, help="call a model in the sandbox on tensors from a file",
                    description="Load an entrypoint in the sandbox, call the model there on the tensors of --input,\n"
                                "and write what it returns to --output (.safetensors). The model never leaves its\n"
                                "worker (returns=\"remote\"): no code of the repository runs here, so no trust is\n"
                                "needed. A smoke test of a third-party model in CI.\n\n"
                                "Inputs (--input: .safetensors, .pt/.pth or .npy): tensors named 0, 1, ... are positional\n"
                                "arguments, in that order; any other name is a keyword argument. --call-arg NAME=VALUE\n"
                                "gives the call a keyword argument that is no tensor (--arg is for the entrypoint). Outputs: a tensor is saved as 'output'; tuples, lists and\n"
                                "dicts are flattened with dotted names (logits, hidden_states.0); numbers, strings,\n"
                                "bools and None go to the file's metadata (safehub.values, JSON) and to --json.",
                    epilog="examples:\n"
                           "  safehub run someone/models:v1.2 resnet_tiny --input x.safetensors --output y.safetensors\n"
                           "  safehub run someone/models unet --arg channels=8 --input x.safetensors --output y.safetensors --json\n"
                           "  safehub run someone/models tiny_lm --method generate --input ids.pt --call-arg max_new_tokens=8 --output out.safetensors\n\n"
                           "Write an input with: safetensors.torch.save_file({\"0\": torch.rand(1, 3, 224, 224)}, \"x.safetensors\")")
    entrypoint_arguments(p, model_metavar="ENTRYPOINT")
    p.add_argument("-i", "--input", metavar="FILE",
                   help="the call's tensors: a .safetensors file, a .pt/.pth file of a dict of tensors (read with "
                        "torch.load(weights_only=True)), or a .npy array (the one positional argument). "
                        "In a dict, names 0, 1, ... are positional, other names keyword arguments")
    p.add_argument("--call-arg", dest="call_kwargs", metavar="NAME=VALUE", type=parse_kwarg, action="append",
                   help="a keyword argument for the call (not the entrypoint: that is --arg); repeatable, "
                        "JSON when it parses")
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="file to write: .safetensors (values in its metadata) or .pt/.pth (torch.save of the "
                        "result's tensors); through a temporary file, renamed when complete")
    p.add_argument("--method", metavar="NAME", help="call this public method of the model instead of the model itself")
    repo_options(p)
    sandbox_options(p, no_isolate=False)


def cmd_run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    check_repo(args)
    input_path = Path(args.input) if args.input is not None else None
    check_output_path(output, formats=TENSOR_FORMATS)
    positional, keywords = read_inputs(input_path) if input_path is not None else ([], {})
    for name, value in args.call_kwargs or []:
        if name in keywords:
            raise CommandError(f"--call-arg {name}: --input already gives the call a tensor of that name.",
                               exit_code=EXIT_USAGE)
        keywords[name] = value
    if not positional and not keywords:
        raise CommandError("the call has no arguments: give --input FILE, --call-arg NAME=VALUE, or both.",
                           exit_code=EXIT_USAGE)
    sandbox = sandbox_from_options(args)
    with stdout_to_stderr():
        remote = _api.load(args.repo, args.model, source=args.source, force_reload=args.force_reload,
                           verbose=args.verbose, skip_validation=args.skip_validation,
                           isolate=True if sandbox is None else sandbox, returns="remote", lock=args.locked,
                           **dict(args.kwargs or []))
        with remote:
            target = remote if args.method is None else _method(remote, args.method)
            result = target(*positional, **keywords)
    tensors, others = flatten(result)
    metadata = {"format": "pt", "safehub.repo": str(args.repo), "safehub.model": args.model,
                "safehub.values": json.dumps(others)}
    write_tensors(output, tensors, metadata)
    report = {
        "repo": args.repo, "model": args.model, "method": args.method,
        "input": None if input_path is None else str(input_path),
        "output": str(output), "arguments": len(positional) + len(keywords),
        "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for name, t in tensors.items()},
        "values": others, "bytes": output.stat().st_size,
    }
    if args.json:
        print_json(report)
    else:
        called = args.model if args.method is None else f"{args.model}.{args.method}"
        source = f" from {input_path}" if input_path is not None else ""
        print(f"Ran {args.repo} {called} on {report['arguments']} input(s){source}; wrote "
              f"{len(tensors)} tensor(s) to {output} ({format_size(report['bytes'])}).")
    return EXIT_OK


def read_inputs(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """The call's arguments from a file, by its extension: a .safetensors file or a .pt/.pth file
    holding a dict of tensors (0, 1, ... positional; other names by keyword), or a .npy array (the
    one positional argument). Nothing in them is executed: .pt is read with weights_only=True."""
    if not path.is_file():
        raise CommandError(f"--input {path}: no such file.", exit_code=EXIT_ERROR)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return [_read_npy(path)], {}
    if suffix in (".pt", ".pth"):
        tensors = _read_pt(path)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors' own error types: a file that is not one
            raise CommandError(f"--input {path} is not a .safetensors file: {exc}", exit_code=EXIT_ERROR) from None
    else:
        raise CommandError(f"--input {path}: the file name must end in .safetensors, .pt, .pth or .npy, which "
                           "says what it holds.", exit_code=EXIT_USAGE)
    numbered = sorted((int(name), tensor) for name, tensor in tensors.items() if name.isdigit())
    if [n for n, _ in numbered] != list(range(len(numbered))):
        raise CommandError(f"--input {path}: positional tensors must be named 0, 1, ... without gaps "
                           f"(found {[n for n, _ in numbered]}).", exit_code=EXIT_ERROR)
    return [t for _, t in numbered], {name: t for name, t in tensors.items() if not name.isdigit()}


def _read_pt(path: Path) -> dict[str, Any]:
    import torch

    try:
        # weights_only: a .pt input is data; a pickle that wants to run code is refused by torch.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CommandError(f"--input {path} is not a torch.save file of tensors (read with weights_only=True): "
                           f"{' '.join(str(exc).split())[:300]}", exit_code=EXIT_ERROR) from None
    if isinstance(data, torch.Tensor):
        return {"0": data}
    if isinstance(data, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in data):
        return {str(i): t for i, t in enumerate(data)}
    if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        return dict(data)
    raise CommandError(f"--input {path} holds {with_article(type(data).__name__)}; it must hold a tensor, a list "
                       "of tensors, or a dict of str to tensors.", exit_code=EXIT_ERROR)


def _read_npy(path: Path) -> Any:
    import numpy
    import torch

    try:
        array = numpy.load(path, allow_pickle=False)  # an object array would be a pickle: refused
    except Exception as exc:
        raise CommandError(f"--input {path} is not a .npy array: {exc}", exit_code=EXIT_ERROR) from None
    return torch.from_numpy(numpy.ascontiguousarray(array))


def flatten(result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors by dotted name, the other values by dotted name) of a remote call's result."""
    import torch

    tensors: dict[str, Any] = {}
    others: dict[str, Any] = {}

    def visit(value: Any, name: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else key)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{name}.{index}" if name else str(index))
        else:
            place = name or "output"
            if place in tensors or place in others:
                raise CommandError(f"two outputs flatten to the name {place!r}; call a method that returns "
                                   "distinct names.", exit_code=EXIT_ERROR)
            if isinstance(value, torch.Tensor):
                tensors[place] = value
            elif isinstance(value, bytes):
                tensors[place] = torch.frombuffer(bytearray(value), dtype=torch.uint8) if value else torch.empty(0, dtype=torch.uint8)
            else:
                others[place] = str(value) if isinstance(value, float) and not math.isfinite(value) else value

    visit(result, "")
    return tensors, others


def _method(remote: Any, name: str) -> Any:
    if name not in remote.methods:
        raise CommandError(f"--method {name}: the model has no public method of that name "
                           f"(it has: {', '.join(remote.methods[:30])}).", exit_code=EXIT_ERROR)
    return lambda *args, **kwargs: remote.call(name, *args, **kwargs)
