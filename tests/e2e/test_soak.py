"""`embedserve bench soak --minutes 0.5`: a real server subprocess under every kind of traffic, sampled each second.

Half a minute cannot judge the memory slope (the server is still warming up), so the slope limit is lifted here;
what is checked is that the soak runs end to end: every kind of traffic succeeded, nothing unexpected came back,
the curve was sampled every second, its slope is the least-squares slope, and the server stopped cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.soak import ACTIONS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_half_a_minute_soak(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
    cmd = [sys.executable, "-m", "service.cli.main", "bench", "soak", "--minutes", "0.5", "--clients", "3",
           "--large-pixels", "4000000", "--device", "cpu", "--max-slope", "1e9", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["passed"] and result["failures"] == [] and result["unexpected"] == []
    assert result["health_at_end"] == "SERVING" and result["server_exit_code"] == 0
    assert set(result["counts"]) == set(ACTIONS)
    assert all(counts.get("ok", 0) >= 1 for counts in result["counts"].values()), result["counts"]
    samples = np.array(result["samples"])
    assert 25 <= len(samples) <= 40
    assert 0.8 <= float(np.median(np.diff(samples[:, 0]))) <= 1.3  # one sample a second
    assert (samples[:, 1] > 100).all()  # the server's RSS in MB (a loaded model), not the soak's own
    last = samples[samples[:, 0] >= samples[-1, 0] / 2]
    assert result["slope_mb_per_min"] == pytest.approx(np.polyfit(last[:, 0], last[:, 1], 1)[0] * 60, rel=1e-6)
    assert (tmp_path / "server.log").read_text().count("listening on") == 1
