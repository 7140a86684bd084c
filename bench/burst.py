"""RSS before, during and after a burst of large images through the batcher and a real engine (no test, no timing).

    python -m bench.burst --images 8 --pixels 49000000            # one configuration, JSON on stdout
    python -m bench.burst --matrix --images 8 --pixels 49000000   # budget on/off x trim on/off x MALLOC_ARENA_MAX

One configuration: build the CPU engine, measure the idle RSS, send `--images` concurrent requests of one large
PNG each (smooth, so the file is small and the decoded image is not), sample the RSS every 50 ms, wait for the
batcher's trim after the burst (or, with `--no-trim`, for nothing), and report idle / peak / after RSS in MB.
`--matrix` runs each configuration in a fresh process (MALLOC_ARENA_MAX is read by glibc at process start).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image

from service.embedding.memory import rss_bytes


def smooth_png(pixels: int, seed: int) -> bytes:
    """A 4:3 RGB PNG of about `pixels` pixels whose content compresses well (gradients, a per-image offset)."""
    width = int((pixels * 4 / 3) ** 0.5)
    height = pixels // width
    x = (np.arange(width, dtype=np.uint32) * 255 // max(1, width - 1)).astype(np.uint8)
    y = (np.arange(height, dtype=np.uint32) * 255 // max(1, height - 1)).astype(np.uint8)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = x[None, :]
    image[..., 1] = y[:, None]
    image[..., 2] = (seed * 37) % 256
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def one(args: argparse.Namespace) -> dict[str, object]:
    from service.config import load_config
    from service.embedding.batcher import Batcher
    from service.embedding.engine import Engine

    overrides = {
        "backbone.device": "cpu",
        "decode.backend": "pillow",
        "decode.max_pixels": max(args.pixels + 1, 50_000_000),
        "batcher.max_batch_pixels": args.budget,
        "batcher.trim_after_pixels": 0 if args.no_trim else 50_000_000,
        "batcher.trim_interval_s": 0.0,
    }
    cfg = load_config(env={}, overrides=overrides)
    datas = [smooth_png(args.pixels, i) for i in range(args.images)]
    engine = Engine.from_config(cfg)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_bytes())

    async def burst() -> tuple[int, float, int]:
        batcher = Batcher(engine, cfg.batcher, decode_workers=cfg.engine.prefetch_batches)
        await batcher.start()
        try:
            await batcher.embed([smooth_png(10_000, 99)])  # warm the path with a small image
            await asyncio.sleep(0.5)
            idle = rss_bytes()
            start = time.monotonic()
            results = await asyncio.gather(*(batcher.embed([d]) for d in datas))
            elapsed = time.monotonic() - start
            assert all(r[0].ok for r in results), [r[0].error for r in results]
            await asyncio.sleep(3.0)  # the trim runs on a worker once the queue is empty
            return idle, elapsed, batcher.trims
        finally:
            await batcher.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    idle, elapsed, trims = asyncio.run(burst())
    after = rss_bytes()
    stop.set()
    engine.close()
    mb = 2**20
    return {
        "images": args.images,
        "pixels": args.pixels,
        "max_batch_pixels": args.budget,
        "trim": not args.no_trim,
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX", ""),
        "rss_idle_mb": round(idle / mb),
        "rss_peak_mb": round(max(peak[0], idle) / mb),
        "rss_after_mb": round(after / mb),
        "trims": trims,
        "burst_seconds": round(elapsed, 1),
    }


def matrix(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    for arena in ("", "2"):
        for budget in (0, 100_000_000):
            for trim in (False, True):
                env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
                env.pop("MALLOC_ARENA_MAX", None)
                if arena:
                    env["MALLOC_ARENA_MAX"] = arena
                cmd = [sys.executable, "-m", "bench.burst", "--images", str(args.images), "--pixels", str(args.pixels),
                       "--budget", str(budget)] + ([] if trim else ["--no-trim"])  # fmt: skip
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=900).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="concurrent requests, one large image each")
    parser.add_argument("--pixels", type=int, default=49_000_000, help="pixels of each image (default 49000000)")
    parser.add_argument("--budget", type=int, default=100_000_000, help="batcher.max_batch_pixels (0 = none)")
    parser.add_argument("--no-trim", action="store_true", help="batcher.trim_after_pixels = 0")
    parser.add_argument("--matrix", action="store_true", help="every configuration, each in a fresh process")
    args = parser.parse_args(argv)
    print(json.dumps(matrix(args) if args.matrix else one(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
