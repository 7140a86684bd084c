"""Kernel tests run the Triton kernels themselves: through the interpreter on CPU, or compiled on a GPU.

`triton.jit` picks interpreter or compiler when it decorates a function, and triton decorates its own
library functions (`tl.zeros`, `tl.cdiv`, ...) when it is first imported. So TRITON_INTERPRET must be
in the environment before anything imports triton (torchvision does). This file sets it when it is
still unset and triton is not imported yet: 1 without CUDA (CI), 0 with CUDA (a lent GPU machine,
where the kernels run compiled on CUDA tensors). A run that imports triton earlier (tests/conftest.py
imports the service, which imports the kernels and torchvision) must set it first:
`TRITON_INTERPRET=1 pytest`, or the same lines at the top of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
REPO_ROOT = Path(__file__).resolve().parents[3]


def _interpreter_works() -> str | None:
    """Run a tiny kernel through the interpreter; return why it failed, or None."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # noqa: N803
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32) + tl.cdiv(n, 2), mask=offs < n)

    if type(_probe).__name__ != "InterpretedFunction":
        return "triton.jit does not decorate for the interpreter"
    out = torch.empty(3)
    try:
        _probe[(1,)](out, 3, BLOCK=4)
    except Exception as exc:  # any failure here means the interpreter cannot run the kernels
        return f"{type(exc).__name__}: {exc}"
    return None if out.tolist() == [2.0, 2.0, 2.0] else f"probe kernel wrote {out.tolist()}"


@pytest.fixture(scope="session")
def device() -> str:
    """Where the kernels run: 'cpu' through the Triton interpreter, or 'cuda' compiled."""
    if INTERPRET:
        problem = _interpreter_works()
        if problem is not None:
            pytest.fail(
                f"the Triton interpreter cannot run ({problem}); triton was probably imported before "
                "TRITON_INTERPRET=1 was set: run `TRITON_INTERPRET=1 pytest` or set it at the top of tests/conftest.py"
            )
        return "cpu"
    if not torch.cuda.is_available():
        pytest.fail(
            "TRITON_INTERPRET is not 1 and there is no CUDA device: the kernels cannot run; set TRITON_INTERPRET=1"
        )
    return "cuda"


@pytest.fixture(scope="session")
def gpu_compile_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Compile every kernel for an sm_90 target in a fresh process (no GPU needed); name -> 'ok' or the error.

    The interpreter does not type-check kernels the way the compiler does, so this catches code that
    interprets on CPU but would not compile for a GPU.
    """
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO_ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    script = Path(__file__).with_name("gpu_compile_check.py")
    out = tmp_path_factory.mktemp("gpu_compile") / "report.json"
    cmd = [sys.executable, str(script), str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.fail(f"the compile check crashed:\n{proc.stderr[-4000:]}")
    report: dict[str, str] = json.loads(out.read_text())
    return report
