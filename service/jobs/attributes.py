"""Attributes a directory job stores with each image: captured from its relative path, or read from a CSV file.

    rules = AttributeRules.build(attrs=["patient=^[A-Z]+/[A-Z]+-(\\d+)-"], csv_path=Path("meta.csv"))
    rules.for_key("CNV/CNV-6294785-1.jpeg")     # {"patient": "6294785", ...the CSV row's columns}

A pattern `NAME=REGEX` is searched in the key (the path relative to the directory, `/`-separated): the value is the
group called NAME if the pattern has one, else its first group, else the whole match; a key it does not match gets
no NAME. A CSV file has a header with a `key` column; every other non-empty cell of a key's row is an attribute
(a pattern's value wins over the CSV's for the same name).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import InvalidRequestError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
RESERVED = frozenset({"label", "path"})
"""Attributes the job sets itself (the parent folder and the file's path)."""


@dataclass(frozen=True, kw_only=True)
class AttributeRules:
    """How a job derives extra attributes from an image's key."""

    patterns: tuple[tuple[str, re.Pattern[str]], ...] = ()
    """(name, compiled regex) pairs, from `--attr NAME=REGEX`."""
    table: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """key -> {column: value}, from `--attributes CSV`."""

    @classmethod
    def build(cls, *, attrs: Sequence[str] = (), csv_path: Path | None = None) -> AttributeRules:
        """Parse `NAME=REGEX` specs and read the CSV; raises InvalidRequestError saying what to fix."""
        patterns = tuple(parse_attr(spec) for spec in attrs)
        names = [name for name, _ in patterns]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"--attr names must differ: {', '.join(names)}")
        return cls(patterns=patterns, table=read_attribute_csv(csv_path) if csv_path is not None else {})

    def __bool__(self) -> bool:
        return bool(self.patterns or self.table)

    def for_key(self, key: str) -> dict[str, str]:
        """The attributes of the image with this key (possibly none)."""
        values = dict(self.table.get(key, {}))
        for name, pattern in self.patterns:
            match = pattern.search(key)
            if match is None:
                continue
            if name in pattern.groupindex:
                value = match.group(name)
            elif pattern.groups:
                value = match.group(1)
            else:
                value = match.group(0)
            if value:
                values[name] = value
        return values


def _check_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidRequestError(f"{where}: attribute name {name!r}: a letter or _, then up to 63 of [A-Za-z0-9_.-]")
    if name in RESERVED:
        raise InvalidRequestError(f"{where}: {name!r} is set by the job itself (the parent folder, the file path)")


def parse_attr(spec: str) -> tuple[str, re.Pattern[str]]:
    """`NAME=REGEX` -> (NAME, compiled REGEX)."""
    name, sep, regex = spec.partition("=")
    if not sep or not regex:
        raise InvalidRequestError(f"--attr {spec!r}: write NAME=REGEX, e.g. patient='-(\\d+)-'")
    _check_name(name, f"--attr {spec!r}")
    try:
        return name, re.compile(regex)
    except re.error as e:
        raise InvalidRequestError(f"--attr {spec!r}: the regular expression does not compile ({e})") from e


def read_attribute_csv(path: Path) -> dict[str, dict[str, str]]:
    """key -> {column: value} from a CSV file with a header holding a `key` column (empty cells are skipped)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if "key" not in columns:
                raise InvalidRequestError(
                    f"--attributes {path}: the header needs a `key` column (the path relative to the directory)"
                )
            for column in columns:
                if column != "key":
                    _check_name(column, f"--attributes {path}")
            table: dict[str, dict[str, str]] = {}
            for row in reader:
                key = (row.get("key") or "").strip()
                if not key:
                    continue
                if key in table:
                    raise InvalidRequestError(f"--attributes {path}: key {key!r} appears twice")
                table[key] = {c: v for c, v in row.items() if c not in ("key", None) and v}
    except OSError as e:
        raise InvalidRequestError(f"--attributes {path}: cannot read it ({e.strerror or e})") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"--attributes {path}: not a UTF-8 CSV file ({e})") from e
    return table
