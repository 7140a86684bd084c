"""Configuration as data: one frozen, keyword-only dataclass per subsystem.

Values come from, highest precedence first: command-line flags, `EMBEDSERVE_*` environment
variables, a TOML file, the defaults below. Only entry points (the CLI) read flags and the
environment; everything else receives a built `Config`.

TOML layout: one table per section, e.g. `[decode] backend = "pillow"`; root keys such as
`data_dir` at the top. Environment: `EMBEDSERVE_<SECTION>_<FIELD>` (`EMBEDSERVE_DECODE_BACKEND`,
`EMBEDSERVE_ENGINE_BATCH_SIZE`) or `EMBEDSERVE_<FIELD>` for root keys (`EMBEDSERVE_DATA_DIR`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.errors import ConfigError

logger = logging.getLogger(__name__)

Device = str
"""`auto`, `cpu`, `cuda` (the current CUDA device) or `cuda:N`."""
DecodeBackend = Literal["auto", "dali", "torchvision", "pillow"]
ResizePolicy = Literal["squash", "letterbox"]
PadMode = Literal["zero", "white", "edge"]
AmpDtype = Literal["float16", "bfloat16"]
Optimize = Literal["auto", "none", "freeze", "compile"]
BackboneRuntime = Literal["auto", "torch", "openvino", "onnxruntime"]
CpuPrecision = Literal["auto", "float32", "bfloat16"]
IndexType = Literal["flat", "ivf_flat", "ivf_pq", "hnsw"]
IndexMetric = Literal["cosine", "l2"]
ExactBackend = Literal["auto", "faiss", "torch"]

ENV_PREFIX = "EMBEDSERVE_"

PILLOW_READ_FORMATS = frozenset(
    {
        "AVIF", "BLP", "BMP", "BUFR", "CUR", "DCX", "DDS", "DIB", "EPS", "FITS", "FLI", "FTEX", "GBR", "GIF",
        "GRIB", "HDF5", "ICNS", "ICO", "IM", "IMT", "IPTC", "JPEG", "JPEG2000", "MCIDAS", "MPEG", "MSP", "PCD",
        "PCX", "PIXAR", "PNG", "PPM", "PSD", "QOI", "SGI", "SPIDER", "SUN", "TGA", "TIFF", "WEBP", "WMF", "XBM",
        "XPM", "XVTHUMB",
    }
)  # fmt: skip
"""The format names Pillow can open (`PIL.Image.OPEN` after `Image.init()`); a test keeps this in step with Pillow."""
DEFAULT_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}; pick one of those")


def _check_device(name: str, value: str) -> None:
    if not isinstance(value, str) or re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is None:
        raise ConfigError(f"{name}={value!r} is not a device; use auto, cpu, cuda or cuda:N (N = the GPU's index)")


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """Which model turns preprocessed images into embeddings, and how it runs."""

    model: str = "efficientnet_lite0"
    """`efficientnet_lite0` (1280-d), `efficientnet_lite2`, or `torchscript:PATH` for any TorchScript image model."""
    device: Device = "auto"
    """`cuda` when a GPU is present with `auto`; `cpu` always works."""
    amp_dtype: AmpDtype = "float16"
    """Autocast precision on CUDA (the CPU's is `cpu_precision`)."""
    runtime: BackboneRuntime = "auto"
    """`torch`, `openvino` or `onnxruntime` (both CPU only, converted in process and cached under the data
    directory); `auto` = OpenVINO on an x86 CPU, torch on CUDA and elsewhere."""
    cpu_precision: CpuPrecision = "auto"
    """Precision on the CPU: `auto` = bfloat16 where the CPU has AMX or AVX512-BF16 (onnxruntime: float32),
    float32 otherwise. bf16 keeps every embedding within cosine 0.995 of float32 (tested on real OCT scans)."""
    threads: int = 0
    """CPU threads of the forward pass; 0 = automatic from the thread budget (`engine.cpu_threads`): all of it for
    OpenVINO (the decode workers run beside its threads), what decode leaves for torch and ONNX Runtime."""
    streams: int = 0
    """OpenVINO streams, one asynchronous request in flight each; 0 = one per two inference threads, at least two."""
    channels_last: bool = True
    """Use channels_last memory format on CUDA and with bf16 on the CPU (faster convolutions)."""
    optimize: Optimize = "auto"
    """`freeze` scripts and freezes the model (folds batch norm; about 2x on CPU), `compile` uses torch.compile
    (faster still, but a minute of compilation per input shape), `none` runs eager; `auto` = freeze on CPU,
    none on CUDA (AMP and channels_last do the work there)."""
    warmup: bool = True
    """Run a few forward passes at start so the first request does not pay for kernel selection."""
    input_size: int = 0
    """Square input size for TorchScript models without embedded metadata; 0 = the model's own (224 if unknown)."""

    def __post_init__(self) -> None:
        _check_device("backbone.device", self.device)
        _check_choice("backbone.amp_dtype", self.amp_dtype, ("float16", "bfloat16"))
        _check_choice("backbone.optimize", self.optimize, ("auto", "none", "freeze", "compile"))
        _check_choice("backbone.runtime", self.runtime, ("auto", "torch", "openvino", "onnxruntime"))
        _check_choice("backbone.cpu_precision", self.cpu_precision, ("auto", "float32", "bfloat16"))
        if self.runtime == "onnxruntime" and self.cpu_precision == "bfloat16":
            raise ConfigError(
                "backbone.cpu_precision=bfloat16 needs runtime openvino or torch; onnxruntime runs float32 on the CPU"
            )
        if self.threads < 0 or self.streams < 0:
            raise ConfigError(
                f"backbone.threads={self.threads} and backbone.streams={self.streams} must be 0 (automatic) or positive"
            )
        if not self.model:
            raise ConfigError("backbone.model is empty; use efficientnet_lite0, efficientnet_lite2 or torchscript:PATH")
        if self.input_size < 0:
            raise ConfigError(f"backbone.input_size={self.input_size} must be 0 (model default) or a positive size")


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How encoded bytes become pixel tensors."""

    backend: DecodeBackend = "auto"
    """`auto` picks DALI on a GPU, then torchvision nvJPEG, and Pillow on the CPU (fastest there)."""
    max_pixels: int = 50_000_000
    """Refuse images with more pixels than this (decompression-bomb guard)."""
    resize: ResizePolicy = "squash"
    """`squash` stretches to the model input; `letterbox` keeps the aspect ratio and pads."""
    pad: PadMode = "zero"
    """Padding for `letterbox`: black (`zero`), `white`, or the nearest border pixel (`edge`)."""
    reduced_decode: bool = False
    """Pillow only: decode JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling) when that still covers the input size.
    Faster decode, slightly different pixels (cosine to a full decode >= 0.98 on OCT scans)."""
    workers: int = 0
    """Threads that decode in parallel with inference; 0 = on CUDA one per core, on the CPU a quarter of
    `engine.cpu_threads` (at least one), the rest going to inference."""
    formats: tuple[str, ...] = DEFAULT_FORMATS
    """Pillow format names accepted; anything else is `unsupported_image` and its Pillow plugin is never run.
    TOML: `formats = ["JPEG", "PNG"]`; environment: `EMBEDSERVE_DECODE_FORMATS=JPEG,PNG`."""

    def __post_init__(self) -> None:
        formats = tuple(str(f).strip().upper() for f in self.formats)
        object.__setattr__(self, "formats", formats)  # normalised once, so every reader sees upper-case names
        if not formats:
            raise ConfigError(f"decode.formats is empty; list the formats to accept, e.g. {', '.join(DEFAULT_FORMATS)}")
        unknown = [f for f in formats if f not in PILLOW_READ_FORMATS]
        if unknown:
            raise ConfigError(
                f"decode.formats has {', '.join(unknown)}, which Pillow cannot read; use Pillow format names "
                f"such as {', '.join(DEFAULT_FORMATS)} (all: {', '.join(sorted(PILLOW_READ_FORMATS))})"
            )
        _check_choice("decode.backend", self.backend, ("auto", "dali", "torchvision", "pillow"))
        _check_choice("decode.resize", self.resize, ("squash", "letterbox"))
        _check_choice("decode.pad", self.pad, ("zero", "white", "edge"))
        if self.max_pixels <= 0:
            raise ConfigError(f"decode.max_pixels={self.max_pixels} must be positive (e.g. 50000000)")
        if self.workers < 0:
            raise ConfigError(f"decode.workers={self.workers} must be 0 (one per core) or a positive count")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the engine batches work for the backbone."""

    batch_size: int = 64
    """Images per forward pass."""
    prefetch_batches: int = 2
    """Batches decoded ahead of the forward pass (bounds memory held by decoded images)."""
    cpu_threads: int = 0
    """The CPU cores that decode workers and inference share; 0 = the cores this process may use. OpenVINO's
    inference threads take all of them and the decode workers run beside (its threads sleep while they wait);
    torch's and ONNX Runtime's spin, so for them decode workers + inference threads never exceed it."""

    def __post_init__(self) -> None:
        if self.cpu_threads < 0:
            raise ConfigError(f"engine.cpu_threads={self.cpu_threads} must be 0 (all cores) or a positive count")
        if self.batch_size <= 0:
            raise ConfigError(f"engine.batch_size={self.batch_size} must be positive (e.g. 64)")
        if self.prefetch_batches <= 0:
            raise ConfigError(f"engine.prefetch_batches={self.prefetch_batches} must be at least 1")


