"""Kernel bench: each Triton kernel against its plain-torch reference, same inputs, same run.

`embedserve bench kernels [--quick] [--device cuda|cpu] [--json PATH]` prints a Markdown table of
median times and speedups (reference time / kernel time). The preprocess kernel is also timed against
the CPU path (the reference on CPU tensors, as a machine without a GPU runs it). Every kernel output is
checked against the reference and the max abs error is reported next to its time.

Without a GPU the Triton kernels are not timed (the interpreter is a testing tool, not a fast path):
the table then holds the references on the CPU only, and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kernels import kmeans, normalize, preprocess, topk
from kernels._triton import TRITON_AVAILABLE

logger = logging.getLogger(__name__)

NO_GPU_NOTE = "no GPU: Triton kernels not timed (references on the CPU only)"


@dataclass(frozen=True, slots=True)
class Sizes:
    """Workload sizes for one bench run."""

    images: int
    """Images in the preprocess batch."""
    cpu_images: int
    """Images of that batch timed through the CPU path (reported per batch, scaled)."""
    image_size: tuple[int, int]
    """Model input size."""
    vectors: int
    """Rows for the normalise kernel."""
    dim: int
    """Embedding width (EfficientNet-Lite0: 1280)."""
    points: int
    """Points for the K-means steps."""
    clusters: int
    """Clusters for the K-means steps."""
    queries: int
    """Queries for the top-k search."""
    database: int
    """Stored vectors searched."""
    k: int
    """Neighbours per query."""
    reps: int
    """Timed repetitions (the median is reported)."""
    shapes: tuple[tuple[int, ...], ...] = ((496, 512), (496, 768), (512, 512), (3, 375, 500))
    """Decoded image shapes, cycled through: gray OCT scans (Kermany sizes) and an RGB photo."""


FULL = Sizes(
    images=256,
    cpu_images=16,
    image_size=(224, 224),
    vectors=16384,
    dim=1280,
    points=84484,
    clusters=1000,
    queries=4096,
    database=84484,
    k=10,
    reps=10,
)
QUICK = Sizes(
    images=16,
    cpu_images=4,
    image_size=(224, 224),
    vectors=1024,
    dim=256,
    points=4096,
    clusters=64,
    queries=128,
    database=4096,
    k=10,
    reps=3,
)


@dataclass(slots=True)
class Row:
    """One line of the table."""

    kernel: str
    workload: str
    triton_ms: float | None
    reference_ms: float
    speedup: float | None
    max_abs_err: float | None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in milliseconds, after `warmup` untimed calls (JIT compile, caches)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _images(sizes: Sizes, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Synthetic decoded images (random pixels: the content does not change the work), shapes cycled."""
    g = torch.Generator().manual_seed(seed)
    shapes = sizes.shapes
    return [
        torch.randint(0, 256, shapes[i % len(shapes)], dtype=torch.uint8, generator=g).to(device)
        for i in range(sizes.images)
    ]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    finite = torch.isfinite(b)
    return float((a.float() - b.float())[finite].abs().max()) if bool(finite.any()) else 0.0


def _bench_preprocess(sizes: Sizes, device: torch.device, timed: bool) -> list[Row]:
    images = _images(sizes, device)
    kwargs: dict[str, Any] = {"policy": "letterbox", "pad": "edge", "dtype": torch.float16, "channels_last": True}
    size = sizes.image_size
    workload = f"{sizes.images} ragged uint8 images -> {size[0]}x{size[1]} fp16 channels_last, letterbox edge"

    def ref() -> torch.Tensor:
        return preprocess.preprocess_reference(images, size, **kwargs)

    ref_ms = _median_ms(ref, device, sizes.reps)
    rows = []
    cpu_images = [im.cpu() for im in images[: sizes.cpu_images]]
    cpu_ms = _median_ms(lambda: preprocess.preprocess_reference(cpu_images, size, **kwargs), torch.device("cpu"), 2)
    cpu_batch_ms = cpu_ms * sizes.images / len(cpu_images)
    if timed:

        def fused() -> torch.Tensor:
            return preprocess._preprocess_triton(images, size, **kwargs)

        kernel_ms = _median_ms(fused, device, sizes.reps, warmup=2)
        err = _max_err(fused(), ref())
        rows.append(Row("preprocess", workload, kernel_ms, ref_ms, ref_ms / kernel_ms, err, "vs per-image torch loop"))
        rows.append(
            Row(
                "preprocess",
                workload,
                kernel_ms,
                cpu_batch_ms,
                cpu_batch_ms / kernel_ms,
                None,
                f"vs CPU path (timed on {len(cpu_images)} images, scaled)",
            )
        )
    else:
        rows.append(Row("preprocess", workload, None, ref_ms, None, None, "per-image torch loop"))
    return rows


