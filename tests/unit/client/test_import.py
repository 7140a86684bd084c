"""`import service.client` (and the wire conversions and shared records it stands on) must not load torch, PIL,
faiss, scikit-learn or Triton: a service that only calls the gRPC API does not install them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "PIL", "faiss", "sklearn", "triton")

_PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


def loaded_after_import(module: str) -> list[str]:
    """The heavy modules in `sys.modules` after importing `module` in a fresh interpreter."""
    code = _PROBE.format(module=module, heavy=list(HEAVY))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    loaded: list[str] = json.loads(out.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize(
    "module", ["service.client", "service.wire.convert", "service.types", "service.client.cluster"]
)
def test_import_leaves_heavy_packages_out(module: str) -> None:
    loaded = loaded_after_import(module)
    assert loaded == [], f"import {module} loaded {', '.join(loaded)}"


def test_the_probe_sees_a_heavy_import() -> None:
    # The check itself can fail: numpy is what service.types needs, and the probe reports it when asked to.
    code = _PROBE.format(module="service.types", heavy=["numpy"])
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "numpy" in json.loads(out.strip().splitlines()[-1])


def test_public_names() -> None:
    import service.client as client

    for name in ("EmbedClient", "AsyncEmbedClient", "ClusterClient", "RemoteEmbedder", "RemoteError"):
        assert hasattr(client, name), name
    assert set(client.__all__) <= set(dir(client))
