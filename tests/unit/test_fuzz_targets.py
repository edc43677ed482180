"""Every fuzz target (tests/fuzz/targets.py) on generated inputs, in the default run:
only the parser's own rejection may come out. The coverage-guided runs of the
same targets are ``python -m tests.fuzz`` (README, Tests)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import SEEDS, TARGETS


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_rejects_only_with_its_own_errors(name):
    target = TARGETS[name]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.binary(max_size=512))
    def check(data):
        target(data)

    check()


def test_every_target_has_seeds_that_it_accepts():
    assert set(SEEDS) == set(TARGETS)
    for name, seeds in SEEDS.items():
        for seed in seeds:
            TARGETS[name](seed)


def test_each_target_survives_its_corner_cases():
    corners = [
        b"",
        b"\x00",
        b"\xff" * 64,
        b"\n" * 200,
        b"{}",
        b"[]",
        b"null",
        b'{"a":',
        b"\x80" * 11,
    ]
    for target in TARGETS.values():
        for data in corners:
            target(data)
