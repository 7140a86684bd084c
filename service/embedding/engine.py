"""The engine facade: bytes in, L2-normalised embeddings out.

It wires decode -> preprocess -> backbone -> normalise and is the only module that knows all of
them. It is built from a `Config` alone (`Engine.from_config`), holds no global state, and can be
constructed inside any worker process.

Two stages, so callers can overlap them:
- `prepare(datas)`: decode and preprocess (CPU-heavy, thread-safe, runs on decode workers);
- `run(prepared)`: the forward pass and normalisation (call from one owner thread).
`embed` does both for one list; `embed_iter` pipelines a stream, decoding ahead while the model runs.

On a GPU each thread queues its work on its own CUDA stream (`service.devices.ThreadStreams`): the nvJPEG / DALI
decode and the preprocess kernel of the next batch overlap the forward pass of this one. `prepare` returns once its
stream has finished the batch (its thread waits on an event; the GPU does not stop), so a prepared batch can be read
from any thread; `run` makes its stream wait for the default stream and marks the batch as in use on its stream.

The warm-up (`backbone.warmup`) runs the model at batch sizes 1 and 8 and launches the preprocess kernel for the
configured size, resize policy and pad (`kernels.preprocess.warmup`), so neither cuDNN's algorithm search nor
Triton's compile lands on the first request.
"""

from __future__ import annotations

import gc
import logging
import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

import service
from kernels.normalize import l2_normalize
from kernels.preprocess import preprocess_batch
from kernels.preprocess import warmup as warm_preprocess
from service.config import Config
from service.devices import ThreadStreams
from service.embedding.backbone import Backbone, resolve_device
from service.embedding.decode import DecodeOutcome, Decoder, create_decoder, image_error, probe
from service.embedding.faults import is_fatal
from service.embedding.formats import jpeg_frame, sniff_format
from service.embedding.memory import malloc_trim
from service.embedding.runtimes import cache_root, plan_threads, resolve_runtime
from service.errors import ImageError
from service.types import Embedded, EmbedOutcome, ItemT, ModelInfo, load_item

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PreparedBatch:
    """Decoded, preprocessed images ready for the backbone, plus the errors of those that failed."""

    size: int
    batch: torch.Tensor | None
    """(M, 3, H, W) for the M images that decoded, in input order."""
    ok_positions: list[int]
    """Input positions of the rows of `batch`."""
    errors: dict[int, ImageError]
    """Input position -> error, for the images that failed."""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def header_pixels(data: bytes, max_pixels: int, formats: tuple[str, ...]) -> int:
    """Width x height that `data` announces, without decoding it: what the image will cost in memory.

    0 for bytes that will fail before any pixel is decoded (no readable header, a format not in `formats`, more
    than `max_pixels`). JPEG and PNG headers are read directly (a few microseconds, safe on the event loop);
    other formats through Pillow's header parser (`decode.probe`, tens of microseconds).
    """
    size: tuple[int, int] | None = None
    if data[:3] == b"\xff\xd8\xff":
        frame = jpeg_frame(data)
        size = (frame.width, frame.height) if frame is not None else None
    elif data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        size = struct.unpack_from(">II", data, 16)
    if size is None:
        try:
            header = probe(data, max_pixels, formats)
        except ImageError:
            return 0
        size = (header.width, header.height)
    pixels = size[0] * size[1]
    return pixels if pixels <= max_pixels else 0


