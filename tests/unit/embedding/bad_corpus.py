"""The crafted bad-image corpus of `tests/data/bad/` and its manifest, for the tests that use it."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

BAD_DIR = Path(__file__).resolve().parents[2] / "data" / "bad"


@dataclass(frozen=True, slots=True)
class BadFile:
    """One corpus file and the reason its image must fail with."""

    name: str
    expected_reason: str

    @property
    def data(self) -> bytes:
        return (BAD_DIR / self.name).read_bytes()


def bad_files() -> list[BadFile]:
    with (BAD_DIR / "manifest.csv").open(encoding="utf-8", newline="") as handle:
        return [BadFile(row["file"], row["expected_reason"]) for row in csv.DictReader(handle)]
