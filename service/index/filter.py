"""Attribute filters for searches: `label == DME`, `patient != 123 and label == CNV`, `a == x or b == y`.

Grammar (`and` binds tighter than `or`; no parentheses):

    filter     := conjunction ( ("or" | "||") conjunction )*
    conjunction:= comparison ( ("and" | "&&") comparison )*
    comparison := NAME ("==" | "!=") VALUE
    NAME       := letters, digits, `_`, `.`, `-` (not starting with a digit)
    VALUE      := 'single quoted' | "double quoted" | a bare word without spaces or quotes

Attributes are strings, compared exactly. An item without the attribute never equals a value, so `patient != 123`
keeps items with no `patient` attribute.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidIndexRequestError

MAX_FILTER_CHARS = 4096

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op>==|!=|&&|\|\|)
      | '(?P<squote>[^']*)'
      | "(?P<dquote>[^"]*)"
      | (?P<word>[^\s'"=!&|]+)
    )""",
    re.VERBOSE,
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True, slots=True)
class Comparison:
    """`name == value` (or `!=` when `negate`)."""

    name: str
    value: str
    negate: bool

    def matches(self, attributes: Mapping[str, str]) -> bool:
        return (attributes.get(self.name) == self.value) != self.negate


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed filter: an `or` of `and`s of comparisons."""

    text: str
    any_of: tuple[tuple[Comparison, ...], ...]

    def matches(self, attributes: Mapping[str, str]) -> bool:
        return any(all(c.matches(attributes) for c in conj) for conj in self.any_of)

    def mask(self, items: Sequence[Mapping[str, str]]) -> np.ndarray:
        """Boolean array: which of `items` match."""
        result = np.zeros(len(items), dtype=bool)
        for conj in self.any_of:
            part = np.ones(len(items), dtype=bool)
            for c in conj:
                hits = np.fromiter((a.get(c.name) == c.value for a in items), dtype=bool, count=len(items))
                part &= ~hits if c.negate else hits
            result |= part
        return result


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) tokens: kind is `op`, `value` (quoted) or `word`."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            at = len(text) - len(text[pos:].lstrip())
            raise InvalidIndexRequestError(
                f"cannot read the filter {text!r} at character {at} ({text[at]!r}); "
                "write e.g. `label == DME and patient != 123`"
            )
        if match.group("op") is not None:
            tokens.append(("op", match.group("op")))
        elif match.group("squote") is not None:
            tokens.append(("value", match.group("squote")))
        elif match.group("dquote") is not None:
            tokens.append(("value", match.group("dquote")))
        else:
            word = match.group("word")
            lowered = word.lower()
            tokens.append(("op", "&&" if lowered == "and" else "||") if lowered in ("and", "or") else ("word", word))
        pos = match.end()
    return tokens


def parse_filter(text: str) -> Filter | None:
    """Parse a filter expression; None for an empty one. Raises `InvalidIndexRequestError` with a hint."""
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidIndexRequestError(f"the filter has {len(text)} characters; at most {MAX_FILTER_CHARS}")
    tokens = _tokens(text)
    if not tokens:
        return None
    any_of: list[tuple[Comparison, ...]] = []
    current: list[Comparison] = []
    i = 0
    while True:
        if i + 3 > len(tokens):
            raise InvalidIndexRequestError(
                f"the filter {text!r} ends early; each condition is `name == value` or `name != value`"
            )
        (name_kind, name), (op_kind, op), (value_kind, value) = tokens[i : i + 3]
        if name_kind != "word" or not _NAME.match(name):
            raise InvalidIndexRequestError(f"{name!r} in the filter {text!r} is not an attribute name")
        if op_kind != "op" or op not in ("==", "!="):
            raise InvalidIndexRequestError(f"expected == or != after {name!r} in the filter {text!r}")
        if value_kind not in ("word", "value"):
            raise InvalidIndexRequestError(f"expected a value after `{name} {op}` in the filter {text!r}")
        current.append(Comparison(name=name, value=value, negate=op == "!="))
        i += 3
        if i == len(tokens):
            break
        joiner = tokens[i]
        if joiner not in (("op", "&&"), ("op", "||")):
            raise InvalidIndexRequestError(f"expected `and` or `or` before {joiner[1]!r} in the filter {text!r}")
        if joiner[1] == "||":
            any_of.append(tuple(current))
            current = []
        i += 1
    any_of.append(tuple(current))
    return Filter(text=text, any_of=tuple(any_of))