def _bench_normalize(sizes: Sizes, device: torch.device, timed: bool) -> list[Row]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sizes.vectors, sizes.dim, generator=g).to(torch.float16).to(device)
    workload = f"{sizes.vectors}x{sizes.dim} fp16 -> fp32"
    ref_ms = _median_ms(lambda: normalize.l2_normalize_reference(x, torch.float32), device, sizes.reps)
    if not timed:
        return [Row("l2_normalize", workload, None, ref_ms, None, None)]
    kernel_ms = _median_ms(lambda: normalize._l2_normalize_triton(x, torch.float32), device, sizes.reps, warmup=2)
    err = _max_err(normalize._l2_normalize_triton(x, torch.float32), normalize.l2_normalize_reference(x))
    return [Row("l2_normalize", workload, kernel_ms, ref_ms, ref_ms / kernel_ms, err)]


def _bench_kmeans(sizes: Sizes, device: torch.device, timed: bool) -> list[Row]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sizes.points, sizes.dim, generator=g).to(device)
    c = x[torch.randperm(sizes.points, generator=g)[: sizes.clusters].to(device)].clone()
    labels = torch.randint(0, sizes.clusters, (sizes.points,), generator=g).to(device)
    assign = f"{sizes.points}x{sizes.dim} fp32 points, {sizes.clusters} centroids"
    update = f"{sizes.points}x{sizes.dim} fp32 points into {sizes.clusters} clusters"
    assign_ref_ms = _median_ms(lambda: kmeans.kmeans_assign_reference(x, c), device, sizes.reps)
    update_ref_ms = _median_ms(lambda: kmeans.kmeans_update_reference(x, labels, sizes.clusters), device, sizes.reps)
    if not timed:
        return [
            Row("kmeans_assign", assign, None, assign_ref_ms, None, None),
            Row("kmeans_update", update, None, update_ref_ms, None, None),
        ]
    assign_ms = _median_ms(lambda: kmeans._kmeans_assign_triton(x, c), device, sizes.reps, warmup=2)
    tf32_ms = _median_ms(lambda: kmeans._kmeans_assign_triton(x, c, precision="tf32"), device, sizes.reps, 2)
    update_ms = _median_ms(lambda: kmeans._kmeans_update_triton(x, labels, sizes.clusters), device, sizes.reps, 2)
    ref_dists = kmeans.kmeans_assign_reference(x, c)[1]
    err_assign = _max_err(kmeans._kmeans_assign_triton(x, c)[1], ref_dists)
    err_tf32 = _max_err(kmeans._kmeans_assign_triton(x, c, precision="tf32")[1], ref_dists)
    err_update = _max_err(
        kmeans._kmeans_update_triton(x, labels, sizes.clusters)[0],
        kmeans.kmeans_update_reference(x, labels, sizes.clusters)[0],
    )
    return [
        Row("kmeans_assign", assign, assign_ms, assign_ref_ms, assign_ref_ms / assign_ms, err_assign, "min sq. dist"),
        Row(
            "kmeans_assign",
            assign,
            tf32_ms,
            assign_ref_ms,
            assign_ref_ms / tf32_ms,
            err_tf32,
            "precision=tf32 (reference: fp32)",
        ),
        Row("kmeans_update", update, update_ms, update_ref_ms, update_ref_ms / update_ms, err_update, "centroids"),
    ]


