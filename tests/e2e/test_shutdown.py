"""SIGTERM on a real `run_server` process under load: in-flight calls finish, new calls are refused, exit code 0."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from service.client import EmbedClient, RemoteError

REPO = Path(__file__).resolve().parents[2]
OCT_SAMPLE = REPO / "tests" / "data" / "oct-sample"

CONFIG = """
# The torch float32 reference runtime: slow enough on the CPU that the load is still in flight at SIGTERM.
[backbone]
runtime = "torch"
cpu_precision = "float32"

[engine]
batch_size = 4
prefetch_batches = 1

[decode]
workers = 2

[batcher]
max_batch_size = 4
max_queue_delay_ms = 5.0
max_queue_size = 64

[server]
port = 0
metrics_port = -1
grace_seconds = 60.0
"""

SERVE = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
    "from service.config import load_config\n"
    "from service.api.server import run_server\n"
    "sys.exit(run_server(load_config(sys.argv[1])))\n"
)


def _pump(stream, lines: queue.Queue[str]) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        lines.put(line)


def _wait_for(lines: queue.Queue[str], pattern: str, seen: list[str], timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"server never logged {pattern!r}; log so far:\n{''.join(seen)}")


@pytest.mark.slow
def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "embedserve.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n' + CONFIG)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    env = {k: v for k, v in env.items() if not k.startswith("EMBEDSERVE_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(config)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=_pump, args=(proc.stderr, lines), daemon=True).start()
    try:
        port = int(_wait_for(lines, r"listening on [\d.]+:(\d+)", seen, timeout=60).group(1))
        target = f"127.0.0.1:{port}"
        images = [(p.name, p.read_bytes()) for p in sorted(OCT_SAMPLE.rglob("*.jpeg"))[:24]]
        with EmbedClient(target) as client:
            client.wait_until_serving(timeout=120)
            with ThreadPoolExecutor(max_workers=6) as pool:
                in_flight = [pool.submit(client.embed, images[i : i + 4], timeout=60) for i in range(0, 24, 4)]
                time.sleep(0.3)  # every call has reached the server; the model works through 24 images
                assert not all(f.done() for f in in_flight), "the load finished before SIGTERM; nothing was tested"
                proc.send_signal(signal.SIGTERM)
                _wait_for(lines, r"stopping: finishing in-flight", seen, timeout=10)
                with EmbedClient(target, timeout=5) as late, pytest.raises(RemoteError) as refused:
                    late.embed(images[:1])
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                results = [f.result(timeout=60) for f in in_flight]
        assert all(r.ok and r.vector is not None for batch in results for r in batch)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
