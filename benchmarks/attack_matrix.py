"""Which attacks each sandbox configuration blocks: every case of tests/security/attacks.py, run
under all layers, each layer alone, and none, as a table. Run by hand, not in CI::

    python benchmarks/attack_matrix.py                 # every configuration
    python benchmarks/attack_matrix.py --config none -v
    python benchmarks/attack_matrix.py --case tcp_loopback --case cpu

"none" still has what is always on (the environment allow-list, the worker's session and tree
kill, the timeout, the output cap and the parent's strict decoding), so the cases those stop are
blocked there too; every other case should get through, which shows the attack is real. Exit
status: 0 when "all layers" blocked everything that ran, else 1.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.security import attacks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", action="append", choices=list(attacks.MATRIX_CONFIGS), help="only these configurations"
    )
    parser.add_argument("--case", action="append", help="only these cases (by name)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case's outcome")
    opts = parser.parse_args(argv)
    configs = opts.config or list(attacks.MATRIX_CONFIGS)
    cases = [attacks.by_name(name) for name in opts.case] if opts.case else attacks.CASES

    rows = []
    for config in configs:
        rows.append(run_config(config, cases, opts.verbose))
    print()
    print(f"{'configuration':<17} {'blocked':>9}  {'s':>5}  got through (not run / n/a)")
    for config, verdicts, seconds in rows:
        applicable = [v for v in verdicts if v.applicable]
        blocked = [v for v in applicable if v.ran and v.blocked]
        through = [v.case.name for v in applicable if v.ran and not v.blocked]
        extra = [f"{v.case.name}: not run" for v in applicable if not v.ran]
        extra += [f"{v.case.name}: n/a" for v in verdicts if not v.applicable]
        listed = ", ".join(through) or "-"
        if extra:
            listed += f"  ({'; '.join(extra)})"
        print(f"{config:<17} {len(blocked):>4}/{len(applicable):<4}  {seconds:5.1f}  {listed}")
    all_layers = next((v for c, v, _ in rows if c == "all layers"), None)
    if all_layers is None:
        return 0
    return 0 if all(v.blocked and v.ran for v in all_layers if v.applicable) else 1


def run_config(config: str, cases: list[attacks.Case], verbose: bool) -> tuple[str, list[attacks.Verdict], float]:
    verdicts = []
    start = time.monotonic()
    for case in cases:
        workdir = Path(tempfile.mkdtemp(prefix="safehub-attack-"))
        try:
            verdict = attacks.run_case(case, attacks.MATRIX_CONFIGS[config], workdir / "run", config_name=config)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        verdicts.append(verdict)
        if verbose:
            state = "n/a" if not verdict.applicable else "NOT RUN" if not verdict.ran else "blocked" if verdict.blocked else "THROUGH"
            seconds = f"{verdict.run.elapsed:5.2f}s" if verdict.run else "     "
            print(f"[{config}] {case.name:<32} {state:<8} {seconds} {verdict.describe()[:300]}", flush=True)
        else:
            print(".", end="", flush=True)
    if not verbose:
        print(f" {config}", flush=True)
    return config, verdicts, time.monotonic() - start


if __name__ == "__main__":
    sys.exit(main())
