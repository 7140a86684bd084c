"""The `overload` stage: goodput of a server flooded by clients that retry refused calls every few milliseconds.

A server in its own process, `batcher.max_queue_size` small (32), is measured three times on the same images:

1. unloaded: as many clients as the queue holds requests, sending back to back; nothing is refused, so this is
   what the server can do (the baseline of the stage, in the same run);
2. flood: `clients` (32) clients that retry every refused call after a fixed `retry_ms` (20 ms) with no backoff,
   the abusive client the server must survive; its goodput (images embedded per second) over the unloaded rate is
   the stage's ratio, target >= 0.8;
3. policy: the same clients with the published retry policy (`service.client.channel.RETRY_POLICY`), for comparison.

The server refuses a full queue before it reads a request (`service.api.interceptors.AdmissionInterceptor`), so a
refusal costs it a few microseconds whatever the request's size.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from bench.run import Stage

MAX_QUEUE_SIZE = 32
"""`batcher.max_queue_size` of the flooded server (the issue's setting)."""


@dataclass(slots=True)
class _Tally:
    """What the clients of one phase did."""

    images: int = 0
    calls: int = 0
    refused: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, images: int, latency: float) -> None:
        with self.lock:
            self.images += images
            self.calls += 1
            self.latencies.append(latency)

    def refuse(self) -> None:
        with self.lock:
            self.refused += 1


@contextlib.contextmanager
def served(cfg_file: Path | None, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`embedserve serve` on a free port with `env` added; yields its target once SERVING, and its process."""
    from service.client import EmbedClient

    cmd = [sys.executable, "-m", "service.cli.main", "serve", "--port", "0", "--metrics-port", "-1"]
    cmd += ["--log-level", "INFO"]
    if cfg_file is not None:
        cmd[3:3] = ["--config", str(cfg_file)]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **env}
    )
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 300
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError("the server exited before listening")
            match = re.search(r"listening on [^ ]+:(\d+)", line)
            port = int(match.group(1)) if match else None
        if port is None:
            raise RuntimeError("the server did not say where it listens within 300 s")
        stderr = proc.stderr
        threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
        target = f"127.0.0.1:{port}"
        with EmbedClient(target) as probe:
            probe.wait_until_serving(timeout=300)
        yield target, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _phase(
    target: str,
    requests: Sequence[list[tuple[str, bytes]]],
    *,
    clients: int,
    seconds: float,
    retry_s: float | None,
    policy: bool,
) -> tuple[_Tally, float]:
    """`clients` threads send `requests` round robin for `seconds`; a refused call is sent again after `retry_s`
    (None: never refused in this phase, or left to gRPC's retry policy when `policy`). Returns the tally and the
    wall time until the last call ended."""
    from service.client import EmbedClient, RemoteError

    tally = _Tally()
    stop_at = time.monotonic() + seconds

    def worker(index: int) -> None:
        with EmbedClient(target, retries=policy) as client:
            client.model_info()  # connected before the clock matters
            turn = index
            while time.monotonic() < stop_at:
                request = requests[turn % len(requests)]
                t0 = time.perf_counter()
                try:
                    results = client.embed(request, return_vectors=False, timeout=120)
                except RemoteError as e:
                    if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    tally.refuse()
                    if retry_s is not None:
                        time.sleep(retry_s)
                    continue
                tally.add(sum(1 for r in results if r.ok), time.perf_counter() - t0)
                turn += clients

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return tally, time.perf_counter() - start


def bench_overload(
    cfg_file: Path | None,
    paths: Sequence[Path],
    *,
    clients: int = 32,
    retry_ms: float = 20.0,
    request_size: int = 16,
    seconds: float = 30.0,
    measure: Callable[..., Any],
    percentiles: Callable[[Sequence[float]], tuple[float | None, float | None]],
) -> list[Stage]:
    """The three phases of the module docstring on one server; `measure` and `percentiles` are bench.run's."""
    from bench.run import Stage

    datas = [(p.name, p.read_bytes()) for p in paths]
    requests = [datas[i : i + request_size] for i in range(0, len(datas) - request_size + 1, request_size)]
    if not requests:
        raise ValueError(f"the overload stage needs at least {request_size} images, got {len(datas)}")
    request_bytes = int(sum(len(d) for r in requests for _, d in r) / len(requests))
    env = {"EMBEDSERVE_BATCHER_MAX_QUEUE_SIZE": str(MAX_QUEUE_SIZE)}
    unloaded_clients = max(1, MAX_QUEUE_SIZE // request_size)
    stages: list[Stage] = []
    with served(cfg_file, env) as (target, proc):
        _phase(target, requests, clients=unloaded_clients, seconds=min(seconds, 3.0), retry_s=None, policy=False)
        base = Stage(f"overload/unloaded ({unloaded_clients} clients)", "images/s", 0.0, images=0)
        with measure(base, extra_pids=lambda: [proc.pid]):
            tally, wall = _phase(
                target, requests, clients=unloaded_clients, seconds=seconds, retry_s=retry_ms / 1000, policy=False
            )
        base.value, base.images = tally.images / wall, tally.images
        base.p50_ms, base.p99_ms = percentiles(tally.latencies)
        base.details = {"refused_calls": tally.refused, "request_size": request_size, "request_bytes": request_bytes}
        stages.append(base)
        for name, policy, retry_s in (
            (f"overload/flood ({clients} clients, retry every {retry_ms:g} ms)", False, retry_ms / 1000),
            (f"overload/flood ({clients} clients, retry policy)", True, None),
        ):
            stage = Stage(name, "images/s", 0.0, base.value, "unloaded, same server")
            with measure(stage, extra_pids=lambda: [proc.pid]):
                tally, wall = _phase(target, requests, clients=clients, seconds=seconds, retry_s=retry_s, policy=policy)
            stage.value, stage.images = tally.images / wall, tally.images
            stage.p50_ms, stage.p99_ms = percentiles(tally.latencies)
            stage.details = {
                "answered_calls": tally.calls,
                "refused_calls": tally.refused,
                "refusals_per_second": round(tally.refused / wall, 1),
                "request_size": request_size,
                "request_bytes": request_bytes,
                "max_queue_size": MAX_QUEUE_SIZE,
                "target_ratio": 0.8,
            }
            stages.append(stage)
    return stages
