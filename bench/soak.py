"""`embedserve bench soak --minutes N`: a real server under mixed traffic, its memory sampled every second.

A server subprocess (`embedserve serve`, its own data directory) is loaded with the 32 real OCT scans, then several
client threads send, until the time is up, a mix of: valid images, bad images (the crafted corpus of
`tests/data/bad/`, each with a valid one beside it), large images (`--large-pixels`, a 12-Mpixel photo-like JPEG by
default), stores (upserts over a bounded key space, so the index does not grow with time), neighbour queries (by key
and by image) and K-means over the collection. Each client first runs every kind once, then picks at random.

The server's resident set size is read from /proc every second. Two slopes over the last half of the run (the
first half is warm-up), both least squares in MB/min, are reported: of every sample (`slope_mb_per_min`), and of
the RSS floor, the lowest sample of each 15-second window (`floor_slope_mb_per_min`). A large image lifts the RSS
for a second or two and the trim brings it back, so single samples swing by a hundred MB and their slope over a
few minutes is noise of several MB/min either way; a leak lifts the floor. The verdict:
- the floor's slope must not exceed `--max-slope` (default 5 MB/min: a leak of 300 MB an hour fails);
- no call may fail with anything but the expected per-image errors and RESOURCE_EXHAUSTED (retried with backoff);
- every kind of traffic must have succeeded at least once, and the server must still be SERVING at the end.
It writes `soak.json` (the curve, the counts, the verdict) and `server.log` to `--out`; exit 0 when it passed, 1 when
it did not.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from service.client import ClusterClient, EmbedClient, RemoteError
from service.embedding.memory import rss_bytes
from service.types import ClusterParams, NeighborQuery

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
OCT_SAMPLE = REPO / "tests" / "data" / "oct-sample"
BAD_CORPUS = REPO / "tests" / "data" / "bad"
DEFAULT_MAX_SLOPE_MB_PER_MIN = 5.0
FLOOR_WINDOW_S = 15.0
"""The RSS floor is the lowest sample of each window this long."""
COLLECTION = "soak"
STORE_KEYS = 256
"""Stores upsert keys `store/0..255`: the index stays bounded, so its growth is not mistaken for a leak."""
ACTIONS: dict[str, int] = {"valid": 35, "bad": 15, "large": 5, "store": 20, "neighbors": 20, "cluster": 5}
"""Each kind of traffic and its weight in the random mix."""
CONFIG = """
data_dir = "{data_dir}"

[engine]
batch_size = 16

[batcher]
max_batch_size = 16
max_queue_size = 256

[server]
port = 0
metrics_port = -1
grace_seconds = 5.0

