"""Every attack of ``tests/security/attacks.py`` against a real isolated worker, started cold (a
fresh interpreter) and warm (forked by the zygote), in two sandbox configurations: every layer this machine offers, and the same without namespaces (Landlock,
seccomp, rlimits and, as root, the uid drop), which must still block everything.

Each test first asserts that the attack ran (its ``ATTACK-RAN`` marker reached the caller), then
that its canary is untouched. A case the machine cannot stage (no DNS resolver to speak of) is
skipped with the reason. ``benchmarks/attack_matrix.py`` runs the same cases under each layer
alone and under none, which shows every attack is real.
"""

from __future__ import annotations

import ast
import collections

import pytest

from tests.security import attacks

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("config", list(attacks.CONFIGS))
@pytest.mark.parametrize("case", attacks.CASES, ids=[c.name for c in attacks.CASES])
def test_attack_is_blocked(case, config, tmp_path, hub_dir, worker_start):
    if gap := case.gap(attacks.CONFIGS[config]):
        pytest.skip(f"a documented gap: {gap}")
    verdict = attacks.run_case(case, attacks.CONFIGS[config], tmp_path / "attack", hub_dir=hub_dir, config_name=config)
    if not verdict.applicable:
        pytest.skip(verdict.detail)
    assert verdict.ran, f"the attack never ran, so it proves nothing: {verdict.describe()}"
    assert verdict.blocked, (
        f"{case.name} ({case.category}) got through under {config!r}; meant to be stopped by "
        f"{case.blocked_by}. {verdict.describe()}"
    )


def test_the_cases_cover_every_category():
    names = [c.name for c in attacks.CASES]
    assert len(names) == len(set(names)) >= 30
    per_category = collections.Counter(c.category for c in attacks.CASES)
    assert set(per_category) == {
        attacks.FILES, attacks.ENV, attacks.NET, attacks.WRITES,
        attacks.PARENT, attacks.LEFTOVERS, attacks.RESOURCES, attacks.TERMINAL, attacks.CHANNEL,
    }
    for c in attacks.CASES:
        ast.parse(c.hubconf(), filename=f"{c.name}/hubconf.py")  # a syntax error would look "blocked"
        assert c.mode in ("list", "load") and c.blocked_by