class Engine:
    """Decode, preprocess, embed. Build with `Engine.from_config(cfg)`; `close()` when done."""

    def __init__(self, cfg: Config, backbone: Backbone, decoder: Decoder, decode_pool: ThreadPoolExecutor) -> None:
        self.cfg = cfg
        self.backbone = backbone
        self.decoder = decoder
        self._decode_pool = decode_pool
        # Separate from the decode pool: a prepare task waits on per-image decode tasks, so sharing
        # one pool could leave every worker waiting on work that has no thread left to run it.
        self._prepare_pool = ThreadPoolExecutor(
            max_workers=cfg.engine.prefetch_batches, thread_name_prefix="embedserve-prepare"
        )
        self._forward_lock = threading.Lock()
        self._streams = ThreadStreams(backbone.device)
        """A CUDA stream per thread that prepares or runs batches (nothing on the CPU)."""
        spec = backbone.spec
        self.info = ModelInfo(
            backbone=spec.name,
            embedding_dim=spec.embedding_dim,
            input_size=spec.input_size,
            precision=backbone.precision,
            device=str(backbone.device),
            decode_backend=f"{decoder.name}" + ("-gpu" if decoder.device.type == "cuda" else "-cpu"),
            resize=cfg.decode.resize,
            pad=cfg.decode.pad,
            version=service.__version__,
            runtime=backbone.runtime_name,
        )

    @classmethod
    def from_config(cls, cfg: Config) -> Engine:
        """Build the backbone and the decode backend the config asks for, and warm the model up."""
        b = cfg.backbone
        device = resolve_device(b.device)
        runtime = resolve_runtime(b.runtime, device)
        plan = plan_threads(
            budget=cfg.engine.cpu_threads,
            decode_workers=cfg.decode.workers,
            inference_threads=b.threads,
            streams=b.streams,
            runtime=runtime,
            device=device,
        )
        backbone = Backbone.create(
            b.model,
            device=b.device,
            amp_dtype=b.amp_dtype,
            channels_last=b.channels_last,
            input_size=b.input_size,
            optimize=b.optimize,
            runtime=runtime,
            cpu_precision=b.cpu_precision,
            threads=plan.inference_threads,
            streams=plan.streams,
            cache_dir=cache_root(cfg.data_dir),
        )
        if device.type == "cpu" and runtime != "torch":
            torch.set_num_threads(1)  # torch only preprocesses here: its threads would compete with inference
        logger.info("thread plan: %s; runtime %s", plan, backbone.runtime.describe())
        workers = plan.decode_workers
        decode_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embedserve-decode")
        decoder = create_decoder(cfg.decode, backbone.device, decode_pool, max_batch=cfg.engine.batch_size)
        engine = cls(cfg, backbone, decoder, decode_pool)
        if b.warmup:
            try:
                backbone.warmup((1, min(8, cfg.engine.batch_size)))
                engine.warm_preprocess()
            except BaseException:
                engine.close()
                raise
        logger.info("engine ready: %s", engine.info)
        return engine

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.backbone.spec.input_size
        return size, size

    def warm_preprocess(self) -> int:
        """Launch the preprocess kernel as this engine's batches will, so Triton compiles it now (see
        `kernels.preprocess.warmup`); the launches made, 0 where the plain-torch reference runs (the CPU)."""
        spec = self.backbone.spec
        with self._streams.use():
            launches = warm_preprocess(
                self.backbone.device, self.input_size, policy=self.cfg.decode.resize, pad=self.cfg.decode.pad,
                mean=spec.mean, std=spec.std,
            )  # fmt: skip
        if launches:
            logger.info("preprocess kernel warmed up: %d launches on %s", launches, self.backbone.device)
        return launches

    def prepare(self, datas: Sequence[bytes | ImageError]) -> PreparedBatch:
        """Decode and preprocess a list of encoded images (any length; failures are kept per image).

        An `ImageError` in place of bytes (say, a file that could not be read) passes through as that image's error.
        """
        with self._streams.use() as stream:
            return self._prepare(datas, stream)

    def _prepare(self, datas: Sequence[bytes | ImageError], stream: object) -> PreparedBatch:
        to_decode = [i for i, d in enumerate(datas) if not isinstance(d, ImageError)]
        decoded: list[torch.Tensor | ImageError] = list(datas)  # type: ignore[arg-type]  # bytes replaced below
        outs = self._decode([datas[i] for i in to_decode])  # type: ignore[misc]
        if len(outs) != len(to_decode):
            raise RuntimeError(f"decoder returned {len(outs)} results for {len(to_decode)} images")
        for i, out in zip(to_decode, outs, strict=True):
            decoded[i] = out
        errors: dict[int, ImageError] = {}
        images: list[torch.Tensor] = []
        positions: list[int] = []
        for i, out in enumerate(decoded):
            if isinstance(out, ImageError):
                errors[i] = out
            else:
                images.append(out)
                positions.append(i)
        batch = None
        if images:
            spec = self.backbone.spec
            try:
                batch = preprocess_batch(
                    images,
                    self.input_size,
                    policy=self.cfg.decode.resize,
                    pad=self.cfg.decode.pad,
                    mean=spec.mean,
                    std=spec.std,
                )
            finally:
                # Before any other thread or stream reads the batch, and while `images` still holds the decoded
                # tensors (those decoded on other threads' streams must not be reused while the kernel reads them).
                self._streams.finish(stream)
        return PreparedBatch(size=len(datas), batch=batch, ok_positions=positions, errors=errors)

    def pixels(self, data: bytes) -> int:
        """Decoded pixels of one encoded image, from its header (0 when it will fail before decoding); the
        batcher's `max_batch_pixels` budget counts these."""
        return header_pixels(data, self.cfg.decode.max_pixels, self.cfg.decode.formats)

    def release_memory(self) -> None:
        """Give back what is cached after running out of memory: unreachable objects, the CUDA caching
        allocator's free blocks, glibc's free heap pages."""
        gc.collect()
        if self.backbone.device.type == "cuda":
            torch.cuda.empty_cache()
        malloc_trim()

    def _decode(self, datas: list[bytes]) -> list[DecodeOutcome]:
        """The decoder's outcomes; should it raise all the same (a bug), each image is decoded alone, so the
        exception stays the error of the image that caused it. Fatal device errors propagate."""
        try:
            return self.decoder.decode(datas, self.input_size, self.cfg.decode.resize)
        except Exception as e:
            if is_fatal(e):
                raise
            if len(datas) == 1:
                return [image_error(e, sniff_format(datas[0]) or "image", stage="data")]
            logger.warning("decoder %s raised %s on %d images; decoding them one by one", self.decoder.name,
                           type(e).__name__, len(datas))  # fmt: skip
            return [self._decode([data])[0] for data in datas]

    def run(self, prepared: PreparedBatch) -> list[EmbedOutcome]:
        """Forward pass and L2 normalisation; one outcome per input of `prepare`, in order."""
        outcomes = [EmbedOutcome() for _ in range(prepared.size)]
        for i, error in prepared.errors.items():
            outcomes[i].error = error
        if prepared.batch is not None:
            vectors = np.empty((0, self.info.embedding_dim), dtype=np.float32)
            chunk = self.cfg.engine.batch_size
            parts: list[np.ndarray] = []
            with self._forward_lock, self._streams.use() as stream:
                self._streams.adopt(prepared.batch, stream)
                for start in range(0, prepared.batch.shape[0], chunk):
                    features = self.backbone.forward(prepared.batch[start : start + chunk])
                    parts.append(l2_normalize(features, torch.float32).cpu().numpy())
            vectors = np.concatenate(parts) if parts else vectors
            if vectors.shape[0] != len(prepared.ok_positions):
                raise RuntimeError(f"backbone returned {vectors.shape[0]} rows for {len(prepared.ok_positions)} images")
            for row, i in enumerate(prepared.ok_positions):
                outcomes[i].vector = vectors[row]
        return outcomes

    def embed(self, datas: Sequence[bytes]) -> list[EmbedOutcome]:
        """Embed a list of encoded images; each gets a vector or its own error."""
        outcomes: list[EmbedOutcome] = []
        for start in range(0, len(datas), self.cfg.engine.batch_size):
            outcomes.extend(self.run(self.prepare(datas[start : start + self.cfg.engine.batch_size])))
        return outcomes

    def embed_iter(self, items: Iterable[ItemT]) -> Iterator[Embedded[ItemT]]:
        """Embed a stream of items with `.load()`, loading and decoding up to `prefetch_batches` ahead of the model.

        Yields every item with its outcome, in input order. Memory is bounded by the prefetch depth.
        """
        batch_size = self.cfg.engine.batch_size
        pending: deque[tuple[list[ItemT], Future[PreparedBatch]]] = deque()
        iterator = iter(items)

        def submit_next() -> bool:
            chunk: list[ItemT] = []
            for item in iterator:
                chunk.append(item)
                if len(chunk) == batch_size:
                    break
            if not chunk:
                return False
            pending.append((chunk, self._prepare_pool.submit(self._load_and_prepare, chunk)))
            return True

        try:
            while len(pending) < self.cfg.engine.prefetch_batches and submit_next():
                pass
            while pending:
                chunk, future = pending.popleft()
                prepared = future.result()
                submit_next()
                for item, outcome in zip(chunk, self.run(prepared), strict=True):
                    yield Embedded(item, outcome)
        finally:
            for _, future in pending:
                future.cancel()

    def memory_bytes(self) -> tuple[int, int]:
        """GPU memory (allocated, reserved) on the engine's device; (0, 0) on the CPU."""
        device = self.backbone.device
        if device.type != "cuda":
            return 0, 0
        return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)

    def _load_and_prepare(self, chunk: list[ItemT]) -> PreparedBatch:
        return self.prepare([load_item(item) for item in chunk])

    def close(self) -> None:
        """Stop the decode workers and release the backbone's runtime (the engine cannot embed afterwards)."""
        self._prepare_pool.shutdown(wait=True, cancel_futures=True)
        self._decode_pool.shutdown(wait=True, cancel_futures=True)
        self.backbone.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