[backbone]
device = "{device}"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `embedserve bench soak`."""
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the traffic runs (default 10)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--out", default="var/soak", help="folder for soak.json and server.log (default var/soak)")
    parser.add_argument(
        "--max-slope",
        type=float,
        default=DEFAULT_MAX_SLOPE_MB_PER_MIN,
        help=f"most RSS growth over the last half, MB/min (default {DEFAULT_MAX_SLOPE_MB_PER_MIN})",
    )
    parser.add_argument(
        "--large-pixels", type=int, default=12_000_000, help="pixels of the large image (default 12000000)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="the server's device")
    parser.add_argument("--seed", type=int, default=0, help="seeds the traffic mix")


def slope_per_minute(seconds: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of `values` against `seconds`, per minute (0.0 with fewer than two distinct times)."""
    t = np.asarray(seconds, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if t.size < 2 or float(np.ptp(t)) == 0.0:
        return 0.0
    dt = t - t.mean()
    return float((dt * (v - v.mean())).sum() / (dt * dt).sum() * 60.0)


def floor_curve(samples: Sequence[Sequence[float]], window: float = FLOOR_WINDOW_S) -> list[tuple[float, float]]:
    """(time, value) of the lowest sample of each `window`-second window of (time, value, ...) samples; a last
    window whose samples span less than half of it is left out (one sample would stand for a whole window)."""
    lowest: dict[int, tuple[float, float]] = {}
    if not samples:
        return []
    start, end = samples[0][0], samples[-1][0]
    for sample in samples:
        t, value = sample[0], sample[1]
        slot = int((t - start) // window)
        if slot not in lowest or value < lowest[slot][1]:
            lowest[slot] = (t, value)
    last = int((end - start) // window)
    if last in lowest and end - (start + last * window) < window / 2:
        del lowest[last]
    return [lowest[slot] for slot in sorted(lowest)]


def large_jpeg(pixels: int, seed: int = 0) -> bytes:
    """A photo-like JPEG of about `pixels` pixels (4:3): smooth gradients with grain, so it is not tiny."""
    width = max(16, int(math.sqrt(pixels * 4 / 3)))
    height = max(16, pixels // width)
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    base = np.stack([(x + y) / 2, np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width))], axis=-1)
    grain = rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
    image = np.clip(base + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@dataclass
class Traffic:
    """What the clients send, loaded once."""

    valid: list[tuple[str, bytes]]
    bad: list[tuple[str, bytes]]
    large: bytes


@dataclass
class Tally:
    """Outcomes per kind of traffic, shared by the client threads."""

    counts: dict[str, Counter[str]] = field(default_factory=lambda: {a: Counter() for a in ACTIONS})
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, action: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[action][outcome] += 1
            if outcome == "unexpected" and len(self.unexpected) < 20:
                self.unexpected.append(f"{action}: {detail}")


class Server:
    """`embedserve serve` in a child process; its log goes to a file and is scanned for the port."""

    def __init__(self, config: Path, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cmd = [sys.executable, "-m", "service.cli.main", "--log-level", "INFO", "serve", "--config", str(config)]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.log_path = log_path
        self._lines: queue.Queue[str] = queue.Queue()
        self._pump = threading.Thread(target=self._copy_log, name="soak-server-log", daemon=True)
        self._pump.start()

    def _copy_log(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("w", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._lines.put(line)

    def wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.search(r"listening on [^ ]*:(\d+)", line)
            if match:
                return int(match.group(1))
        raise RuntimeError(f"the server did not start (see {self.log_path})")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump.join(10)
        return int(self.proc.returncode)


def load_traffic(large_pixels: int) -> Traffic:
    valid = [(p.relative_to(OCT_SAMPLE).as_posix(), p.read_bytes()) for p in sorted(OCT_SAMPLE.rglob("*.jpeg"))]
    bad = [(p.name, p.read_bytes()) for p in sorted(BAD_CORPUS.iterdir()) if p.suffix not in (".py", ".csv", ".md")]
    if not valid or not bad:
        raise RuntimeError(f"the soak needs the OCT sample in {OCT_SAMPLE} and the bad corpus in {BAD_CORPUS}")
    return Traffic(valid=valid, bad=bad, large=large_jpeg(large_pixels))


def _client_loop(
    target: str, traffic: Traffic, tally: Tally, stop: threading.Event, *, seed: int, on_done: Callable[[], None]
) -> None:
    rng = random.Random(seed)
    kinds, weights = list(ACTIONS), list(ACTIONS.values())
    with EmbedClient(target, timeout=120) as client, ClusterClient(target, timeout=300) as clusters:
        first_round = list(kinds)
        rng.shuffle(first_round)
        while not stop.is_set():
            action = first_round.pop() if first_round else rng.choices(kinds, weights)[0]
            try:
                outcome = _one(action, client, clusters, traffic, rng)
                tally.add(action, outcome)
            except RemoteError as e:
                if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    tally.add(action, "overloaded")
                    stop.wait(0.05 + rng.random() * 0.1)
                else:
                    tally.add(action, "unexpected", f"{e.code.name}: {e.details[:200]}")
            on_done()


def _one(action: str, client: EmbedClient, clusters: ClusterClient, traffic: Traffic, rng: random.Random) -> str:
    """Send one call of kind `action`; 'ok', or 'unexpected' when the reply is not what that traffic must get."""
    if action == "valid":
        picks = rng.sample(traffic.valid, rng.randint(1, 4))
        results = client.embed(picks)
        return "ok" if all(r.ok for r in results) else "unexpected"
    if action == "bad":
        name, data = rng.choice(traffic.bad)
        key, good = rng.choice(traffic.valid)
        results = client.embed([(name, data), (key, good)])
        return "ok" if results[1].ok else "unexpected"  # the bad one may fail (its own error) or decode
    if action == "large":
        results = client.embed([("large.jpg", traffic.large)], return_vectors=False)
        return "ok" if results[0].ok else "unexpected"
    if action == "store":
        picks = rng.sample(traffic.valid, 4)
        images = [(f"store/{rng.randrange(STORE_KEYS)}", data, {"label": key.split("/")[0]}) for key, data in picks]
        results = client.embed(images, store=True, collection=COLLECTION, return_vectors=False)
        return "ok" if all(r.ok for r in results) else "unexpected"
    if action == "neighbors":
        key, data = rng.choice(traffic.valid)
        answers = client.neighbors([NeighborQuery(key=key), NeighborQuery(image=data)], k=10, collection=COLLECTION)
        return "ok" if all(a.error is None and len(a.neighbors) == 10 for a in answers) else "unexpected"
    clustering = clusters.cluster(COLLECTION, ClusterParams(k=4, seed=rng.randrange(1000)))
    return "ok" if len(clustering.keys) >= len(traffic.valid) else "unexpected"


def run(args: argparse.Namespace) -> int:
    """Run the soak; 0 when it passed, 1 when it did not."""
    if args.minutes < 0 or args.clients < 1:
        raise SystemExit("embedserve bench soak: --minutes must be >= 0 and --clients >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    traffic = load_traffic(args.large_pixels)
    with tempfile.TemporaryDirectory(prefix="embedserve-soak-") as tmp:
        config = Path(tmp) / "soak.toml"
        config.write_text(CONFIG.format(data_dir=Path(tmp) / "data", device=args.device), encoding="utf-8")
        server = Server(config, out / "server.log")
        try:
            result = _soak(server, traffic, args)
        finally:
            exit_code = server.stop()
    result["server_exit_code"] = exit_code
    result["passed"] = bool(result["passed"]) and exit_code == 0
    (out / "soak.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    rss = result["rss_mb"]
    verdict = "PASSED" if result["passed"] else "FAILED: " + "; ".join(result["failures"])
    print(
        f"soak {args.minutes:g} min, {args.clients} clients, {result['calls']} calls: RSS start {rss['start']:.0f} MB, "
        f"peak {rss['peak']:.0f} MB, end {rss['end']:.0f} MB; last half: slope {result['slope_mb_per_min']:+.2f} "
        f"MB/min, floor slope {result['floor_slope_mb_per_min']:+.2f} MB/min (limit {args.max_slope:g}); {verdict}"
    )
    print(f"wrote {out / 'soak.json'}")
    return 0 if result["passed"] else 1


def _soak(server: Server, traffic: Traffic, args: argparse.Namespace) -> dict[str, Any]:
    port = server.wait_for_port(300)
    target = f"127.0.0.1:{port}"
    with EmbedClient(target, timeout=300) as client:
        client.wait_until_serving(600)
        seed = [(f"oct/{key}", data, {"label": key.split("/")[0]}) for key, data in traffic.valid]
        client.embed(seed, store=True, collection=COLLECTION, return_vectors=False)
        traffic.valid = [(f"oct/{key}", data) for key, data in traffic.valid]  # neighbours by key use the stored keys

    tally = Tally()
    stop = threading.Event()
    calls = [0]
    calls_lock = threading.Lock()

    def done() -> None:
        with calls_lock:
            calls[0] += 1

    samples: list[list[float]] = []
    start = time.monotonic()
    clients = [
        threading.Thread(
            target=_client_loop,
            args=(target, traffic, tally, stop),
            kwargs={"seed": args.seed * 1000 + i, "on_done": done},
            daemon=True,
        )
        for i in range(args.clients)
    ]
    for thread in clients:
        thread.start()
    duration = args.minutes * 60.0
    next_sample = start
    while True:
        now = time.monotonic()
        samples.append([round(now - start, 3), rss_bytes(server.proc.pid) / 2**20, float(calls[0])])
        if now - start >= duration or server.proc.poll() is not None:
            break
        next_sample += 1.0
        stop.wait(max(0.0, next_sample - time.monotonic()))
    stop.set()
    for thread in clients:
        thread.join(180)
    try:
        with EmbedClient(target, timeout=10) as client:
            health = client.health()
    except RemoteError as e:
        health = f"unreachable ({e.code.name})"
    return _verdict(samples, tally, health, args, stuck=sum(t.is_alive() for t in clients))


def _verdict(
    samples: list[list[float]], tally: Tally, health: str, args: argparse.Namespace, stuck: int
) -> dict[str, Any]:
    duration = samples[-1][0] if samples else 0.0
    last_half = [s for s in samples if s[0] >= duration / 2]
    slope = slope_per_minute([s[0] for s in last_half], [s[1] for s in last_half])
    floor = floor_curve(last_half)
    floor_slope = slope_per_minute([t for t, _ in floor], [v for _, v in floor])
    rss = [s[1] for s in samples] or [0.0]
    failures: list[str] = []
    if floor_slope > args.max_slope:
        failures.append(f"the RSS floor grows {floor_slope:.2f} MB/min over the last half (limit {args.max_slope:g})")
    unexpected = sum(c["unexpected"] for c in tally.counts.values())
    if unexpected:
        failures.append(f"{unexpected} unexpected replies (first: {tally.unexpected[0]})")
    missing = [a for a, c in tally.counts.items() if c["ok"] == 0]
    if missing:
        failures.append(f"no successful {', '.join(missing)} call")
    if health != "SERVING":
        failures.append(f"the server is {health} at the end")
    if stuck:
        failures.append(f"{stuck} client thread(s) still waiting on a call")
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "device": args.device,
        "large_pixels": args.large_pixels,
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX", ""),
        "calls": int(samples[-1][2]) if samples else 0,
        "counts": {a: dict(c) for a, c in tally.counts.items()},
        "unexpected": tally.unexpected,
        "rss_mb": {
            "start": rss[0],
            "peak": max(rss),
            "end": rss[-1],
            "last_half_mean": float(np.mean([s[1] for s in last_half])) if last_half else 0.0,
        },
        "slope_mb_per_min": slope,
        "floor_slope_mb_per_min": floor_slope,
        "floor_last_half": [[t, v] for t, v in floor],
        "max_slope_mb_per_min": args.max_slope,
        "health_at_end": health,
        "samples": samples,
        "samples_columns": ["seconds", "rss_mb", "calls_done"],
        "failures": failures,
        "passed": not failures,
    }