def _bench_topk(sizes: Sizes, device: torch.device, timed: bool) -> list[Row]:
    g = torch.Generator().manual_seed(3)
    db = normalize.l2_normalize_reference(torch.randn(sizes.database, sizes.dim, generator=g)).to(device)
    q = db[: sizes.queries].clone()
    rows = []
    metric: topk.Metric
    for metric in ("ip", "l2"):
        workload = f"{sizes.queries} queries x {sizes.database}x{sizes.dim} fp32, k={sizes.k}, {metric}"
        ref_ms = _median_ms(partial(topk.search_topk_reference, q, db, sizes.k, metric), device, sizes.reps)
        if not timed:
            rows.append(Row("search_topk", workload, None, ref_ms, None, None))
            continue
        ref = topk.search_topk_reference(q, db, sizes.k, metric)[0]
        for precision in ("ieee", "tf32"):
            run = partial(topk._search_topk_triton, q, db, sizes.k, metric, precision=precision)
            kernel_ms = _median_ms(run, device, sizes.reps, 2)
            note = "scores" if precision == "ieee" else "precision=tf32 (reference: fp32)"
            rows.append(
                Row("search_topk", workload, kernel_ms, ref_ms, ref_ms / kernel_ms, _max_err(run()[0], ref), note)
            )
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_kernel_bench(device: str = "cuda", quick: bool = False) -> dict[str, Any]:
    """Time every kernel and its reference on `device`; return a JSON-ready dict with a `rows` list.

    Asking for "cuda" without a GPU (or without triton) times the references on the CPU instead and
    puts NO_GPU_NOTE in `note`. Quick sizes keep a CPU run to seconds.
    """
    dev = torch.device(device)
    note = ""
    if dev.type == "cuda" and not torch.cuda.is_available():
        logger.info("no CUDA device: timing the torch references on the CPU only")
        dev = torch.device("cpu")
    timed = dev.type == "cuda" and TRITON_AVAILABLE
    if not timed:
        note = NO_GPU_NOTE if TRITON_AVAILABLE else "triton is not installed: Triton kernels not timed"
        quick = True  # full sizes take minutes on a CPU and time nothing new
    sizes = QUICK if quick else FULL
    rows: list[Row] = []
    for bench in (_bench_preprocess, _bench_normalize, _bench_kmeans, _bench_topk):
        logger.info("bench %s on %s", bench.__name__.removeprefix("_bench_"), dev)
        with torch.inference_mode():
            rows.extend(bench(sizes, dev, timed))
    return {
        "device": _device_name(dev),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "quick": quick,
        "triton_timed": timed,
        "note": note,
        "sizes": asdict(sizes),
        "rows": [asdict(row) for row in rows],
    }


def _triton_version() -> str | None:
    if not TRITON_AVAILABLE:
        return None
    import triton

    return str(triton.__version__)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def to_markdown(result: dict[str, Any]) -> str:
    """Render a `run_kernel_bench` result as a Markdown table with a one-line header."""
    lines = [f"Device: {result['device']} · torch {result['torch']} · triton {result['triton'] or 'absent'}"]
    if result["note"]:
        lines.append(f"Note: {result['note']}")
    lines += [
        "",
        "| kernel | workload | Triton (ms) | reference (ms) | speedup | max abs err | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        speedup = _fmt(row["speedup"], ".2f")
        lines.append(
            f"| {row['kernel']} | {row['workload']} | {_fmt(row['triton_ms'], '.3f')} | {row['reference_ms']:.3f} "
            f"| {speedup if row['speedup'] is None else speedup + '×'} | {_fmt(row['max_abs_err'], '.2e')} "
            f"| {row['note']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `embedserve bench kernels [--device cuda|cpu] [--quick] [--json PATH]`."""
    parser = argparse.ArgumentParser(prog="embedserve bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default; falls back to cpu without a GPU) or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "--":  # `embedserve bench kernels -- --quick` passes the separator through
        argv = argv[1:]
    args = parser.parse_args(argv)
    result = run_kernel_bench(args.device, quick=args.quick)
    print(to_markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
