"""Sandbox(...) validation and the worker's environment allow-list."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from safehub._worker.protocol import WorkerSettings
from safehub._sandbox import (
    KNOWN_LAYERS,
    OPTIONAL_LAYERS,
    Sandbox,
    default_max_processes,
    default_max_scratch_size,
    worker_environ,
)
from safehub.errors import InvalidArgumentError

GIB = 1024**3


def test_defaults_and_settings_are_json():
    sandbox = Sandbox()
    assert sandbox.timeout == 300 and sandbox.memory_limit == 8 * 1024**3 and sandbox.network is False
    settings = sandbox.worker_settings("/repo", "/scratch")
    assert WorkerSettings.from_json(settings.to_json()) == settings
    assert settings.repo_dir == "/repo" and settings.timeout == 300.0 and settings.applied_by_parent == ("env_scrub",)


def test_worker_settings_refuse_what_they_do_not_declare():
    good = json.loads(Sandbox().worker_settings("/repo", "/scratch").to_json())
    for bad in ({**good, "extra": 1}, {**good, "network": "yes"}, {**good, "layers": [1]}, {**good, "memory_limit": 1.5},
                {k: v for k, v in good.items() if k != "repo_dir"}, [good]):
        with pytest.raises(ValueError):
            WorkerSettings.from_dict(bad)


def test_the_process_and_scratch_defaults_fit_the_machine():
    # 64 and two per CPU: torch's intra-op and inter-op pools, a thread per core each.
    assert default_max_processes(2) == 68 and default_max_processes(96) == 256
    assert Sandbox().max_processes == default_max_processes() >= 64 + 2 * os.cpu_count()
    # 4 GiB, or a quarter of the memory (the scratch tmpfs lives there), 256 MiB at least.
    assert default_max_scratch_size(64 * GIB) == 4 * GIB
    assert default_max_scratch_size(8 * GIB) == 2 * GIB
    assert default_max_scratch_size(512 * 1024**2) == 256 * 1024**2
    assert Sandbox().max_scratch_size == default_max_scratch_size()
    assert Sandbox(max_scratch_size=None).worker_settings("/r", "/s").max_scratch_size is None
    assert Sandbox(max_processes=8, max_scratch_size=64 << 20).worker_settings("/r", "/s").max_scratch_size == 64 << 20


def test_frozen_and_keyword_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Sandbox().timeout = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Sandbox(30)  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": float("inf")},
        {"timeout": float("nan")},
        {"timeout": "10"},
        {"timeout": True},
        {"memory_limit": 1024},
        {"memory_limit": 1.5e9},
        {"cpu_time": 0},
        {"max_processes": 0},
        {"max_open_files": 3},
        {"max_file_size": 0},
        {"max_scratch_size": 4096},
        {"max_scratch_size": 2.5e9},
        {"network": "no"},
        {"extra_read_paths": "/data"},
        {"extra_read_paths": ("relative/path",)},
        {"env": "HF_HOME"},
        {"env": ("NOT-A-NAME",)},
        {"env": ("GITHUB_TOKEN",)},
        {"require": ("landlocks",)},
    ],
)
def test_bad_values_are_value_errors(kwargs):
    with pytest.raises(InvalidArgumentError) as info:
        Sandbox(**kwargs)
    assert isinstance(info.value, ValueError)
    assert next(iter(kwargs)) in str(info.value)


def test_lists_become_tuples():
    sandbox = Sandbox(env=["HF_HOME"], extra_read_paths=["/data/../data"], require=["session"])
    assert sandbox.env == ("HF_HOME",) and sandbox.extra_read_paths == ("/data",) and sandbox.require == ("session",)


def test_layers_narrow_what_is_applied():
    assert Sandbox().wanted_layers() == KNOWN_LAYERS
    assert Sandbox(layers=("landlock",)).wanted_layers() == ("session", "env_scrub", "landlock")
    assert Sandbox(layers=["seccomp"]).worker_settings("/r", "/s").layers == ("session", "env_scrub", "seccomp")
    assert set(OPTIONAL_LAYERS) < set(KNOWN_LAYERS)
    for bad in (("session",), ("nope",), "landlock"):
        with pytest.raises(InvalidArgumentError):
            Sandbox(layers=bad)
    with pytest.raises(InvalidArgumentError, match="switches off"):
        Sandbox(require=("seccomp",), layers=("landlock",))
    Sandbox(require=("session", "landlock"), layers=("landlock",))


def test_environment_allow_list():
    parent = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TZ": "UTC",
        "OMP_NUM_THREADS": "2",
        "GITHUB_TOKEN": "ghp_secret",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_ACCESS_KEY_ID": "id",
        "HF_TOKEN": "hf_secret",
        "HOME": "/root",
        "LD_PRELOAD": "/evil.so",
        "PYTHONPATH": "/somewhere",
        "HTTPS_PROXY": "http://user:pw@proxy",
        "HF_HOME": "/cache/hf",
    }
    env = worker_environ(Sandbox(), "/scratch", parent)
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TZ": "UTC",
        "OMP_NUM_THREADS": "2",
        "HOME": "/scratch",
        "TMPDIR": "/scratch",
    }
    assert worker_environ(Sandbox(env=("HF_HOME",)), "/s", parent)["HF_HOME"] == "/cache/hf"


def test_a_worker_under_a_cpu_time_limit_does_not_look_before_it_sleeps():
    # The looks would spend a remote model's CPU budget between calls (README "Performance").
    from safehub._worker import protocol
    from safehub._worker.work import channel_spin

    assert protocol.SPIN_S > 0
    assert channel_spin(Sandbox().worker_settings("/r", "/s")) == protocol.SPIN_S
    assert channel_spin(Sandbox(cpu_time=30).worker_settings("/r", "/s")) == 0.0