@functools.cache
def _warn_batch_clamped(max_batch_size: int, max_queue_size: int) -> None:
    """Log the clamp of `BatcherConfig.max_batch_size` once per process for each pair of values."""
    logger.warning(
        "batcher.max_batch_size=%d is above batcher.max_queue_size=%d: batches hold at most %d images",
        max_batch_size,
        max_queue_size,
        max_queue_size,
    )


@dataclass(frozen=True, kw_only=True)
class BatcherConfig:
    """The dynamic batcher shared by every request of the server."""

    max_batch_size: int = 64
    """Most images in one forward pass."""
    max_queue_delay_ms: float = 5.0
    """How long the first image of a batch waits for others before the batch runs anyway."""
    max_queue_size: int = 1024
    """Most images waiting; beyond it new requests are refused with RESOURCE_EXHAUSTED. Below max_batch_size, it
    also caps the batch (logged once)."""
    max_consecutive_failed_batches: int = 5
    """A batch that fails unexpectedly fails only its own requests (INTERNAL); this many failed batches in a row
    (or one CUDA error that poisons the device) stop the batcher and flip health to NOT_SERVING."""
    max_batch_pixels: int = 100_000_000
    """Most decoded pixels (width x height, from each image's header) in flight: a batch is cut before the image that
    would exceed it, and is decoded only once it fits beside the batches decoding, ready and running (an image
    larger than this runs alone). About 3 bytes a pixel, plus the resize's float copy of one image. 0 = no limit."""
    trim_after_pixels: int = 50_000_000
    """Return freed heap memory to the OS (glibc `malloc_trim`) once this many pixels have been decoded since the
    last trim and the queue is empty (a burst is over). 0 = never trim."""
    trim_interval_s: float = 10.0
    """Least seconds between two trims (a trim walks the whole heap: a few ms per GB)."""

    def __post_init__(self) -> None:
        if self.max_batch_pixels < 0:
            raise ConfigError(
                f"batcher.max_batch_pixels={self.max_batch_pixels} must be >= 0 (0 = no limit; e.g. 100000000)"
            )
        if self.trim_after_pixels < 0:
            raise ConfigError(f"batcher.trim_after_pixels={self.trim_after_pixels} must be >= 0 (0 = never trim)")
        if self.trim_interval_s < 0:
            raise ConfigError(f"batcher.trim_interval_s={self.trim_interval_s} must be >= 0 seconds (e.g. 10)")
        if self.max_consecutive_failed_batches <= 0:
            raise ConfigError(
                f"batcher.max_consecutive_failed_batches={self.max_consecutive_failed_batches} must be at least 1 "
                "(1 = the first failed batch stops the server)"
            )
        if self.max_batch_size <= 0:
            raise ConfigError(f"batcher.max_batch_size={self.max_batch_size} must be positive (e.g. 64)")
        if self.max_queue_delay_ms < 0:
            raise ConfigError(f"batcher.max_queue_delay_ms={self.max_queue_delay_ms} must be >= 0")
        if self.max_queue_size <= 0:
            raise ConfigError(f"batcher.max_queue_size={self.max_queue_size} must be positive (e.g. 1024)")
        if self.max_queue_size < self.max_batch_size:
            # A small queue is a legitimate choice (low latency, early refusals): no batch can be larger than it.
            _warn_batch_clamped(self.max_batch_size, self.max_queue_size)
            object.__setattr__(self, "max_batch_size", self.max_queue_size)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The gRPC server and the metrics endpoint."""

    host: str = "127.0.0.1"
    """Address to listen on; 127.0.0.1 keeps the server local."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus /metrics endpoint; it has no auth (not even with auth_token), so 127.0.0.1 by
    default: expose it (0.0.0.0) only on a network where anyone may read the metrics."""
    metrics_port: int = 9464
    """Port of /metrics; 0 picks a free one, -1 disables it."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest request or response; 64 MiB holds a batch of ~1,000 OCT scans."""
    max_images_per_request: int = 1024
    """More images than this in one request is INVALID_ARGUMENT."""
    grace_seconds: float = 30.0
    """On SIGTERM, how long in-flight calls may take to finish."""
    tls_cert: str = ""
    """PEM certificate file; with tls_key, serve TLS."""
    tls_key: str = ""
    """PEM private key file."""
    auth_token: str = ""
    """When set, every call must send `authorization: Bearer <token>` (the scheme in any case)."""
    max_concurrent_rpcs: int = 0
    """Most calls in flight (streams and health watches included); beyond it gRPC refuses new calls with
    RESOURCE_EXHAUSTED before reading their requests. 0 = no limit (the batcher's queue still refuses)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port={self.port} must be 0..65535 (0 = any free port)")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError(f"server.metrics_port={self.metrics_port} must be -1 (off), 0 (any) or a port")
        if self.max_message_bytes < 1024 * 1024:
            raise ConfigError(f"server.max_message_bytes={self.max_message_bytes} is below 1 MiB; raise it")
        if self.max_images_per_request <= 0:
            raise ConfigError(f"server.max_images_per_request={self.max_images_per_request} must be positive")
        if self.max_concurrent_rpcs < 0:
            raise ConfigError(f"server.max_concurrent_rpcs={self.max_concurrent_rpcs} must be >= 0 (0 = no limit)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key must be given together")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """The vector index: defaults for new collections, search settings and durability."""

    type: IndexType = "flat"
    """Index of new collections: `flat` (exact), `ivf_flat`, `ivf_pq` or `hnsw` (approximate, built once
    `train_min_vectors` items exist; exact search until then)."""
    metric: IndexMetric = "cosine"
    """Metric of new collections: `cosine` (vectors are L2-normalised; score = cosine, higher is closer) or `l2`
    (score = squared Euclidean distance, lower is closer)."""
    nlist: int = 0
    """IVF lists; 0 = about 4 * sqrt(n) at training time (at most n / 39)."""
    pq_m: int = 16
    """IVF-PQ sub-quantizers; must divide the collection's dimension."""
    pq_nbits: int = 8
    """Bits per IVF-PQ sub-quantizer code."""
    hnsw_m: int = 32
    """Neighbours per HNSW node."""
    ef_construction: int = 200
    """HNSW build-time beam width."""
    nprobe: int = 32
    """IVF lists visited per query (more = better recall, slower)."""
    ef_search: int = 128
    """HNSW search-time beam width (raised to the number of candidates when that is larger)."""
    refine_factor: int = 4
    """Approximate indexes fetch k * refine_factor candidates and re-score them exactly."""
    train_min_vectors: int = 10_000
    """An approximate index is trained (built) once a collection holds this many vectors."""
    exact_filter_fraction: float = 0.05
    """A filter matching fewer than this fraction of a collection is searched exactly over the matches."""
    snapshot_every_records: int = 10_000
    """Write a snapshot (and start a new log) after this many log records..."""
    snapshot_every_bytes: int = 256 * 1024 * 1024
    """...or after this many log bytes, whichever comes first."""
    fsync: bool = True
    """fsync the log before acknowledging a write (off: a process crash loses nothing, a power cut may)."""
    device: Device = "auto"
    """Where exact search runs: `cuda` when a GPU is present with `auto`."""
    exact_backend: ExactBackend = "auto"
    """Exact search: `faiss` (faiss-gpu on CUDA when faiss has GPU support), `torch` (blockwise top-k from
    `kernels.topk`), or `auto` = faiss on the CPU, faiss-gpu or else torch on CUDA."""

    def __post_init__(self) -> None:
        _check_choice("index.type", self.type, ("flat", "ivf_flat", "ivf_pq", "hnsw"))
        _check_choice("index.metric", self.metric, ("cosine", "l2"))
        _check_device("index.device", self.device)
        _check_choice("index.exact_backend", self.exact_backend, ("auto", "faiss", "torch"))
        positive = {
            "pq_m": self.pq_m,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "refine_factor": self.refine_factor,
            "train_min_vectors": self.train_min_vectors,
            "snapshot_every_records": self.snapshot_every_records,
            "snapshot_every_bytes": self.snapshot_every_bytes,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"index.{name}={value} must be positive")
        if self.nlist < 0:
            raise ConfigError(f"index.nlist={self.nlist} must be 0 (automatic) or a positive count")
        if not 1 <= self.pq_nbits <= 16:
            raise ConfigError(f"index.pq_nbits={self.pq_nbits} must be 1..16 (8 is usual)")
        if not 0.0 <= self.exact_filter_fraction <= 1.0:
            raise ConfigError(f"index.exact_filter_fraction={self.exact_filter_fraction} must be in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything embedserve needs, one section per subsystem."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The model."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding and preprocessing."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Batching inside the engine (offline jobs)."""
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    """Dynamic batching across server requests."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The gRPC server."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """The vector index (collections, search, durability)."""
    data_dir: str = "./var/embedserve"
    """Where collections, logs and snapshots live."""


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn a TOML or environment value into the annotated type, with an error that names the key."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return str(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean; use true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be an integer")
        try:
            return int(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}={value!r} must be an integer") from e
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}={value!r} must be a number") from e
    if annotation is str:
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple):
            return tuple(str(part) for part in value)
        raise ConfigError(f"{name}={value!r} must be a list (TOML) or comma-separated names (environment)")
    return value


