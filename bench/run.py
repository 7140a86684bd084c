"""The benchmark suite: every stage timed on the same images, with a baseline measured in the same run.

`embedserve bench run --data DIR --out results.json [--quick] [--markdown FILE]`

Stages: decode (per backend present), preprocess, backbone (eager, frozen TorchScript, AMP on a GPU),
the offline directory job end to end, the gRPC server with C concurrent clients, index build and a
k=10 kNN graph (exact, HNSW, IVF-Flat with recall against exact), and clustering (K-means k=4/100/1000,
DBSCAN, HDBSCAN); the last two on every backend present (`bench/vectors.py`: faiss and scikit-learn everywhere,
and on a CUDA machine the torch top-k, faiss-gpu, torch K-means / DBSCAN and cuML too). A backend that cannot run
here is listed under `skipped` in the results, with the reason. GPU stages warm up before they are timed: the
decoders decode one batch, the preprocess kernel is launched as `Engine.from_config` does (Triton compiles it),
each GPU kNN / clustering backend runs once on a small slice.

Each stage reports throughput or seconds, latency percentiles where it applies, the
peak host memory (this process and its children) and peak GPU memory, and its ratio to the baseline
(`bench/baseline.py`: a DataLoader with Pillow workers and the eager model; scikit-learn for
clustering). Absolute numbers mean something only on the device they were measured on; ratios
compare two pipelines on the same machine in the same run.

`--quick` generates a few hundred synthetic scans (unless `--data` is given) and keeps every stage
small, for CI. Scores on synthetic images are not scores on real OCT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.config import Config, DecodeConfig, load_config

logger = logging.getLogger(__name__)

QUICK_IMAGES = 240


@dataclass(slots=True)
class Stage:
    """One measured stage."""

    name: str
    unit: str
    value: float
    baseline: float | None = None
    baseline_name: str = ""
    higher_is_better: bool = True
    images: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_host_bytes: int = 0
    peak_gpu_bytes: int = 0
    user_s: float = 0.0
    """CPU seconds in user mode during the stage (this process, plus the server process for gRPC)."""
    sys_s: float = 0.0
    """CPU seconds in the kernel; much more than a fraction of `user_s` means threads fight over cores."""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """How many times better than the baseline (>1 = faster)."""
        if self.baseline is None or self.baseline <= 0 or self.value <= 0:
            return None
        return self.value / self.baseline if self.higher_is_better else self.baseline / self.value

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                kids.extend(int(p) for p in handle.read().split())
    return kids


class _MemorySampler:
    """Samples the RSS of this process plus its children every 50 ms; `peak` is the largest sum seen."""

    def __init__(self, extra_pids: Callable[[], Sequence[int]] = list) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._extra = extra_pids
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = os.getpid()
        pids = {me, *_children(me), *self._extra()}
        self.peak = max(self.peak, sum(_rss_bytes(p) for p in pids))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> _MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _cpu_times(pids: Sequence[int]) -> tuple[float, float]:
    """(user, sys) CPU seconds of this process and `pids` so far (from /proc; zeros where it cannot be read)."""
    me = os.times()
    user, system = me.user, me.system
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / ticks
            system += int(fields[12]) / ticks
    return user, system


@contextlib.contextmanager
def _measure(stage: Stage, extra_pids: Callable[[], Sequence[int]] = list) -> Iterator[None]:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    pids = list(extra_pids())
    user0, sys0 = _cpu_times(pids)
    with _MemorySampler(extra_pids) as sampler:
        yield
    user1, sys1 = _cpu_times(pids)
    stage.user_s, stage.sys_s = round(user1 - user0, 2), round(sys1 - sys0, 2)
    stage.peak_host_bytes = sampler.peak
    if torch.cuda.is_available():
        stage.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())


def _percentiles(latencies: Sequence[float]) -> tuple[float | None, float | None]:
    if not latencies:
        return None, None
    arr = np.asarray(latencies) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def _image_files(root: Path) -> list[Path]:
    from service.jobs.embed_dir import find_images

    return [item.path for item in find_images(root)]


def _subset(paths: Sequence[Path], limit: int, seed: int = 0) -> list[Path]:
    if limit <= 0 or limit >= len(paths):
        return list(paths)
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.choice(len(paths), size=limit, replace=False))]


# --------------------------------------------------------------------------------------------------
# Stages


def bench_decode(datas: list[bytes], device: torch.device, batch: int) -> list[Stage]:
    """Decode only, per backend present, against Pillow `convert("RGB")` in one thread per core."""
    import io

    from PIL import Image

    from service.embedding.decode import create_decoder

    cores = os.cpu_count() or 1

    def pillow_rgb(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB").width

    stages: list[Stage] = []
    with ThreadPoolExecutor(cores) as pool:
        start = time.perf_counter()
        list(pool.map(pillow_rgb, datas))
        baseline = len(datas) / (time.perf_counter() - start)
        for backend in ("dali", "torchvision", "pillow"):
            try:
                decoder = create_decoder(DecodeConfig(backend=backend), device, pool, max_batch=batch)
            except Exception as e:  # a backend that does not work here is reported, not fatal
                stages.append(Stage(f"decode/{backend}", "images/s", 0.0, details={"unavailable": str(e)[:200]}))
                continue
            stage = Stage(f"decode/{backend}-{device.type}", "images/s", 0.0, baseline, "Pillow RGB, threads")
            decoder.decode(datas[:batch], (224, 224), "squash")  # nvJPEG / DALI set-up and first allocations: untimed
            if device.type == "cuda":
                torch.cuda.synchronize()
            with _measure(stage):
                start = time.perf_counter()
                for i in range(0, len(datas), batch):
                    decoder.decode(datas[i : i + batch], (224, 224), "squash")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stage.value = len(datas) / (time.perf_counter() - start)
            stage.images = len(datas)
            stages.append(stage)
    return stages


def bench_preprocess(datas: list[bytes], device: torch.device, batch: int) -> Stage:
    """Resize + normalise of decoded images, against Pillow resize + ToTensor + Normalize per image."""
    import io

    from PIL import Image

    from kernels.preprocess import preprocess_batch
    from kernels.preprocess import warmup as warm_preprocess
    from service.embedding.backbone import IMAGENET_MEAN, IMAGENET_STD

    images: list[torch.Tensor] = []
    pil: list[Image.Image] = []
    for data in datas:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
            gray = img.mode == "L"
        pil.append(rgb)
        # As the decoders hand them over: grayscale stays one channel, colour is (3, H, W).
        pixels = np.asarray(rgb)[..., 0] if gray else np.asarray(rgb).transpose(2, 0, 1)
        images.append(torch.from_numpy(np.ascontiguousarray(pixels)).to(device))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    start = time.perf_counter()
    for rgb in pil:
        x = torch.from_numpy(np.array(rgb.resize((224, 224), Image.Resampling.BILINEAR))).permute(2, 0, 1)
        _ = (x.float() / 255 - mean) / std
    baseline = len(pil) / (time.perf_counter() - start)
    stage = Stage("preprocess", "images/s", 0.0, baseline, "Pillow resize + normalise per image", images=len(datas))
    # Triton compiles the kernel on its first launch (seconds); that, and a first pass, stay out of the timing.
    launches = warm_preprocess(device, (224, 224))
    preprocess_batch(images[:batch], (224, 224))
    if device.type == "cuda":
        torch.cuda.synchronize()
    stage.details = {"kernel": "triton" if launches else "torch reference", "warmup_launches": launches}
    with _measure(stage):
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            preprocess_batch(images[i : i + batch], (224, 224))
        if device.type == "cuda":
            torch.cuda.synchronize()
        stage.value = len(images) / (time.perf_counter() - start)
    return stage


def bench_backbone(model: str, device: torch.device, batch: int, reps: int, compile_too: bool) -> list[Stage]:
    """The model alone on a fixed batch: eager float32 (baseline) against the optimised modes."""
    from service.embedding.backbone import Backbone

    def rate(backbone: Backbone) -> float:
        x = torch.randn(batch, 3, backbone.spec.input_size, backbone.spec.input_size, device=device)
        backbone.forward(x)
        backbone.forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            backbone.forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch * reps / (time.perf_counter() - start)

    first = Stage("backbone/eager fp32", "images/s", 0.0, None, "eager fp32", images=batch * reps)
    with _measure(first):
        eager = Backbone.create(model, device=device.type, optimize="none", channels_last=False, amp_dtype="float32")
        baseline = first.value = first.baseline = rate(eager)
    modes: list[tuple[str, dict[str, Any]]] = [("freeze (TorchScript)", {"optimize": "freeze"})]
    if device.type == "cuda":
        modes = [("amp fp16 channels_last", {"optimize": "none"}), *modes]
    if compile_too:
        modes.append(("torch.compile", {"optimize": "compile"}))
    stages = [first]
    for name, kwargs in modes:
        stage = Stage(f"backbone/{name}", "images/s", 0.0, baseline, "eager fp32", images=batch * reps)
        with _measure(stage):
            stage.value = rate(Backbone.create(model, device=device.type, **kwargs))
        stages.append(stage)
    return stages


def bench_runtimes(model: str, datas: list[bytes], batch: int, reps: int, cache_dir: Path) -> list[Stage]:
    """The model alone on each CPU runtime x precision, on a batch of the real sample, against frozen torch fp32.

    Each row: images/s with every core given to inference, the lowest cosine of its embeddings to the float32
    torch ones, peak memory and user/sys CPU time.
    """
    import torch.nn.functional as F

    from service.config import load_config as _load
    from service.embedding.backbone import Backbone
    from service.embedding.engine import Engine
    from service.embedding.runtimes import available_cores, available_runtimes, cpu_has_bf16, plan_threads

    cfg = _load(env={}, overrides={"backbone.device": "cpu", "backbone.runtime": "torch", "data_dir": str(cache_dir)})
    with Engine.from_config(cfg) as engine:
        prepared = engine.prepare(datas[:batch])
    if prepared.batch is None:
        return []
    x = prepared.batch
    cores = available_cores()
    threads = torch.get_num_threads()

    def rate(backbone: Backbone) -> tuple[float, torch.Tensor]:
        out = backbone.forward(x)
        start = time.perf_counter()
        for _ in range(reps):
            backbone.forward(x)
        return x.shape[0] * reps / (time.perf_counter() - start), out

    def _streams(runtime: str, cores: int) -> int:  # what the engine's thread plan gives this runtime
        cpu = torch.device("cpu")
        return plan_threads(budget=cores, decode_workers=0, inference_threads=cores, streams=0, runtime=runtime,
                            device=cpu).streams  # fmt: skip

    combos = [(r, p) for r in available_runtimes() for p in ("float32", "bfloat16")]
    combos = [(r, p) for r, p in combos if p == "float32" or (cpu_has_bf16() and r != "onnxruntime")]
    stages: list[Stage] = []
    reference: torch.Tensor | None = None
    baseline: float | None = None
    try:
        for runtime, precision in sorted(combos, key=lambda c: (c != ("torch", "float32"), c)):
            stage = Stage(f"runtime/{runtime} {precision}", "images/s", 0.0, baseline, "torch frozen fp32")
            try:
                with _measure(stage):
                    backbone = Backbone.create(
                        model, device="cpu", runtime=runtime, cpu_precision=precision,
                        threads=cores, streams=_streams(runtime, cores), cache_dir=cache_dir / "model-cache",
                    )  # fmt: skip
                    stage.value, out = rate(backbone)
            except Exception as e:  # a runtime that does not work here is reported, not fatal
                logger.warning("runtime %s %s unavailable: %s", runtime, precision, e)
                continue
            if reference is None:
                reference, baseline = out, stage.value
                stage.baseline = baseline
            cosine = F.cosine_similarity(out.float(), reference.float(), dim=1)
            stage.images = x.shape[0] * reps
            stage.details = {"min_cosine_to_fp32": float(cosine.min()), "threads": cores, **backbone.runtime.describe()}
            stage.details.pop("cache", None)
            stages.append(stage)
            backbone.close()
    finally:
        torch.set_num_threads(threads)
    return stages


def bench_offline(cfg: Config, data: Path, out_dir: Path, baseline_paths: Sequence[Path]) -> tuple[list[Stage], Path]:
    """The embed job, directory -> Parquet, against the DataLoader baseline on (a subset of) the same files.

    When the baseline runs on a subset, the job also runs on exactly that subset right before it, so the
    ratio compares the two pipelines on the same images at nearly the same time.
    """
    from bench.baseline import run_baseline
    from service.embedding.engine import Engine

    baseline_name = "DataLoader + Pillow + eager"
    out = out_dir / "embeddings.parquet"
    stage = Stage("end-to-end offline (embed job)", "images/s", 0.0, baseline_name=baseline_name)
    with Engine.from_config(cfg) as engine:
        with _measure(stage):
            _run_job(engine, data, out, stage)
        stages = [stage]
        all_paths = _image_files(data)
        if len(baseline_paths) < len(all_paths):
            subset = out_dir / "subset"
            for path in baseline_paths:
                link = subset / path.relative_to(data.resolve())
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path)
            paired = Stage(
                f"end-to-end offline, {len(baseline_paths)} images", "images/s", 0.0, baseline_name=baseline_name
            )
            with _measure(paired):
                _run_job(engine, subset, out_dir / "subset.parquet", paired)
            stages.append(paired)
    base = run_baseline(
        baseline_paths,
        model=cfg.backbone.model,
        batch_size=cfg.engine.batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    for s in stages:
        s.baseline = base.images_per_second
        s.details |= {"baseline_images": base.images, "baseline_seconds": round(base.seconds, 2)}
    stages[0].details["baseline_workers"] = base.workers
    stages[0].details["agreement_mean_cosine"] = _agreement(out, data, baseline_paths, base.vectors)
    return stages, out


def _run_job(engine: Any, data: Path, out: Path, stage: Stage) -> None:
    from service.jobs.embed_dir import EmbedJobOptions, run_embed_job

    summary = run_embed_job(engine, EmbedJobOptions(root=data, out=out, progress=sys.stderr.isatty()))
    stage.value = summary.images_per_second
    stage.images = summary.embedded
    stage.details = {
        "failed": summary.failed,
        "seconds": round(summary.seconds, 2),
        "decode": engine.info.decode_backend,
        "runtime": f"{engine.info.runtime} {engine.info.precision}",
    }


def _agreement(out: Path, root: Path, paths: Sequence[Path], vectors: np.ndarray) -> float:
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["key", "embedding"])
    ours = dict(
        zip(table.column("key").to_pylist(), table.column("embedding").to_numpy(zero_copy_only=False), strict=True)
    )
    keys = [p.relative_to(root.resolve()).as_posix() for p in paths]
    cos = [float(np.dot(ours[k], v)) for k, v in zip(keys, vectors, strict=True) if k in ours]
    return float(np.mean(cos)) if cos else float("nan")


def bench_grpc(cfg_file: Path | None, paths: Sequence[Path], clients: int, request_size: int, offline: float) -> Stage:
    """The server in its own process, `clients` threads each sending `request_size` images per call."""
    from service.client import EmbedClient

    datas = [(p.name, p.read_bytes()) for p in paths]
    cmd = [
        sys.executable,
        "-m",
        "service.cli.main",
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--log-level",
        "INFO",
    ]
    if cfg_file is not None:
        cmd[3:3] = ["--config", str(cfg_file)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stage = Stage(f"end-to-end gRPC ({clients} clients)", "images/s", 0.0, offline, "offline embed job")
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
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
        target = f"127.0.0.1:{port}"
        with EmbedClient(target) as probe:
            probe.wait_until_serving(timeout=300)
        requests = [datas[i : i + request_size] for i in range(0, len(datas), request_size)]
        latencies: list[float] = []
        lock = threading.Lock()

        def worker(index: int) -> int:
            done = 0
            with EmbedClient(target) as client:
                for request in requests[index::clients]:
                    t0 = time.perf_counter()
                    results = client.embed(request, return_vectors=False, timeout=600)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                    done += sum(1 for r in results if r.ok)
            return done

        with _measure(stage, extra_pids=lambda: [proc.pid]), ThreadPoolExecutor(clients) as pool:
            start = time.perf_counter()
            done = sum(pool.map(worker, range(clients)))
            stage.value = done / (time.perf_counter() - start)
        stage.images = done
        stage.p50_ms, stage.p99_ms = _percentiles(latencies)
        stage.details = {"request_size": request_size, "requests": len(requests)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return stage


def _overload(args: argparse.Namespace, cfg_file: Path | None, paths: Sequence[Path]) -> list[Stage]:
    """The `overload` stage of `bench.overload`: 32 clients retrying every 20 ms against a queue of 32."""
    from bench.overload import bench_overload

    return bench_overload(
        cfg_file,
        paths,
        clients=args.overload_clients,
        seconds=4.0 if args.quick else args.overload_seconds,
        measure=_measure,
        percentiles=_percentiles,
    )


def _vectors(parquet: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    column = pq.read_table(parquet, columns=["embedding"]).column("embedding").combine_chunks()
    dim = column.type.list_size
    return np.asarray(column.values.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)


# --------------------------------------------------------------------------------------------------
# Orchestration


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in (
        "torch",
        "torchvision",
        "nvidia-dali-cuda130",
        "faiss-cpu",
        "faiss-gpu-cu12",
        "cuml-cu13",
        "triton",
        "scikit-learn",
        "numpy",
        "pillow",
        "grpcio",
        "embedserve",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU: {model} ({os.cpu_count()} cores)"


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage and return the results document; the scratch directory is removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="embedserve-bench-"))
    try:
        return _run_suite(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_suite(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = Path(args.data) if args.data else None
    if data is None:
        if not args.quick:
            raise SystemExit("--data DIR is required without --quick")
        from bench.generate import generate_dataset

        data = work / "oct"
        generate_dataset(data, n=args.n or QUICK_IMAGES, seed=0, workers=os.cpu_count(), progress=False)
    config_file = getattr(args, "config", None)
    cfg = load_config(config_file, env=os.environ, overrides={"engine.batch_size": args.batch_size})
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.backbone.device != "cpu" else "cpu")
    paths = _image_files(data)
    if not paths:
        raise SystemExit(f"no images under {data}")
    sample_n = min(len(paths), 120 if args.quick else args.stage_images)
    sample_paths = _subset(paths, sample_n)
    sample = [p.read_bytes() for p in sample_paths]
    stages: list[Stage] = []
    timeline: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        logger.info("bench: %s", name)
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = fn()
        timeline[name] = time.perf_counter() - t0
        return result

    stages += step("decode", lambda: bench_decode(sample, device, cfg.engine.batch_size))
    stages.append(step("preprocess", lambda: bench_preprocess(sample, device, cfg.engine.batch_size)))
    if device.type == "cpu":
        stages += step(
            "runtimes",
            lambda: bench_runtimes(cfg.backbone.model, sample, cfg.engine.batch_size, 2 if args.quick else 10, work),
        )
    stages += step(
        "backbone",
        lambda: bench_backbone(cfg.backbone.model, device, cfg.engine.batch_size, 2 if args.quick else 5, args.compile),
    )
    baseline_paths = _subset(paths, args.baseline_images if not args.quick else len(paths))
    offline_stages, parquet = step("offline", lambda: bench_offline(cfg, data, work, baseline_paths))
    stages += offline_stages
    offline = offline_stages[0]
    grpc_paths = _subset(paths, min(len(paths), 96 if args.quick else args.grpc_images), seed=1)
    stages.append(
        step("grpc", lambda: bench_grpc(config_file, grpc_paths, args.clients, args.request_size, offline.value))
    )
    stages += step("overload", lambda: _overload(args, config_file, grpc_paths))
    vectors = _vectors(parquet)
    from bench.vectors import bench_clustering, bench_knn, cluster_plan, knn_plan, skipped

    plans = {"knn": knn_plan(device, len(vectors)), "clustering": cluster_plan(device, len(vectors))}
    stages += step("knn", lambda: bench_knn(vectors, plans["knn"]))
    limit = 2_000 if args.quick else args.cluster_limit
    stages += step("clustering", lambda: bench_clustering(vectors, limit, plans["clustering"]))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["embedserve", "bench", "run", *sys.argv[3:]])
        if sys.argv[1:3] == ["bench", "run"]
        else " ".join(sys.argv),
        "device": _device_name(),
        "versions": _versions(),
        "data": {"path": str(data), "images": len(paths), "synthetic": (data / "generator.json").exists()},
        "settings": {
            "quick": args.quick,
            "batch_size": cfg.engine.batch_size,
            "clients": args.clients,
            "request_size": args.request_size,
            "model": cfg.backbone.model,
            "baseline_images": len(baseline_paths),
            "stage_images": sample_n,
            "grpc_images": len(grpc_paths),
            "cluster_limit": args.cluster_limit,
        },
        "stages": [s.to_json() for s in stages],
        "skipped": [entry for plan in plans.values() for entry in skipped(plan)],
        "stage_seconds": timeline,
    }


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def to_markdown(result: dict[str, Any]) -> str:
    """A Markdown summary of a results document, for docs/benchmarks.md."""
    lines = [
        f"### {result['device']} — {result['date']}",
        "",
        f"`{result['command']}` on {result['data']['images']} images"
        + (" (synthetic OCT twin)" if result["data"]["synthetic"] else ""),
        "",
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        "| stage | result | baseline | ratio | p50 / p99 ms | peak host MiB | user / sys s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["stages"]:
        base = f"{_fmt(s['baseline'], '.2f')} ({s['baseline_name']})" if s["baseline"] is not None else "—"
        ratio = f"{s['ratio']:.2f}×" if s["ratio"] is not None else "—"
        lat = f"{_fmt(s['p50_ms'])} / {_fmt(s['p99_ms'])}" if s["p50_ms"] is not None else "—"
        notes = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s["details"].items())
        lines.append(
            f"| {s['name']} | {s['value']:.2f} {s['unit']} | {base} | {ratio} | {lat} | "
            f"{s['peak_host_bytes'] / 2**20:.0f} | {s.get('user_s', 0):.1f} / {s.get('sys_s', 0):.1f} | {notes} |"
        )
    if result.get("skipped"):
        lines += ["", "Not run here: " + "; ".join(f"{e['stage']} ({e['reason']})" for e in result["skipped"])]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="image directory (the OCT layout or any tree); generated with --quick")
    parser.add_argument("--out", required=True, help="results JSON to write")
    parser.add_argument("--markdown", help="also write the Markdown summary here")
    parser.add_argument("--quick", action="store_true", help="a few hundred images, every stage small (CI)")
    parser.add_argument("--n", type=int, default=0, help="images to generate with --quick and no --data")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--clients", type=int, default=8, help="concurrent gRPC clients")
    parser.add_argument("--request-size", type=int, default=8, help="images per gRPC request")
    parser.add_argument("--stage-images", type=int, default=1024, help="images for the decode/preprocess stages")
    parser.add_argument(
        "--baseline-images",
        type=int,
        default=0,
        help="images for the DataLoader baseline (0 = all; a random subset otherwise)",
    )
    parser.add_argument("--grpc-images", type=int, default=2048, help="images sent through the server")
    parser.add_argument("--overload-clients", type=int, default=32, help="clients flooding the server (overload)")
    parser.add_argument("--overload-seconds", type=float, default=30.0, help="seconds per overload phase (--quick: 4)")
    parser.add_argument("--cluster-limit", type=int, default=20_000, help="points for DBSCAN/HDBSCAN (sampled)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")


def run(args: argparse.Namespace) -> int:
    result = run_suite(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    summary = to_markdown(result)
    if args.markdown:
        Path(args.markdown).write_text(summary)
    print(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedserve bench run", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING)
    return run(parser.parse_args(argv))
