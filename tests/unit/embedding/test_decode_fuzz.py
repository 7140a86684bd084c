"""Bounded mutation fuzzing of decode through every CPU backend (the harness is `fuzz_decode`; long runs:
`make fuzz SECONDS=1800`). One round with a fixed seed, so CI is deterministic, and one with a random seed,
printed on failure (`EMBEDSERVE_FUZZ_SEED=<seed>` replays it as the fixed round)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.unit.embedding.fuzz_decode import FIXED_SEED, Harness, make_harness, run_fuzz


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with ThreadPoolExecutor(2) as pool:
        yield make_harness(pool)


def test_decode_survives_mutations_with_the_fixed_seed(harness: Harness) -> None:
    seed = int(os.environ.get("EMBEDSERVE_FUZZ_SEED", FIXED_SEED))
    run_fuzz(harness, seed, examples=2000)
    assert harness.outcomes.get("invalid_image", 0) > 0  # the mutations do reach the error paths


def test_decode_survives_mutations_with_a_random_seed(harness: Harness) -> None:
    seed = random.SystemRandom().randrange(2**32)
    print(f"decode fuzz seed: {seed}")
    run_fuzz(harness, seed, examples=1000)
