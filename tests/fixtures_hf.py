"""Pytest fixtures for the loopback Hugging Face Hub (loaded via ``pytest_plugins``).

- ``hf_hub_emulator`` (session): the running stand-in (``tests/hf_hub_emulator.py``).
- ``hf_hub`` (function): the same, emptied and with its log cleared, ``HF_ENDPOINT`` pointing at
  it and both its origins (endpoint and CDN) in ``SAFEHUB_ALLOW_HOSTS``, since they are loopback.
- ``hf_cache`` (function): the test's Hugging Face cache folder (``$HF_HOME/hub``).
- ``hf_in_process`` (function): this process's huggingface_hub pointed at the stand-in and the
  test's cache (it reads HF_ENDPOINT and HF_HUB_CACHE once, at import), for in-process controls.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hf_hub_emulator import HubEmulator

__all__ = ["hf_cache", "hf_hub", "hf_hub_emulator", "hf_in_process"]


@pytest.fixture(scope="session")
def hf_hub_emulator() -> Iterator[HubEmulator]:
    with HubEmulator() as hub:
        yield hub


@pytest.fixture
def hf_hub(hf_hub_emulator: HubEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEmulator]:
    hub = hf_hub_emulator
    hub.repos.clear()
    hub.blobs.clear()
    hub.token = None
    hub.forged.clear()
    hub.clear_log()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("SAFEHUB_ALLOW_HOSTS", ",".join(hub.hosts))
    yield hub
    hub.clear_log()


@pytest.fixture
def hf_cache(hub_dir: Path) -> Path:
    import os

    return Path(os.environ["HF_HOME"]) / "hub"


@pytest.fixture
def hf_in_process(hf_hub: HubEmulator, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> HubEmulator:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", hf_hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hf_hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    return hf_hub
