"""Directory jobs on Ray Data: the local job's walk, resume, parts and failures, with the embedding spread over a
cluster.

The driver walks the directory and skips the keys already written exactly as `run_embed_job` does (it *is*
`run_embed_job`, given a `RayEmbedder` in place of the engine), so the Parquet file, its metadata, the failures CSV,
the atomic part files and the resume rules are the local job's. Only `embed_iter` differs: the keys still to do
become a Ray dataset, `map_batches` sends them to a pool of actors that each build the embedder once (an `Engine`
from the config alone, or a `RemoteEmbedder` that streams to a server's index), and the results stream back to
the driver, which writes them. Every node must see the files at the same paths (a shared file system).

Faults: Ray restarts an actor that dies and retries its batch elsewhere; a result that comes twice is written
once, and a key that never comes back fails the job (after what did come back is written), so re-running the same
command finishes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import ray
import ray.data

from service.config import Config
from service.errors import ConfigError, ImageError
from service.jobs.embed_dir import Embedder, FileItem, JobError
from service.types import Embedded, EmbedOutcome, ModelInfo
from service.wire.convert import IMAGE_ERRORS

logger = logging.getLogger(__name__)

LOCAL = "local"
"""The `address` that starts a Ray instance on this machine for the job (and stops it afterwards)."""

_MAX_BLOCK_ROWS = 8192
"""Most rows per block of the input dataset (a block is one task of an actor, and one object in the store)."""
_BLOCKS_PER_ACTOR = 4
"""Input blocks per actor at least, so that every actor gets work and a lost task is a small part of the job."""

_RESULT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("vector", pa.binary(), nullable=True),
        pa.field("reason", pa.string(), nullable=True),
        pa.field("message", pa.string(), nullable=True),
        pa.field("node", pa.string(), nullable=False),
    ]
)
"""What an actor returns per image: the float32 vector's bytes, or the reason and message of its error."""


@dataclass(frozen=True, kw_only=True)
class RayJobOptions:
    """How a directory job runs on Ray."""

    address: str = LOCAL
    """`local` starts Ray here for the job; otherwise a cluster address (`ray://HOST:10001`, `HOST:6379`)."""
    rows_per_task: int = 0
    """Images per `map_batches` call; 0 = four engine batches (so an actor decodes ahead while its model runs)."""
    actors: int = 0
    """Actors in the pool; 0 = one per GPU on a GPU cluster, else as many as the nodes' CPUs hold (`plan_actors`)."""
    cpus_per_actor: int = 0
    """CPUs each actor reserves; 0 = the smallest node's CPU count (CPU actors), or its CPUs per GPU (GPU actors)."""
    local_cpus: int = 0
    """CPUs of a `local` instance; 0 = all of this machine's."""
    object_store_bytes: int = 0
    """Object store size of a `local` instance; 0 = Ray's default (30% of memory)."""

    def __post_init__(self) -> None:
        if not self.address:
            raise ConfigError("ray address is empty: pass `local` or a cluster address such as ray://HOST:10001")
        for name in ("rows_per_task", "actors", "cpus_per_actor", "local_cpus", "object_store_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ray {name}={getattr(self, name)} must be 0 (automatic) or positive")


@dataclass(frozen=True, slots=True)
class ActorPlan:
    """The actor pool: how many actors, and what each reserves."""

    actors: int
    num_cpus: int
    num_gpus: int


@dataclass(frozen=True, slots=True)
class NodeResources:
    """What one alive node of the cluster offers."""

    cpus: int
    gpus: int


