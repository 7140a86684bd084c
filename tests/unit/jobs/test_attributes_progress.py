"""Attributes from paths and CSV files for `embed --store`, and progress lines on a non-terminal stderr."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from service.errors import InvalidRequestError
from service.jobs.attributes import AttributeRules
from service.jobs.embed_dir import find_images
from service.jobs.progress import LineProgress, make_progress

KEYS = ["CNV/CNV-6294785-1.jpeg", "DME/DME-15307-3.jpeg", "NORMAL/NORMAL-12494-1.jpeg", "top.jpeg"]


def test_patterns_capture_from_the_relative_path() -> None:
    rules = AttributeRules.build(attrs=[r"patient=-(\d+)-", r"scan=(?P<scan>\d+)\.jpeg$", r"top=^top"])
    assert rules.for_key(KEYS[0]) == {"patient": "6294785", "scan": "1"}
    assert rules.for_key(KEYS[1]) == {"patient": "15307", "scan": "3"}
    assert rules.for_key("top.jpeg") == {"top": "top"}  # no group: the whole match


def test_csv_columns_by_key_and_patterns_win(tmp_path: Path) -> None:
    table = tmp_path / "meta.csv"
    table.write_text("key,patient,eye,site\nCNV/CNV-6294785-1.jpeg,P1,left,\nDME/DME-15307-3.jpeg,P2,right,b\n")
    rules = AttributeRules.build(attrs=[r"patient=-(\d+)-"], csv_path=table)
    assert rules.for_key(KEYS[0]) == {"patient": "6294785", "eye": "left"}  # empty cell skipped, pattern wins
    assert rules.for_key("NORMAL/x.jpeg") == {}
    only_csv = AttributeRules.build(csv_path=table)
    assert only_csv.for_key(KEYS[1]) == {"patient": "P2", "eye": "right", "site": "b"}


@pytest.mark.parametrize(
    ("attrs", "csv_text", "message"),
    [
        (["patient"], None, "NAME=REGEX"),
        (["patient=("], None, "does not compile"),
        (["label=x"], None, "set by the job"),
        (["a=x", "a=y"], None, "must differ"),
        ([], "name,patient\nx,1\n", "`key` column"),
        ([], "key,bad name\nx,1\n", "attribute name"),
        ([], "key,p\nx,1\nx,2\n", "appears twice"),
    ],
)
def test_bad_specs_say_how_to_fix(tmp_path: Path, attrs: list[str], csv_text: str | None, message: str) -> None:
    path = None
    if csv_text is not None:
        path = tmp_path / "a.csv"
        path.write_text(csv_text)
    with pytest.raises(InvalidRequestError, match=message):
        AttributeRules.build(attrs=attrs, csv_path=path)


def test_find_images_attaches_the_attributes(tmp_path: Path) -> None:
    for key in KEYS:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    items = find_images(tmp_path, attributes=AttributeRules.build(attrs=[r"patient=-(\d+)-"]))
    assert {i.key: i.attributes for i in items} == {
        KEYS[0]: {"patient": "6294785"},
        KEYS[1]: {"patient": "15307"},
        KEYS[2]: {"patient": "12494"},
        "top.jpeg": {},
    }


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_line_progress_writes_plain_lines_every_interval() -> None:
    out, clock = io.StringIO(), Clock()
    progress = LineProgress(100, every=10.0, stream=out, clock=clock)
    for _ in range(30):  # 30 images in 9 s: no line yet
        clock.now += 0.3
        progress.update(1)
    assert out.getvalue() == ""
    clock.now += 1.1
    progress.set_postfix(failed=2)
    progress.update(1)  # 31 images after 10.1 s
    assert out.getvalue() == "embedded 31/100 (31.0%), 2 failed, 3.1 images/s, ETA 22s\n"
    clock.now += 5.0
    progress.update(69)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[-1] == "embedded 100/100 (100.0%), 2 failed, 6.6 images/s"
    assert "\r" not in out.getvalue()


def test_make_progress_picks_lines_off_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(make_progress(5, enabled=True, stream=io.StringIO()), LineProgress)
    assert not isinstance(make_progress(5, enabled=True, stream=Tty()), LineProgress)
    quiet = io.StringIO()
    bar = make_progress(5, enabled=False, stream=quiet)
    bar.update(5)
    bar.close()
    assert quiet.getvalue() == ""
