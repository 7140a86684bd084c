"""Progress of a directory job: a tqdm bar on a terminal, plain lines every few seconds anywhere else.

A bar redraws itself with carriage returns, which a log file or `2>&1 | cat` captures as one long line of frames;
when stderr is not a terminal the job writes `embedded 1200/84484 (1.4%), 0 failed, 310.5 images/s, ETA 4m27s`
every `every` seconds and once at the end instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

from tqdm import tqdm


class Progress(Protocol):
    """What the job calls on its progress display."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, *, failed: int, refresh: bool = ...) -> Any: ...

    def close(self) -> Any: ...


def make_progress(total: int, *, enabled: bool, every: float = 10.0, stream: TextIO | None = None) -> Progress:
    """A bar when `stream` (default stderr) is a terminal, else `LineProgress`; silent when not `enabled`."""
    out = stream if stream is not None else sys.stderr
    isatty = getattr(out, "isatty", None)
    if not enabled or (isatty is not None and isatty()):
        bar: Progress = tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.1, file=out)
        return bar
    return LineProgress(total, every=every, stream=out)


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


class LineProgress:
    """Writes one plain progress line every `every` seconds (checked on each update) and one at `close`."""

    def __init__(self, total: int, *, every: float, stream: TextIO, clock: Any = time.monotonic) -> None:
        if every <= 0:
            raise ValueError(f"progress every={every} must be positive (seconds between lines)")
        self.total = total
        self.every = every
        self.stream = stream
        self.clock = clock
        self.done = 0
        self.failed = 0
        self.start = clock()
        self.last_line = self.start
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last_line >= self.every:
            self._write(now)

    def set_postfix(self, *, failed: int, refresh: bool = False) -> None:
        self.failed = failed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.done:
                self._write(self.clock())

    def _write(self, now: float) -> None:
        self.last_line = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        share = f" ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        line = f"embedded {self.done}/{self.total}{share}, {self.failed} failed, {rate:.1f} images/s{eta}"
        print(line, file=self.stream, flush=True)
