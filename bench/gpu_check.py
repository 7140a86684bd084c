"""The GPU check: one command, one process, at most 8 minutes on one H100/H200, no network.

    embedserve bench gpu --out var/gpu-check          # or: make gpu-check
    embedserve bench gpu --dry-run --out /tmp/check   # on the CPU: the check's own plumbing, tiny sizes

Sections, in order (each one's result is written to `OUT/results.json`, and its lines to `OUT/gpu_check.log`, as
soon as it ends, so a timeout still leaves everything before it):

1. `versions`: torch, CUDA, torchvision, triton, DALI / faiss / cuML (present or not), the device and its memory.
2. `kernel_tests`: the kernel tests of `tests/unit/kernels` with the Triton kernels compiled (TRITON_INTERPRET=0).
3. `kernel_timing`: `bench.kernels` at production sizes, kernel vs torch reference, timed with CUDA events after
   warm-up.
4. `vision_9606`: the pytorch/vision#9606 replay: freed tensors still read by queued kernels, then a GPU JPEG
   decode; corrupted reductions counted for raw `torchvision.io.decode_jpeg` and for `TorchvisionDecoder`.
5. `engine_decode`: the engine on the OCT sample with the torchvision GPU decoder vs the CPU path (cosine >= 0.99),
   and images/s; the preprocess kernel's warm-up launches; `embed_iter` (prepare threads on their own CUDA streams,
   overlapping the forward pass) against one-by-one `embed` on the same engine (cosine >= 0.9999), and the streams
   that made.
6. `backbone_amp`: EfficientNet-Lite0 fp32 vs AMP fp16 / bf16 at batch 64 and 256: cosine and images/s.
7. `cluster`: torch k-means++ seeding time at 84,484 x 1280, k = 1000, and torch DBSCAN peak memory vs its budget.
8. `bench_vectors`: `bench run`'s GPU stages at 20,000 x 1280: the preprocess stage after its warm-up, the kNN graph
   on the torch top-k (and faiss-gpu), K-means k = 4 / 100 / 1000 and DBSCAN on torch (and cuML), with the variants
   that cannot run listed and why.
9. `faiss_gpu`, `dali`: when those packages are present (carried wheels), k > 2048 routed off faiss-gpu and two
   threads on the DALI decoder.

Packages the lent machine lacks travel as wheels in `wheels/` (repository root, or `--wheels DIR`): they are
installed with `pip install --no-index --no-deps --target` into a folder put on `sys.path` before anything else.
A section that fails records its error and the check goes on; a section not started before the time budget
runs out is recorded as skipped.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("embedserve.gpu_check")

SECTIONS = (
    "versions",
    "kernel_tests",
    "kernel_timing",
    "vision_9606",
    "engine_decode",
    "backbone_amp",
    "cluster",
    "bench_vectors",
    "faiss_gpu",
    "dali",
)
BUDGET_S = 480.0
REPO = Path(__file__).resolve().parent.parent
OCT_SAMPLE = REPO / "tests" / "data" / "oct-sample"


class Check:
    """Runs the sections in order, writing results.json and the log after each."""

    def __init__(self, out: Path, *, dry_run: bool, budget_s: float) -> None:
        self.out = out
        self.dry_run = dry_run
        self.budget_s = budget_s
        self.started = time.monotonic()
        self.results: dict[str, Any] = {"dry_run": dry_run, "budget_s": budget_s, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "gpu_check.log", mode="w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        self._handler = handler

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cpu" if self.dry_run else "cuda")

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def run(self, name: str, fn: Callable[[Check], dict[str, Any]]) -> None:
        entry: dict[str, Any]
        if self.left_s() <= 0:
            entry = {"status": "skipped", "reason": f"the {self.budget_s:.0f} s budget ran out before it started"}
        else:
            logger.info("section %s: start (%.0f s left)", name, self.left_s())
            t0 = time.monotonic()
            try:
                entry = {"status": "ok", **fn(self)}
            except SkipSection as e:
                entry = {"status": "skipped", "reason": str(e)}
            except Exception as e:
                logger.exception("section %s failed", name)
                entry = {
                    "status": "error",
                    "error": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc()[-4000:],
                }
            entry["seconds"] = round(time.monotonic() - t0, 3)
        logger.info("section %s: %s %s", name, entry["status"], entry.get("reason") or entry.get("error") or "")
        self.results["sections"][name] = entry
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 3)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, self.out / "results.json")
        self._handler.flush()


class SkipSection(Exception):  # noqa: N818  (a control-flow signal, not an error)
    """The section cannot run here; the reason is recorded."""


# -- helpers --------------------------------------------------------------------------------------------------------


def install_wheels(folder: Path) -> list[str]:
    """Install the wheels of `folder` (no index, no dependencies) into a target put first on sys.path."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return []
    target = Path(tempfile.gettempdir()) / "embedserve-gpu-check-site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*cmd, "--target", str(target), *map(str, wheels)], check=True, timeout=240)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    importlib.invalidate_caches()
    return [w.name for w in wheels]


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module.split(".", maxsplit=1)[0]) is None:
        return None
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        return f"import fails: {type(e).__name__}: {str(e)[:200]}"
    return str(getattr(mod, "__version__", "present"))


