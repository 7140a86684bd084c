"""`embedserve serve` as an operator starts it: a port in use is one clear line and exit 2, nothing else."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_naming_it_and_the_flag(tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "0"} | {flag: str(port)}
        argv = [sys.executable, "-m", "service.cli.main", "serve", "--data-dir", str(tmp_path / "db")]
        for name, value in ports.items():
            argv += [name, value]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and f"choose another with {flag} " in lines[0]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
