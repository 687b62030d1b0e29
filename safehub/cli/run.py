"""``safehub run``: call a model in the sandbox on tensors from a file, and save what it returns.

The smoke test of a third-party model in CI with no trust: the entrypoint is loaded with
``returns="remote"``, so the model and every call on it stay in the sandboxed worker; only data
crosses (tensors read from ``--input``, results written to ``--output``, both .safetensors).
torch and safetensors are imported only when the command runs.

Inputs: a tensor named ``0``, ``1``, ... is that positional argument; any other name is a keyword
argument of that name. Outputs: a tensor result is saved as ``output``; a tuple, list or dict is
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
from ._errors import EXIT_ERROR, EXIT_OK, CommandError
from ._options import add_command, entrypoint_arguments, json_option, repo_options, sandbox_from_options, sandbox_options
from ._output import atomic_output, check_output_path, format_size, print_json, savable_tensors, stdout_to_stderr


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "run", func=cmd_run, help="call a model in the sandbox on tensors from a file",
                    description="Load an entrypoint in the sandbox, call the model there on the tensors of --input,\n"
                                "and write what it returns to --output (.safetensors). The model never leaves its\n"
                                "worker (returns=\"remote\"): no code of the repository runs here, so no trust is\n"
                                "needed. A smoke test of a third-party model in CI.\n\n"
                                "Inputs: tensors named 0, 1, ... are positional arguments, in that order; any other\n"
                                "name is a keyword argument. Outputs: a tensor is saved as 'output'; tuples, lists and\n"
                                "dicts are flattened with dotted names (logits, hidden_states.0); numbers, strings,\n"
                                "bools and None go to the file's metadata (safehub.values, JSON) and to --json.",
                    epilog="examples:\n"
                           "  safehub run someone/models:v1.2 resnet_tiny --input x.safetensors --output y.safetensors\n"
                           "  safehub run someone/models unet --arg channels=8 --input x.safetensors --output y.safetensors --json\n"
                           "  safehub run someone/models tiny_lm --method generate --input ids.safetensors --output out.safetensors\n\n"
                           "Write an input with: safetensors.torch.save_file({\"0\": torch.rand(1, 3, 224, 224)}, \"x.safetensors\")")
    entrypoint_arguments(p, model_metavar="ENTRYPOINT")
    p.add_argument("-i", "--input", metavar="FILE", required=True,
                   help="a .safetensors file: the call's tensors (0, 1, ...: positional; other names: keyword)")
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help=".safetensors file to write (through a temporary file, renamed when complete)")
    p.add_argument("--method", metavar="NAME", help="call this public method of the model instead of the model itself")
    repo_options(p)
    sandbox_options(p, no_isolate=False)
    json_option(p)


def cmd_run(args: argparse.Namespace) -> int:
    output, input_path = Path(args.output), Path(args.input)
    check_output_path(output)
    positional, keywords = read_inputs(input_path)
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
    from safetensors.torch import save_file

    metadata = {"format": "pt", "safehub.repo": str(args.repo), "safehub.model": args.model,
                "safehub.values": json.dumps(others)}
    with atomic_output(output) as tmp:
        save_file(savable_tensors(tensors), str(tmp), metadata=metadata)
    report = {
        "repo": args.repo, "model": args.model, "method": args.method, "input": str(input_path),
        "output": str(output), "arguments": len(positional) + len(keywords),
        "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for name, t in tensors.items()},
        "values": others, "bytes": output.stat().st_size,
    }
    if args.json:
        print_json(report)
    else:
        called = args.model if args.method is None else f"{args.model}.{args.method}"
        print(f"Ran {args.repo} {called} on {report['arguments']} input(s) from {input_path}; wrote "
              f"{len(tensors)} tensor(s) to {output} ({format_size(report['bytes'])}).")
    return EXIT_OK


def read_inputs(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """The call's arguments from a .safetensors file: 0, 1, ... positional; other names by keyword."""
    if not path.is_file():
        raise CommandError(f"--input {path}: no such file.", exit_code=EXIT_ERROR)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' own error types: a file that is not one
        raise CommandError(f"--input {path} is not a .safetensors file: {exc}", exit_code=EXIT_ERROR) from None
    numbered = sorted((int(name), tensor) for name, tensor in tensors.items() if name.isdigit())
    if [n for n, _ in numbered] != list(range(len(numbered))):
        raise CommandError(f"--input {path}: positional tensors must be named 0, 1, ... without gaps "
                           f"(found {[n for n, _ in numbered]}).", exit_code=EXIT_ERROR)
    return [t for _, t in numbered], {name: t for name, t in tensors.items() if not name.isdigit()}


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