def _build(cls: type[Any], values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting {prefix}{key}; known: {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{key} must be a table of settings")
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def _section_names() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    sections = _section_names()
    root_fields = {f.name for f in dataclasses.fields(Config)} - set(sections)
    values: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if rest in root_fields:
            values[rest] = raw
            continue
        section, _, key = rest.partition("_")
        if section in sections and key:
            field_names = {f.name for f in dataclasses.fields(sections[section])}
            if key not in field_names:
                raise ConfigError(
                    f"environment variable {name} names no setting; known in [{section}]: "
                    f"{', '.join(sorted(field_names))}"
                )
            values.setdefault(section, {})[key] = raw
    return values


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _unflatten(overrides: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, dot, key = dotted.partition(".")
        if dot:
            nested.setdefault(section, {})[key] = value
        else:
            nested[section] = value
    return nested


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a `Config` from a TOML file, the environment and flag overrides (`{"decode.backend": "pillow"}`).

    Overrides whose value is None are ignored, so unset flags fall through to lower layers.
    """
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            with file.open("rb") as handle:
                values = tomllib.load(handle)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {file} does not exist; pass an existing TOML file or none") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {file} is not valid TOML: {e}") from e
    values = _merge(values, _from_env(env if env is not None else {}))
    values = _merge(values, _unflatten(overrides or {}))
    return _build(Config, values, "")
