"""A bounded sample of the fuzz harness (harness.py): every mutated input ends as pixels or a clear refusal."""

from __future__ import annotations

import harness
import pytest

# At most this long in the default suite; the long run (>= 20,000 cases) is documented in harness.py.
BUDGET_S = 40.0
CASES = 1500


@pytest.fixture(scope="module")
def sample() -> harness.Tally:
    return harness.run(CASES, seed=20261204, budget_s=BUDGET_S, max_seconds=10.0, max_rss_mb=2048.0)


def test_every_fuzzed_case_ends_as_pixels_or_a_pneumonet_error(sample: harness.Tally) -> None:
    assert not sample.failures, "\n".join(sample.failures[:10])
    assert sample.cases >= 2 * len(harness.make_seeds())  # each seed fuzzed, even on a loaded machine
    plain = {group for group in sample.outcomes if not group.startswith("multipart/")}
    assert plain == {"jpeg", "png", "tif", "bmp", "dcm", "bare-dicom"}
    totals = {outcome: sum(c[outcome] for c in sample.outcomes.values()) for outcome in ("pixels", "refused", "4xx")}
    assert all(totals.values()), totals  # the mutations neither all fail nor all pass through


def test_the_seeds_themselves_decode() -> None:
    for name, data in harness.make_seeds().items():
        assert harness.decode_case(data, name) == "pixels", name


def test_the_same_seed_gives_the_same_cases() -> None:
    first, second = (harness.run(40, seed=7, budget_s=60, max_seconds=10.0, max_rss_mb=2048.0) for _ in range(2))
    assert first.outcomes == second.outcomes and first.by_mutation == second.by_mutation
