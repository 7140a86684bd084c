"""Process memory: the resident set size, and handing freed heap memory back to the OS.

glibc keeps memory that Python, Pillow and torch free in its heaps (one arena per thread that ever allocated, up to
8 per core): after a burst of large images the process stays at its peak. `malloc_trim(0)` returns the free pages
of every arena; the batcher calls it once a burst is over (`batcher.trim_after_pixels`, rate-limited by
`batcher.trim_interval_s`). Setting `MALLOC_ARENA_MAX=2` in the server's environment bounds the arenas themselves
(fewer, more contended heaps; see the README's memory section). Other C libraries have no such call: there
`malloc_trim` is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform

logger = logging.getLogger(__name__)


@functools.cache
def _libc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname; find_library would fork ldconfig
        trim = libc.malloc_trim
    except (OSError, AttributeError) as e:
        logger.debug("malloc_trim is not available: %s", e)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def trim_available() -> bool:
    """True where `malloc_trim` can return memory (Linux with glibc)."""
    return _libc_trim() is not None


def malloc_trim() -> bool:
    """Return the free memory of every glibc heap to the OS; True when some was returned, False otherwise or
    where the C library has no `malloc_trim`."""
    trim = _libc_trim()
    return bool(trim(0)) if trim is not None else False


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of process `pid` (this one by default) in bytes, from /proc; 0 where /proc is missing
    or the process is gone."""
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return 0
