"""The filter grammar: every operator, precedence, quoting, missing attributes, masks, and the error messages."""

from __future__ import annotations

import itertools

import pytest

from service.errors import InvalidIndexRequestError
from service.index.filter import MAX_FILTER_CHARS, parse_filter

ITEMS = [
    {"label": label, "patient": patient}
    for label, patient in itertools.product(["DME", "CNV", "has space"], ["123", "7"])
] + [{}, {"label": "DME"}, {"patient": "123"}, {"other.name-x": "v"}]


def test_filter_grammar() -> None:
    flt = parse_filter("label == DME and patient != '123' or label == \"CNV\"")
    assert flt is not None
    assert flt.matches({"label": "DME"}) and not flt.matches({"label": "DME", "patient": "123"})
    assert flt.matches({"label": "CNV", "patient": "123"}) and not flt.matches({})
    assert parse_filter("  ") is None
    for bad in ("label", "label = x", "label == x y", "== x", "label == x and"):
        with pytest.raises(InvalidIndexRequestError):
            parse_filter(bad)


CASES = {
    # text -> the same condition in Python (attributes are strings; a missing one equals no value)
    "label == DME": lambda a: a.get("label") == "DME",
    "label != DME": lambda a: a.get("label") != "DME",
    "label == DME and patient == 123": lambda a: a.get("label") == "DME" and a.get("patient") == "123",
    "label == DME && patient != 123": lambda a: a.get("label") == "DME" and a.get("patient") != "123",
    "label == DME or patient == 7": lambda a: a.get("label") == "DME" or a.get("patient") == "7",
    "label == CNV || label == DME": lambda a: a.get("label") in ("CNV", "DME"),
    "label == CNV AND patient == 7 Or label == DME": lambda a: (
        (a.get("label") == "CNV" and a.get("patient") == "7") or a.get("label") == "DME"
    ),
    # `and` binds tighter than `or`, on either side
    "label == DME or label == CNV and patient == 7": lambda a: (
        a.get("label") == "DME" or (a.get("label") == "CNV" and a.get("patient") == "7")
    ),
    "label == 'has space'": lambda a: a.get("label") == "has space",
    'label == "has space" and patient != "7"': lambda a: a.get("label") == "has space" and a.get("patient") != "7",
    "label == ''": lambda a: a.get("label") == "",
    "other.name-x == v": lambda a: a.get("other.name-x") == "v",
    "label==DME&&patient==123": lambda a: a.get("label") == "DME" and a.get("patient") == "123",
    "label == 'and'": lambda a: a.get("label") == "and",
}


@pytest.mark.parametrize("text", list(CASES))
def test_every_operator_against_python(text: str) -> None:
    flt = parse_filter(text)
    assert flt is not None and flt.text == text
    expected = [CASES[text](a) for a in ITEMS]
    assert [flt.matches(a) for a in ITEMS] == expected
    assert flt.mask(ITEMS).tolist() == expected


def test_quotes_keep_what_they_hold() -> None:
    flt = parse_filter("""name == "it's" or name == 'say "hi"' or name == 'a == b and c'""")
    assert flt is not None
    assert [flt.matches({"name": v}) for v in ("it's", 'say "hi"', "a == b and c", "a")] == [True, True, True, False]
    exact = parse_filter("label == DME")
    assert exact is not None and not exact.matches({"label": "DME "})  # values compare exactly


def test_mask_of_no_items() -> None:
    flt = parse_filter("label == x")
    assert flt is not None and flt.mask([]).tolist() == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("label", "ends early; each condition is `name == value`"),
        ("== x", "ends early"),
        ("label == x and", "ends early"),
        ("label = x", "cannot read the filter 'label = x' at character 6 ('='); write e.g."),
        ("label == 'unclosed", 'at character 9 ("\'")'),
        ("label == x & y == z", "at character 11 ('&')"),
        ("1abc == x", "'1abc' in the filter '1abc == x' is not an attribute name"),
        ("== x == y", "'==' in the filter '== x == y' is not an attribute name"),
        ("'quoted' == x", "'quoted' in the filter"),
        ("label x y", "expected == or != after 'label'"),
        ("label != and", "expected a value after `label !=`"),
        ("label == x y == z", "expected `and` or `or` before 'y'"),
        ("a" * (MAX_FILTER_CHARS + 1), f"the filter has {MAX_FILTER_CHARS + 1} characters; at most {MAX_FILTER_CHARS}"),
    ],
)
def test_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidIndexRequestError) as error:
        parse_filter(text)
    assert message in str(error.value)
