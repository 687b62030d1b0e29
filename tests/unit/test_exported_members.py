"""The public namespace is exactly ``__all__``, sorted, and covers torch.hub's functions."""

from __future__ import annotations

import safehub

TORCH_HUB_API = ("download_url_to_file", "get_dir", "help", "list", "load", "load_state_dict_from_url", "set_dir")


def test_all_is_sorted_and_complete():
    public = {name for name in vars(safehub) if not name.startswith("_")}
    # Submodules imported by the package are attributes too; they are not part of the API.
    modules = {name for name in public if type(getattr(safehub, name)).__name__ == "module"}
    assert sorted(safehub.__all__) == list(safehub.__all__)
    assert set(safehub.__all__) == public - modules


def test_torch_hub_functions_are_there():
    assert set(TORCH_HUB_API) <= set(safehub.__all__)
