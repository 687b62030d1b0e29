"""An isolated ``pretrained=True`` load: the checkpoint fetched by the parent, against torch.hub.

Run by hand (not in CI)::

    .venv/bin/python benchmarks/bench_pretrained.py [--runs 3] [--gib 1]

One process. A loopback HTTP server (allowed through SAFEHUB_ALLOW_HOSTS, as a local mirror
would be) serves a ``--gib`` GiB float32 state dict; a local hubconf's entrypoint builds the model
and loads its weights with ``torch.hub.load_state_dict_from_url``, as torchvision does. Measured,
each the median of ``--runs`` runs:

- first load (the checkpoint downloaded into an empty hub dir): in-process ``torch.hub.load``
  against ``safehub.load(..., isolate=True, returns="weights")`` (warm worker);
- second load (the checkpoint in the cache, nothing downloaded): the same two;
- for scale, ``clone()`` of the model's bytes and a ``torch.load`` of the checkpoint file.

Ratios are safehub over torch.hub. The figures need about 4x ``--gib`` of memory.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import safehub  # noqa: E402
from _common import forgetting_modules  # noqa: E402 - this folder is on sys.path

HUBCONF = '''
    dependencies = ["torch"]
    import torch
    from torch import nn
    from torch.hub import load_state_dict_from_url


    def big(url, layers=16, width=4096):
        model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))
        model.load_state_dict(load_state_dict_from_url(url, progress=False, map_location="cpu"))
        return model
'''


def median_time(fn, runs: int, before=None) -> float:
    times = []
    for _ in range(runs):
        if before is not None:
            before()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="safehub-bench-pretrained-"))
    work.chmod(0o755)
    try:
        layers, width = 16, int((args.gib * 1024**3 / 16 / 4) ** 0.5)
        served = work / "served"
        served.mkdir()
        state = {f"{i}.weight": torch.full((width, width), float(i)) for i in range(layers)}
        torch.save(state, served / "big-weights.pth")
        del state
        size = (served / "big-weights.pth").stat().st_size
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
        handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        host, port = server.server_address[:2]
        url = f"http://{host}:{port}/big-weights.pth"
        os.environ["SAFEHUB_ALLOW_HOSTS"] = f"{host}:{port}"
        repo = work / "repo"
        repo.mkdir()
        (repo / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
        repo.chmod(0o755)
        home = work / "torch_home"

        def fresh_home() -> None:
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir()
            home.chmod(0o755)
            os.environ["TORCH_HOME"] = str(home)
            torch.hub._hub_dir = None

        def plain():
            with forgetting_modules():
                return torch.hub.load(str(repo), "big", source="local", url=url, layers=layers, width=width)

        def isolated():
            return safehub.load(str(repo), "big", source="local", url=url, layers=layers, width=width,
                                isolate=safehub.Sandbox(timeout=600, memory_limit=None), returns="weights")

        safehub.warmup()
        fresh_home()
        isolated()  # the first warm call pays for nothing else than itself afterwards
        rows = []
        first_plain = median_time(plain, args.runs, before=fresh_home)
        first_safe = median_time(isolated, args.runs, before=fresh_home)
        fresh_home()
        plain()
        second_plain = median_time(plain, args.runs)
        second_safe = median_time(isolated, args.runs)
        sample = torch.empty(size // 4, dtype=torch.float32)
        clone = median_time(lambda: sample.clone(), args.runs)
        load = median_time(lambda: torch.load(served / "big-weights.pth"), args.runs)
        rows.append(("first load (downloads)", first_plain, first_safe))
        rows.append(("second load (cached)", second_plain, second_safe))
        server.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"checkpoint: {size / 1024**3:.2f} GiB, {layers} tensors, served from {host} (loopback); median of {args.runs}")
    print(f"{'':28} {'torch.hub':>10} {'safehub isolated':>17} {'ratio':>7}")
    for label, base, ours in rows:
        print(f"{label:28} {base:9.2f}s {ours:16.2f}s {ours / base:6.2f}x")
    print(f"{'clone() of the bytes':28} {clone:9.2f}s")
    print(f"{'torch.load of the file':28} {load:9.2f}s")


if __name__ == "__main__":
    main()
