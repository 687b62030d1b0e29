"""``safehub list``, ``help`` and ``load``: a repository's entrypoints, their docstrings, their results.

Each runs ``hubconf.py`` in the sandbox unless ``--no-isolate``; ``load`` writes what the entrypoint
returns to a file (tensors as .safetensors by default, or the whole object with ``--returns object``).
torch, safetensors and cloudpickle are imported only when ``load`` writes, so ``safehub --help`` and
``list`` stay quick to start.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import _api
from ._errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, CommandError
from .._terminal import visible, visible_lines
from .._worker import with_article
from ._options import (
    REPO_HELP,
    add_command,
    check_repo,
    entrypoint_arguments,
    repo_options,
    sandbox_from_options,
    sandbox_options,
    sandbox_settings_given,
)
from ._output import TENSOR_FORMATS, atomic_output, check_output_path, format_size, note, print_json, stdout_to_stderr, write_tensors

_TRUST_FOR_NO_ISOLATE = "trust the repository (adds it to the trusted list); needed only with --no-isolate"


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "list", func=cmd_list, help="list a repository's entrypoints",
                    description="List the entrypoints (the public callables) of a repository's hubconf.py.\n"
                                "hubconf.py is imported in the sandbox, so no trust is needed.",
                    epilog="examples:\n"
                           "  safehub list pytorch/vision\n"
                           "  safehub list pytorch/vision:v0.16.0 --json\n"
                           "  safehub list ./my-models --source local\n"
                           "  safehub list someone/repo --no-isolate --trust   in-process, as torch.hub.list")
    p.add_argument("repo", metavar="REPO", help=REPO_HELP)
    _fetch_options(p, trust_help=_TRUST_FOR_NO_ISOLATE)

    p = add_command(subparsers, "help", func=cmd_help, help="show an entrypoint's docstring",
                    description="Show the docstring of one entrypoint, read in the sandbox (no trust needed).",
                    epilog="examples:\n"
                           "  safehub help pytorch/vision resnet18\n"
                           "  safehub help pytorch/vision:v0.16.0 resnet18 --json")
    p.add_argument("repo", metavar="REPO", help=REPO_HELP)
    p.add_argument("model", metavar="MODEL", help="the entrypoint's name")
    _fetch_options(p, trust_help=_TRUST_FOR_NO_ISOLATE)

    p = add_command(subparsers, "load", func=cmd_load, help="call an entrypoint and save its weights (or object)",
                    description="Call an entrypoint and write what it returns to a file.\n\n"
                                "--returns weights (default): the entrypoint runs in the sandbox; only its tensors\n"
                                "come back, parsed as data, and are written as a .safetensors file. No code of the\n"
                                "repository runs outside the sandbox, so no trust is needed: the way to use an\n"
                                "untrusted repository in CI. The file's extension says its format: .safetensors,\n"
                                "or .pt/.pth for torch.save of the state dict (torch.load(path, weights_only=True)).\n"
                                "With --no-isolate the entrypoint runs here and the command takes its state dict.\n\n"
                                "--returns object: the returned object comes back whole and is written with\n"
                                "torch.save (read it with torch.load(path, weights_only=False)). Its code then runs\n"
                                "here, so the repository must be trusted (--trust, or `safehub trust add`).",
                    epilog="examples:\n"
                           "  safehub load someone/repo:v1.0 net --output net.safetensors\n"
                           "  safehub load someone/repo net --arg pretrained=true --arg depth=50 --output net.safetensors\n"
                           "  safehub load someone/repo:v1.0 net --locked safehub.lock --output net.safetensors\n"
                           "  safehub load someone/repo net --timeout 120 --memory-limit 4G --output net.safetensors\n"
                           "  safehub load pytorch/vision resnet18 --returns object --trust --output resnet18.pt\n\n"
                           "--arg values are JSON when they parse (3, 0.5, true, null, \"text\", [1, 2]),\n"
                           "else plain strings: --arg name=resnet is the string 'resnet'.")
    entrypoint_arguments(p)
    p.add_argument("--returns", choices=("weights", "object"), default="weights",
                   help="weights (default): tensors into a .safetensors or .pt/.pth file; "
                        "object: torch.save the object into a .pt/.pth file (needs trust)")
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="file to write (through a temporary file, renamed when complete)")
    _fetch_options(p, trust_help="trust the repository (adds it to the trusted list); needed for --returns object")


def _fetch_options(parser: argparse.ArgumentParser, *, trust_help: str) -> None:
    """Where the repository comes from, trust, and the sandbox's limits (read by :func:`_isolate_arg`)."""
    repo_options(parser)
    parser.add_argument("--trust", dest="trust_repo", action="store_const", const=True, default="check",
                        help=trust_help)
    sandbox_options(parser, no_isolate=True)