def timed_ms(fn: Callable[[], object], device: Any, *, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn`: CUDA events on a GPU (after warm-up), wall time on the CPU."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(max(1, reps)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _oct_jpegs(limit: int) -> list[bytes]:
    files = sorted(p for p in OCT_SAMPLE.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        raise SkipSection(f"no OCT sample JPEGs under {OCT_SAMPLE}")
    return [p.read_bytes() for p in files[:limit]]


def _need_cuda(check: Check) -> None:
    import torch

    if not check.dry_run and not torch.cuda.is_available():
        raise SkipSection("needs CUDA: torch sees no GPU")


# -- sections -------------------------------------------------------------------------------------------------------


def section_versions(check: Check) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "faiss": _version("faiss"),
        "cuml": _version("cuml"),
        "cupy": _version("cupy"),
    }
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        facts["faiss_num_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        facts |= {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_total_bytes": int(total),
            "memory_free_bytes": int(free),
            "device_count": torch.cuda.device_count(),
        }
    return facts


def section_kernel_tests(check: Check) -> dict[str, Any]:
    _need_cuda(check)
    import pytest

    os.environ.setdefault("TRITON_INTERPRET", "1" if check.dry_run else "0")
    report = check.out / "kernel_tests.xml"
    args = ["-q", "-p", "no:cacheprovider", f"--junitxml={report}", str(REPO / "tests" / "unit" / "kernels")]
    if check.dry_run:
        args.insert(0, "--collect-only")
    code = int(pytest.main(args))
    interpret = os.environ.get("TRITON_INTERPRET")
    if code != 0:
        raise RuntimeError(f"kernel tests exited {code} (TRITON_INTERPRET={interpret}); see {report.name}")
    return {"exit_code": code, "triton_interpret": interpret, "collect_only": check.dry_run}


def section_kernel_timing(check: Check) -> dict[str, Any]:
    _need_cuda(check)
    from bench import kernels as kernel_bench

    dev = check.device
    # The kernel bench's own timer syncs the host; here every row is timed with CUDA events after warm-up.
    original = kernel_bench._median_ms
    kernel_bench._median_ms = lambda fn, device, reps, warmup=1: timed_ms(fn, device, reps=reps, warmup=max(2, warmup))
    try:
        result = kernel_bench.run_kernel_bench(str(dev), quick=check.dry_run)
    finally:
        kernel_bench._median_ms = original
    return {"timer": "cuda events" if dev.type == "cuda" else "wall", **result}


def replay_9606(decode: Callable[[list[bytes]], list[Any]], jpegs: list[bytes], device: Any, rounds: int) -> int:
    """How many reductions read corrupted data when `decode` runs while they are still queued on the stream.

    Each round fills one tensor per image (the byte size of its decoded output) with a known value, queues a long
    spin then one sum per tensor, frees the tensors (their blocks go back to the caching allocator while the sums
    are still queued), decodes, and checks every sum.
    """
    import torch

    sizes = [int(t.numel()) for t in decode(jpegs)]  # warm-up, and the output sizes the allocator will reuse
    corrupted = 0
    for r in range(rounds):
        fills = [torch.full((n,), (i + r) % 200 + 1, dtype=torch.uint8, device=device) for i, n in enumerate(sizes)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda._sleep(20_000_000)  # keeps the sums below queued while the decoder runs
        sums = [t.sum(dtype=torch.int64) for t in fills]
        del fills
        decode(jpegs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        want = [((i + r) % 200 + 1) * n for i, n in enumerate(sizes)]
        corrupted += sum(int(s) != w for s, w in zip(sums, want, strict=True))
    return corrupted


def section_vision_9606(check: Check) -> dict[str, Any]:
    _need_cuda(check)
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import torchvision.io as tvio

    from service.config import DecodeConfig
    from service.embedding.decode import TorchvisionDecoder

    jpegs = _oct_jpegs(8 if check.dry_run else 64)
    dev = check.device
    rounds = 2 if check.dry_run else 30

    def raw(datas: list[bytes]) -> list[Any]:
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        if dev.type == "cpu":
            return [tvio.decode_jpeg(e) for e in encoded]
        return list(tvio.decode_jpeg(encoded, device=dev))

    with ThreadPoolExecutor(2) as pool:
        ours = TorchvisionDecoder(DecodeConfig(backend="torchvision"), dev, pool)
        fixed = replay_9606(ours._decode_batch, jpegs, dev, rounds)
    unfixed = replay_9606(raw, jpegs, dev, rounds)
    if fixed:
        raise RuntimeError(f"TorchvisionDecoder: {fixed} corrupted reductions in {rounds} rounds")
    return {"rounds": rounds, "images": len(jpegs), "corrupted_raw_torchvision": unfixed, "corrupted_ours": fixed}


def _engine(device: str, decode_backend: str, batch: int) -> Any:
    from service.config import load_config
    from service.embedding.engine import Engine

    overrides: dict[str, Any] = {
        "backbone.device": device,
        "decode.backend": decode_backend,
        "engine.batch_size": batch,
    }
    if device == "cpu":
        overrides |= {"backbone.runtime": "torch", "backbone.cpu_precision": "float32"}
    return Engine.from_config(load_config(env={}, overrides=overrides))


def section_engine_decode(check: Check) -> dict[str, Any]:
    _need_cuda(check)
    import numpy as np

    jpegs = _oct_jpegs(8 if check.dry_run else 10_000)
    reps = 1 if check.dry_run else max(1, 2048 // len(jpegs))
    data = jpegs * reps
    fast_backend = "pillow" if check.dry_run else "torchvision"
    out: dict[str, Any] = {"images": len(data), "decoder": fast_backend}
    vectors: dict[str, Any] = {}
    for label, device, backend in (("gpu", str(check.device), fast_backend), ("cpu", "cpu", "pillow")):
        engine = _engine(device, backend, 8 if check.dry_run else 256)
        try:
            engine.embed(data[: min(len(data), 64)])  # warm-up (kernels, autotune)
            batch = data if label == "gpu" else jpegs
            t0 = time.perf_counter()
            outcomes = engine.embed(batch)
            seconds = time.perf_counter() - t0
            if label == "gpu":
                out["preprocess_warmup_launches"] = engine.warm_preprocess()
                out |= _pipelined(engine, batch, outcomes)
        finally:
            engine.close()
        bad = [o.error.message for o in outcomes if o.error is not None]
        if bad:
            raise RuntimeError(f"{label}: {len(bad)} images failed, first: {bad[0]}")
        vectors[label] = np.stack([o.vector for o in outcomes[: len(jpegs)]])
        out[f"{label}_images_per_s"] = round(len(batch) / seconds, 1)
    cosine = (vectors["gpu"] * vectors["cpu"]).sum(axis=1)
    out |= {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean())}
    if cosine.min() < 0.99:
        raise RuntimeError(f"GPU vs CPU embeddings: min cosine {cosine.min():.4f} < 0.99")
    return out


class _Bytes:
    """An `embed_iter` item holding its bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def load(self) -> bytes:
        return self.data


def _pipelined(engine: Any, data: list[bytes], sequential: list[Any]) -> dict[str, Any]:
    """`embed_iter` (prepare threads ahead of the forward pass, each on its own stream) vs `embed` on `data`."""
    import numpy as np

    t0 = time.perf_counter()
    embedded = list(engine.embed_iter(_Bytes(d) for d in data))
    seconds = time.perf_counter() - t0
    bad = [e.outcome.error.message for e in embedded if e.outcome.error is not None]
    if bad:
        raise RuntimeError(f"embed_iter: {len(bad)} images failed, first: {bad[0]}")
    got = np.stack([e.outcome.vector for e in embedded])
    want = np.stack([o.vector for o in sequential])
    cosine = (got * want).sum(axis=1)
    if cosine.min() < 0.9999:
        raise RuntimeError(f"embed_iter vs embed on one engine: min cosine {cosine.min():.6f} < 0.9999 (stream race?)")
    return {
        "pipelined_images_per_s": round(len(data) / seconds, 1),
        "pipelined_cosine_min_vs_sequential": float(cosine.min()),
        "cuda_streams": engine._streams.created,
    }


def section_backbone_amp(check: Check) -> dict[str, Any]:
    _need_cuda(check)
    import torch

    from service.embedding.backbone import Backbone, create_backbone

    dev = check.device
    torch.backends.cudnn.allow_tf32 = False  # the fp32 reference is fp32, not TF32 convolutions
    module, spec = create_backbone("efficientnet_lite0")
    module = module.to(dev).eval()
    size = spec.input_size
    rows = []
    batches = (2,) if check.dry_run else (64, 256)
    dtypes = ("bfloat16",) if check.dry_run else ("float16", "bfloat16")
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=gen).to(dev)
        with torch.inference_mode():
            ref = torch.nn.functional.normalize(module(x).float(), dim=1)
            fp32_ms = timed_ms(functools.partial(module, x), dev, reps=2 if check.dry_run else 20)
        rows.append({"batch": batch, "dtype": "float32", "ms": fp32_ms, "images_per_s": batch / fp32_ms * 1e3})
        for dtype in dtypes:
            backbone = Backbone.create("efficientnet_lite0", device=str(dev), amp_dtype=dtype, cpu_precision=dtype)
            with torch.inference_mode():
                got = torch.nn.functional.normalize(backbone.forward(x).float(), dim=1)
                ms = timed_ms(functools.partial(backbone.forward, x), dev, reps=2 if check.dry_run else 20)
            cosine = (got * ref).sum(dim=1)
            rows.append(
                {
                    "batch": batch,
                    "dtype": dtype,
                    "precision": backbone.precision,
                    "ms": ms,
                    "images_per_s": batch / ms * 1e3,
                    "cosine_min_vs_fp32": float(cosine.min()),
                }
            )
    return {"rows": rows}


def section_cluster(check: Check) -> dict[str, Any]:
    _need_cuda(check)
    import numpy as np
    import torch

    from service.analysis import cluster as cl
    from service.analysis import torch_backend

    dev = check.device
    n, d, k = (2000, 64, 20) if check.dry_run else (84_484, 1280, 1000)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    centres = torch_backend._kmeans_pp(x, k, torch.Generator().manual_seed(1))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seed_s = time.perf_counter() - t0
    out: dict[str, Any] = {"kmeans_pp": {"n": n, "d": d, "k": k, "seconds": round(seed_s, 3)}}
    assert centres.shape == (k, d)
    dn = 2000 if check.dry_run else 40_000
    pts = np.random.default_rng(0).normal(size=(dn, 64 if check.dry_run else 256)).astype(np.float32)
    budget = 1 << (24 if check.dry_run else 30)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    labels = cl.dbscan_torch(pts, 9.0 if check.dry_run else 18.0, 5, device=str(dev), memory_bytes=budget)
    db = {"n": dn, "seconds": round(time.perf_counter() - t0, 3), "budget_bytes": budget}
    db["clusters"] = int(labels.max() + 1) if labels.size else 0
    if dev.type == "cuda":
        db["peak_bytes_above_data"] = int(torch.cuda.max_memory_allocated(dev) - base)
    out["dbscan"] = db
    return out


def section_bench_vectors(check: Check) -> dict[str, Any]:
    _need_cuda(check)
    import dataclasses

    import numpy as np

    from bench import vectors as bv
    from bench.run import bench_preprocess

    dev = check.device
    n, d, limit = (400, 32, 400) if check.dry_run else (20_000, 1280, 10_000)
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    plans = [[v for v in plan if v.device == "cuda"] for plan in (bv.knn_plan(dev, n), bv.cluster_plan(dev, n))]
    if check.dry_run:  # the torch variants' code on CPU tensors; the rest stays skipped
        on_cpu = functools.partial(dataclasses.replace, device="cpu", skip="")
        plans = [[on_cpu(v) if v.backend == "torch" else v for v in p] for p in plans]
    knn_plan, cluster_plan = plans
    preprocess = bench_preprocess(_oct_jpegs(8 if check.dry_run else 32) * (1 if check.dry_run else 8), dev, 64)
    stages = [preprocess, *bv.bench_knn(x, knn_plan, baseline=False)]
    stages += bv.bench_clustering(x, limit, cluster_plan, baseline=False)
    rows = [
        {"stage": s.name, "value": round(s.value, 4), "unit": s.unit, "peak_gpu_bytes": s.peak_gpu_bytes, **s.details}
        for s in stages
    ]
    return {"n": n, "d": d, "stages": rows, "skipped": bv.skipped(knn_plan) + bv.skipped(cluster_plan)}


def section_faiss_gpu(check: Check) -> dict[str, Any]:
    if importlib.util.find_spec("faiss") is None:
        raise SkipSection("faiss is not installed (carry faiss-gpu wheels in wheels/)")
    import faiss
    import numpy as np

    from service.index.backends import GPU_MAX_SELECTION_K, FaissGpuExact

    if check.dry_run or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise SkipSection("needs a faiss build with GPU support and a GPU")
    rng = np.random.default_rng(0)
    db = rng.normal(size=(84_484, 1280)).astype(np.float32)
    q = rng.normal(size=(64, 1280)).astype(np.float32)
    searcher = FaissGpuExact(0)
    out: dict[str, Any] = {}
    for k in (10, GPU_MAX_SELECTION_K, GPU_MAX_SELECTION_K + 952):
        searcher.search(db, q, k, metric="ip", cache_key="bench", version=1)  # warm-up and the resident copy
        t0 = time.perf_counter()
        scores, _ = searcher.search(db, q, k, metric="ip", cache_key="bench", version=1)
        out[f"k{k}_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        want = np.sort(q[:4] @ db.T, axis=1)[:, ::-1][:, :k]
        out[f"k{k}_max_err"] = float(np.abs(scores[:4] - want).max())
    return out


def section_dali(check: Check) -> dict[str, Any]:
    if importlib.util.find_spec("nvidia.dali") is None:
        raise SkipSection("DALI is not installed (carry nvidia-dali wheels in wheels/)")
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from service.config import DecodeConfig
    from service.embedding.decode import DaliDecoder, decode_cpu, probe

    jpegs = _oct_jpegs(16)
    dev = check.device
    with ThreadPoolExecutor(2) as pool:
        decoder = DaliDecoder(DecodeConfig(backend="dali"), dev, pool, max_batch=8)
        want = [decode_cpu(d, probe(d, 10**9)) for d in jpegs]
        errors: list[str] = []

        def drive(part: int) -> None:
            mine = list(range(part, len(jpegs), 2))[: 3 + part]
            for _ in range(10):
                got = decoder._decode_batch([jpegs[i] for i in mine])
                for i, g in zip(mine, got, strict=True):
                    if tuple(g.shape[-2:]) != tuple(want[i].shape[-2:]):
                        errors.append(f"image {i}: shape {tuple(g.shape)}")
                    elif float((g.cpu().float().mean(0) - want[i].float().mean(0)).abs().mean()) > 3.0:
                        errors.append(f"image {i}: pixels differ from the CPU decode")

        threads = [threading.Thread(target=drive, args=(p,), daemon=True) for p in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    if errors:
        raise RuntimeError(f"DALI from two threads: {errors[:3]}")
    return {"images": len(jpegs), "device": str(dev), "pixel_check": "ok", "np": np.__version__}


_FUNCTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "versions": section_versions,
    "kernel_tests": section_kernel_tests,
    "kernel_timing": section_kernel_timing,
    "vision_9606": section_vision_9606,
    "engine_decode": section_engine_decode,
    "backbone_amp": section_backbone_amp,
    "cluster": section_cluster,
    "bench_vectors": section_bench_vectors,
    "faiss_gpu": section_faiss_gpu,
    "dali": section_dali,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `embedserve bench gpu`."""
    parser.add_argument("--out", default="var/gpu-check", help="folder for results.json and gpu_check.log")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes: check the check itself")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds before no new section starts")
    parser.add_argument("--wheels", default=str(REPO / "wheels"), help="folder of wheels to install first")
    parser.add_argument("--only", default="", help="comma-separated section names (default: all)")


def run(args: argparse.Namespace) -> int:
    """Run the check; 0 when no section ended in error."""
    check = Check(Path(args.out), dry_run=args.dry_run, budget_s=args.budget)
    wheels = Path(args.wheels)
    if wheels.is_dir():
        check.results["wheels"] = install_wheels(wheels)
    names = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = set(names) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    for name in names:
        check.run(name, _FUNCTIONS[name])
    failed = [n for n, s in check.results["sections"].items() if s["status"] == "error"]
    logger.info("done in %.1f s; failed: %s", time.monotonic() - check.started, failed or "none")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.gpu_check [--dry-run] [--out DIR]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