def plan_actors(nodes: list[NodeResources], *, gpu: bool, options: RayJobOptions) -> ActorPlan:
    """Size the actor pool for `nodes`: one GPU actor per GPU (with `gpu`), else CPU actors that each take a whole
    node (the smallest node's CPU count) so that one model per node uses every core through its own threads."""
    if gpu:
        gpu_nodes = [n for n in nodes if n.gpus > 0]
        if not gpu_nodes:
            raise JobError("backbone.device=cuda but the Ray cluster has no GPU; use --device cpu or add GPU nodes")
        cpus = options.cpus_per_actor or max(1, min(n.cpus // n.gpus for n in gpu_nodes))
        count = sum(n.gpus for n in gpu_nodes)
        return ActorPlan(actors=options.actors or count, num_cpus=cpus, num_gpus=1)
    cpu_nodes = [n for n in nodes if n.cpus > 0]
    if not cpu_nodes:
        raise JobError("the Ray cluster has no node with a CPU to run actors on; add a worker node")
    cpus = options.cpus_per_actor or min(n.cpus for n in cpu_nodes)
    count = sum(n.cpus // cpus for n in cpu_nodes)
    if count == 0:
        raise JobError(f"no node of the Ray cluster has {cpus} CPUs for one actor; lower cpus_per_actor")
    return ActorPlan(actors=options.actors or count, num_cpus=cpus, num_gpus=0)


def alive_nodes() -> list[NodeResources]:
    """The alive nodes of the connected cluster and their CPUs and GPUs."""
    return [
        NodeResources(cpus=int(n["Resources"].get("CPU", 0)), gpus=int(n["Resources"].get("GPU", 0)))
        for n in ray.nodes()
        if n.get("Alive")
    ]


class ClosableEmbedder(Embedder, Protocol):
    """An embedder an actor owns: the job interface plus `close()`."""

    def close(self) -> None: ...


class EmbedderFactory(Protocol):
    """What an actor is given (pickled) to build its embedder once, from data alone."""

    @property
    def gpu(self) -> bool:
        """Whether each actor needs a GPU."""
        ...

    def open(self, num_cpus: int) -> ClosableEmbedder:
        """Build the embedder inside an actor that reserved `num_cpus` CPUs."""
        ...


@dataclass(frozen=True, kw_only=True)
class EngineFactory:
    """Actors that embed themselves: `Engine.from_config(cfg)` inside each one."""

    cfg: Config
    """The whole config, as the CLI loaded it; the actor reads nothing else."""
    cluster_has_gpu: bool = False
    """Whether the cluster offers GPUs (with `backbone.device=auto`, the actors then take one each)."""

    @property
    def gpu(self) -> bool:
        device = self.cfg.backbone.device
        return device == "cuda" or (device == "auto" and self.cluster_has_gpu)

    def open(self, num_cpus: int) -> ClosableEmbedder:
        from service.embedding.engine import Engine

        cfg = self.cfg
        if cfg.engine.cpu_threads == 0:  # decode and inference share the CPUs the actor reserved, not the machine's
            cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, cpu_threads=num_cpus))
        return Engine.from_config(cfg)


@dataclass(frozen=True, kw_only=True)
class ServerFactory:
    """Actors that stream to a server (`RemoteEmbedder`), which embeds and, with `store`, fills its index."""

    target: str
    """HOST:PORT of the server, reachable from every node."""
    client_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of `RemoteEmbedder` (batch_size, token, tls, root_certificates, store, collection)."""

    @property
    def gpu(self) -> bool:
        return False

    def open(self, num_cpus: int) -> ClosableEmbedder:
        from service.client.remote import RemoteEmbedder

        return RemoteEmbedder(self.target, **self.client_options)


class EmbedActor:
    """A Ray Data actor: builds its embedder once, then embeds each batch of `key, path, label` rows."""

    def __init__(self, factory: EmbedderFactory, num_cpus: int) -> None:
        self.embedder = factory.open(num_cpus)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = [batch.column(name).to_pylist() for name in ("key", "path", "label", "attributes")]
        items = [
            FileItem(key=key, path=Path(path), label=label, attributes=json.loads(attributes) if attributes else {})
            for key, path, label, attributes in zip(*columns, strict=True)
        ]
        keys: list[str] = []
        vectors: list[bytes | None] = []
        reasons: list[str | None] = []
        messages: list[str | None] = []
        for result in self.embedder.embed_iter(items):
            keys.append(result.item.key)
            outcome = result.outcome
            if outcome.vector is not None:
                vectors.append(np.asarray(outcome.vector, dtype="<f4").tobytes())
                reasons.append(None)
                messages.append(None)
            else:
                error = outcome.error or ImageError("no vector and no error")
                vectors.append(None)
                reasons.append(error.reason)
                messages.append(error.message)
        if len(keys) != len(items):
            raise RuntimeError(f"embedder returned {len(keys)} results for {len(items)} images")
        return pa.Table.from_arrays(
            [
                pa.array(keys),
                pa.array(vectors, pa.binary()),
                pa.array(reasons),
                pa.array(messages),
                pa.array([self.node] * len(keys)),
            ],
            schema=_RESULT_SCHEMA,
        )


def _model_info(factory: EmbedderFactory, num_cpus: int) -> ModelInfo:
    embedder = factory.open(num_cpus)
    try:
        return embedder.info
    finally:
        embedder.close()


def _error(reason: str, message: str) -> ImageError:
    cls = IMAGE_ERRORS.get(reason)
    if cls is not None:
        return cls(message)
    error = ImageError(message)
    error.reason = reason
    return error


class RayEmbedder:
    """The job interface (`info`, `embed_iter`) of `run_embed_job`, run by a pool of Ray actors.

    Build it with `RayEmbedder.create(factory, options)` inside `ray_session`. `images_by_node` counts the images
    each node embedded (node id -> count) in the last `embed_iter`.
    """

    def __init__(self, factory: EmbedderFactory, info: ModelInfo, plan: ActorPlan, rows_per_task: int) -> None:
        self.factory = factory
        self.info = info
        self.plan = plan
        self.rows_per_task = rows_per_task
        self.images_by_node: dict[str, int] = {}

    @classmethod
    def create(cls, factory: EmbedderFactory, options: RayJobOptions, *, batch_size: int) -> RayEmbedder:
        """Plan the pool for the connected cluster, and learn the model by building one embedder on it."""
        nodes = alive_nodes()
        if isinstance(factory, EngineFactory):
            factory = dataclasses.replace(factory, cluster_has_gpu=any(n.gpus > 0 for n in nodes))
        plan = plan_actors(nodes, gpu=factory.gpu, options=options)
        logger.info(
            "ray: %d actors of %d CPUs and %d GPUs on %d nodes", plan.actors, plan.num_cpus, plan.num_gpus, len(nodes)
        )
        if isinstance(factory, ServerFactory):
            info = _model_info(factory, 1)  # a client call, from the driver
        else:
            probe = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(_model_info)
            info = ray.get(probe.remote(factory, plan.num_cpus))
        return cls(factory, info, plan, options.rows_per_task or 4 * batch_size)

    def embed_iter(self, items: Iterable[FileItem]) -> Iterator[Embedded[FileItem]]:
        """Yield each item with its outcome as the actors finish them (not in input order); each item once."""
        pending = {item.key: item for item in items}
        self.images_by_node = {}
        if not pending:
            return
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job draws its own bar, in images
        rows = min(_MAX_BLOCK_ROWS, max(self.rows_per_task, -(-len(pending) // (_BLOCKS_PER_ACTOR * self.plan.actors))))
        blocks = _input_blocks(list(pending.values()), rows)
        dataset = ray.data.from_arrow(blocks).map_batches(
            EmbedActor,
            fn_constructor_kwargs={"factory": self.factory, "num_cpus": self.plan.num_cpus},
            batch_size=self.rows_per_task,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(self.plan.actors, len(blocks))),  # no idle actors
            num_cpus=self.plan.num_cpus,
            num_gpus=self.plan.num_gpus,
        )
        duplicates = 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            table = typing.cast(pa.Table, batch)
            columns = [table.column(name).to_pylist() for name in ("key", "vector", "reason", "message", "node")]
            for key, vector, reason, message, node in zip(*columns, strict=True):
                item = pending.pop(key, None)
                if item is None:  # a retried batch delivered twice: the first copy was already written
                    duplicates += 1
                    continue
                if vector is not None:
                    outcome = EmbedOutcome(vector=np.frombuffer(vector, dtype="<f4").astype(np.float32))
                    self.images_by_node[node] = self.images_by_node.get(node, 0) + 1
                else:
                    outcome = EmbedOutcome(error=_error(reason, message))
                yield Embedded(item, outcome)
        if duplicates:
            logger.warning("ray: %d results came twice (retried batches); each was written once", duplicates)
        if pending:
            raise JobError(
                f"{len(pending)} images got no result from the Ray job; re-run the same command to embed them"
            )


def _input_blocks(items: list[FileItem], rows: int) -> list[pa.Table]:
    """The items as Arrow tables of `rows` rows, one block each: `key`, `path`, `label` and the extra `attributes`
    (a JSON object, for `--store`)."""
    schema = pa.schema(
        [("key", pa.string()), ("path", pa.string()), ("label", pa.string()), ("attributes", pa.string())]
    )
    blocks = []
    for start in range(0, len(items), rows):
        chunk = items[start : start + rows]
        columns = [
            [i.key for i in chunk],
            [str(i.path) for i in chunk],
            [i.label for i in chunk],
            [json.dumps(i.attributes) if i.attributes else None for i in chunk],
        ]
        blocks.append(pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns], schema=schema))
    return blocks


@contextlib.contextmanager
def ray_session(options: RayJobOptions) -> Iterator[None]:
    """Connect to the cluster of `options.address`, or start a local instance; a connection made here is closed
    here. An already initialised Ray (a test's cluster, a notebook) is used as it is."""
    if ray.is_initialized():
        yield
        return
    if options.address == LOCAL:
        ray.init(
            num_cpus=options.local_cpus or None,
            object_store_memory=options.object_store_bytes or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=options.address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