def _isolate_arg(args: argparse.Namespace) -> Any:
    """False, True, or a Sandbox with the settings given on the command line."""
    if args.no_isolate:
        given = sandbox_settings_given(args)
        if given:
            raise CommandError(f"{', '.join(given)} set the sandbox; they do nothing with --no-isolate.",
                               exit_code=EXIT_USAGE)
        return False
    sandbox = sandbox_from_options(args)
    return True if sandbox is None else sandbox


def cmd_list(args: argparse.Namespace) -> int:
    with stdout_to_stderr():
        names = _api.list(args.repo, force_reload=args.force_reload, skip_validation=args.skip_validation,
                          trust_repo=args.trust_repo, verbose=args.verbose, source=args.source,
                          isolate=_isolate_arg(args), lock=args.locked)
    if args.json:
        print_json({"repo": args.repo, "entrypoints": names})
    else:
        for name in names:
            print(visible(name))
    return EXIT_OK


def cmd_help(args: argparse.Namespace) -> int:
    with stdout_to_stderr():
        doc = _api.help(args.repo, args.model, force_reload=args.force_reload,
                        skip_validation=args.skip_validation, trust_repo=args.trust_repo,
                        source=args.source, isolate=_isolate_arg(args), lock=args.locked)
    if args.json:
        print_json({"repo": args.repo, "model": args.model, "doc": inspect.cleandoc(doc) if doc else doc})
    elif doc:
        print(visible_lines(inspect.cleandoc(doc)))
    else:
        note(f"{args.model} has no docstring.")
    return EXIT_OK


_OBJECT_FORMATS = {".pt": "torch", ".pth": "torch"}


def cmd_load(args: argparse.Namespace) -> int:
    output = Path(args.output)
    check_repo(args)
    if args.returns == "object" and output.suffix.lower() == ".safetensors":
        raise CommandError(f"--output {output}: --returns object writes the whole object with torch.save, "
                           "which a .safetensors file cannot hold. Name the file .pt, or drop --returns object "
                           "to write the tensors.", exit_code=EXIT_USAGE)
    check_output_path(output, formats=TENSOR_FORMATS if args.returns == "weights" else _OBJECT_FORMATS)
    kwargs = dict(args.kwargs or [])
    from .._egress.record import recording

    # In-process (--no-isolate) the object is here anyway: the command takes its tensors itself.
    returns = "object" if args.no_isolate else args.returns
    with stdout_to_stderr(), recording() as fetches:
        result = _api.load(args.repo, args.model, source=args.source, trust_repo=args.trust_repo,
                           force_reload=args.force_reload, verbose=args.verbose,
                           skip_validation=args.skip_validation, isolate=_isolate_arg(args),
                           returns=returns, lock=args.locked, **kwargs)
    report: dict[str, Any] = {"repo": args.repo, "model": args.model, "returns": args.returns,
                              "output": str(output), "fetches": [f.as_dict() for f in fetches]}
    if args.returns == "weights":
        tensors = _tensors_of(result) if args.no_isolate else result
        metadata = {"format": "pt", "safehub.repo": str(args.repo), "safehub.model": args.model}
        write_tensors(output, tensors, metadata)
        report["tensors"] = len(tensors)
        report["elements"] = sum(int(t.numel()) for t in tensors.values())
        what = f"{len(tensors)} tensors ({report['elements']} values)"
    else:
        import cloudpickle
        import torch

        # cloudpickle: the repository's classes go into the file by value, so reading it back
        # (torch.load(path, weights_only=False)) needs neither safehub nor the repository.
        with atomic_output(output) as tmp:
            torch.save(result, tmp, pickle_module=cloudpickle)
        what = f"{with_article(type(result).__name__)} object"
    report["bytes"] = output.stat().st_size
    if args.json:
        print_json(report)
    else:
        print(f"Wrote {what} from {args.repo} {args.model} to {output} ({format_size(report['bytes'])}).")
    return EXIT_OK


def _tensors_of(result: Any) -> dict[str, Any]:
    """What ``returns="weights"`` would give of an in-process result: a module's state dict, or a
    mapping of names to tensors."""
    import torch

    tensors = result.state_dict() if isinstance(result, torch.nn.Module) else result
    if (not isinstance(tensors, Mapping) or not tensors
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())):
        raise CommandError(f"The entrypoint returned {with_article(type(result).__name__)}, which holds no "
                           "tensors to write; pass --returns object to write the object itself.", exit_code=EXIT_ERROR)
    return dict(tensors)
