"""``safehub doctor``: what this machine and setup offer, for a bug report or a first run.

The sandbox layers an isolated call gets here, the hub dir, the trusted list, the GitHub
endpoints, offline mode, the workers' start and the versions. It never prints a secret: whether
GITHUB_TOKEN is set, never its value, and mirror URLs with their credentials masked.
"""

from __future__ import annotations

import argparse
import os
import platform
import urllib.parse
from importlib import metadata
from typing import Any

from .. import __version__, _cache, _trust, constants
from .._run import memory_cgroup
from .._sandbox import sandbox_report
from ._errors import EXIT_OK
from ._options import add_command
from ._output import print_json


def register(subparsers: Any) -> None:
    add_command(subparsers, "doctor", func=cmd_doctor, help="show what this machine and setup offer",
                    description="Report the sandbox layers available here, the hub dir, the trusted list, the\n"
                                "GitHub endpoints, offline mode, whether GITHUB_TOKEN is set (never its value),\n"
                                "and the Python and torch versions.",
                    epilog="examples:\n  safehub doctor\n  safehub doctor --json")


def _version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _redact_url(url: str) -> str:
    # A mirror URL may carry credentials (https://user:token@host): never print them.
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def _report() -> dict[str, Any]:
    hub_dir = _cache.hub_path()
    existing = next((p for p in (hub_dir, *hub_dir.parents) if p.exists()), hub_dir)
    return {
        "safehub": __version__,
        "python": platform.python_version(),
        "torch": _version_of("torch"),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "hub_dir": str(hub_dir),
        "hub_dir_exists": hub_dir.is_dir(),
        "hub_dir_writable": os.access(existing, os.W_OK),
        "trusted_list": str(_trust.trusted_list_path()),
        "trusted_entries": len(_trust.read_trusted()),
        "github_url": _redact_url(constants.SAFEHUB_GITHUB_URL),
        "github_url_from_env": bool(os.environ.get("SAFEHUB_GITHUB_URL")),
        "github_api_url": _redact_url(constants.SAFEHUB_GITHUB_API_URL),
        "github_api_url_from_env": bool(os.environ.get("SAFEHUB_GITHUB_API_URL")),
        # Whether a token is set, never its value.
        "github_token_set": bool(constants.GITHUB_TOKEN),
        "offline": bool(constants.SAFEHUB_OFFLINE),
        "sandbox_layers": (layers := sandbox_report()),
        "user_namespaces": _user_namespaces(layers),
        "memory_bound": memory_cgroup.probe(),
        # The command itself starts cold (one call per run); this is what SAFEHUB_WARM says.
        "warm_workers": bool(constants.SAFEHUB_WARM),
    }


def _user_namespaces(layers: dict[str, Any]) -> dict[str, Any]:
    """What a machine that refuses unprivileged user namespaces means for the sandbox, and what to do."""
    namespaces = layers.get("namespaces", {})
    if not namespaces.get("restricted"):
        return {"restricted": False}
    still = [name for name, info in layers.items() if info.get("active")]
    if namespaces.get("active"):
        meaning = ("Unprivileged user namespaces are disabled or restricted here; as root the worker still gets "
                   "its net, ipc, pid and mount namespaces, so nothing is lost.")
    else:
        meaning = ("Unprivileged user namespaces are disabled or restricted here, so the worker gets no network, "
                   "ipc, pid or mount namespace: it shares the network stack, sees the machine's /proc and "
                   "processes, and its scratch folder is a plain folder rather than a sized tmpfs. "
                   "Landlock (files, TCP), seccomp (UDP and raw sockets, exec), rlimits and the scrubbed "
                   "environment still hold where listed active.")
    return {
        "restricted": True,
        "meaning": meaning,
        "still_active": still,
        "what_to_do": [
            "Ubuntu 23.10+ (GitHub-hosted runners: ubuntu-24.04): sudo sysctl -w "
            "kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile that allows userns "
            "for this Python",
            "user.max_user_namespaces is 0: sudo sysctl -w user.max_user_namespaces=15000",
            "Docker: its default seccomp profile refuses unshare; run with --security-opt seccomp=unconfined "
            "or a profile that allows it",
            *(() if os.geteuid() == 0 else
              ("or run as root (namespaces without a user namespace, and a drop to uid 65534)",)),
            "to fail instead of running with fewer layers: Sandbox(require=(\"namespaces\",))",
        ],
    }


def _as_text(report: dict[str, Any]) -> str:
    def source(key: str, variable: str) -> str:
        return f"(from {variable})" if report[f"{key}_from_env"] else "(default)"

    hub_state = "exists" if report["hub_dir_exists"] else "not created yet"
    entries = report["trusted_entries"]
    writable = "writable" if report["hub_dir_writable"] else "NOT writable"
    token = "set (sent to the API host only)" if report["github_token_set"] else "not set (60 API requests an hour)"
    lines = [
        f"safehub {report['safehub']}  python {report['python']}  torch {report['torch'] or 'not installed'}",
        f"platform:      {report['platform']}",
        f"hub dir:       {report['hub_dir']} ({hub_state}, {writable})",
        f"trusted list:  {report['trusted_list']} ({entries} {'entry' if entries == 1 else 'entries'})",
        f"GitHub:        {report['github_url']} {source('github_url', 'SAFEHUB_GITHUB_URL')}",
        f"GitHub API:    {report['github_api_url']} {source('github_api_url', 'SAFEHUB_GITHUB_API_URL')}",
        f"GITHUB_TOKEN:  {token}",
        f"offline:       {'yes (SAFEHUB_OFFLINE): cache only' if report['offline'] else 'no'}",
        "workers:       " + ("warm: forked by a zygote (SAFEHUB_WARM=1)" if report["warm_workers"]
                             else "cold: a fresh interpreter per call (the command's default; SAFEHUB_WARM=1 for warm)"),
    ]
    bound = report["memory_bound"]
    lines.append(f"memory bound:  {bound['kind']}: {bound['detail']}")
    layers = report["sandbox_layers"]
    lines.append("sandbox layers (isolate=True on this machine):")
    width = max((len(name) for name in layers), default=0)
    for name, info in layers.items():
        mark = "active " if info["active"] else "MISSING" if not info["available"] else "off    "
        lines.append(f"  {name.ljust(width)}  {mark}  {info['detail']}")
    userns = report["user_namespaces"]
    if userns.get("restricted"):
        lines.append("user namespaces: " + userns["meaning"])
        lines.append("  still active: " + (", ".join(userns["still_active"]) or "none"))
        lines.append("  what you can do:")
        lines.extend(f"  - {way}" for way in userns["what_to_do"])
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    report = _report()
    if args.json:
        print_json(report)
    else:
        print(_as_text(report))
    return EXIT_OK
