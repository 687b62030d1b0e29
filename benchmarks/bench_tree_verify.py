"""What a locked load's tree check costs: cold (every file hashed) and warm (the per-file memo).

Run by hand on a real repository's zipball (not in CI; nothing of it is committed):

    git -C /path/to/fairseq archive --format=zip --prefix=fairseq/ HEAD > /tmp/fairseq.zip
    .venv/bin/python benchmarks/bench_tree_verify.py /tmp/fairseq.zip

It extracts the archive as safehub does, then times ``_tree.of_dir`` without a memo (what the
first locked load after an install or a change pays) and with a warm memo (every later one),
and ``_tree.of_zip`` (a digest from the archive alone, what an old lock file's re-check costs).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from safehub import _extract, _tree


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(zip_path: str, repeat: int = 5) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "x").mkdir()
        tree = _extract.extract_zip(zip_path, Path(tmp) / "x")
        files = sum(1 for p in tree.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
        memo = Path(tmp) / "memo.json"
        cold, manifest = timed(lambda: _tree.of_dir(tree), repeat)
        _tree.of_dir(tree, memo)
        warm, again = timed(lambda: _tree.of_dir(tree, memo), repeat)
        from_zip, zipped = timed(lambda: _tree.of_zip(zip_path), repeat)
        assert manifest.digest == again.digest == zipped.digest
        print(f"{zip_path}: {files} files, {size / 1e6:.1f} MB")
        print(f"  cold (every file hashed):   {cold * 1e3:8.1f} ms")
        print(f"  warm (per-file memo):       {warm * 1e3:8.1f} ms")
        print(f"  from the archive (of_zip):  {from_zip * 1e3:8.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1])
