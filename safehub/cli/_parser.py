"""The ``safehub`` argument parser, assembled from each command group's ``register(subparsers)``.

The top level holds what every command shares: ``--version``, the global options, and the epilog
with examples, the environment variables and the exit codes (from :data:`._errors.EXIT_CODES`).
A new command group is a module with a ``register`` function, added to :data:`COMMAND_GROUPS`.
"""

from __future__ import annotations

import argparse
import textwrap

from .. import __version__
from . import cache, doctor, lock, models, run, trust
from ._errors import EXIT_CODES
from ._options import global_options

# In the order ``safehub --help`` lists their commands.
COMMAND_GROUPS = (models, run, trust, cache, doctor, lock)

_EXIT_TABLE = "\n".join(
    textwrap.fill(meaning, width=96, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
    for code, meaning in EXIT_CODES.items()
)

_MAIN_EPILOG = f"""\
examples:
  safehub list pytorch/vision                      entrypoints, read in the sandbox
  safehub help pytorch/vision:v0.16.0 resnet18     an entrypoint's docstring
  safehub load someone/repo net --output net.safetensors
                                                   weights of an untrusted repo, no trust needed
  safehub run someone/repo net --input x.safetensors --output y.safetensors
                                                   call the model in the sandbox on a file's tensors
  safehub lock someone/repo:v1.0 > safehub.lock    pin commit and archive sha256
  safehub --offline load someone/repo:v1.0 net --locked safehub.lock --output net.safetensors
  safehub doctor                                   what this machine offers

Repositories are owner/repo[:ref]; without a ref, the default branch. A repository's code runs
in a sandboxed worker. Trust (--trust, or `safehub trust add`) is needed only where its code would
run outside the sandbox: with --no-isolate, or `load --returns object`.

Options --debug, --json, --offline, --hub-dir and --quiet work before or after the sub-command.

environment:
  TORCH_HOME               the hub dir is $TORCH_HOME/hub (shared with torch.hub)
  SAFEHUB_OFFLINE=1        serve from the cache only (as --offline)
  SAFEHUB_WARM=1           fork the worker from a warm zygote (off for a command: one call each)
  SAFEHUB_GITHUB_URL       archive host (default https://github.com)
  SAFEHUB_GITHUB_API_URL   API host (default https://api.github.com)
  GITHUB_TOKEN             sent to the API host only: higher rate limit, private repositories

exit codes:
{_EXIT_TABLE}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safehub",
        description="Load PyTorch Hub models (hubconf.py repositories) with their code in a sandbox.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"safehub {__version__}")
    global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser
