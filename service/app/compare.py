"""The studies' comparisons as one use case: embed a labelled image directory under a grid of preprocessing and
backbone choices, then judge every embedding by K-means against the class folders and by a linear probe.

    grid = CompareGrid(backbones=("efficientnet_lite0", "efficientnet_lite2"), resizes=("letterbox",),
                       pads=("zero", "white", "edge"), features=("cnn", "raw"))
    table = run_compare(Path("tests/data/oct-sample"), grid, CompareOptions(folds=4), base=cfg)
    for row in table.rows: print(row.setting.name, row.kmeans["accuracy"], row.probe_accuracy)

Each setting is embedded once (one `Engine` per setting, built from `base` with the setting's model, resize and
pad) and its vectors serve every metric; they are dropped after their row unless `keep_vectors`. The judging is the
code `embedserve cluster` and `embedserve probe` run (`cluster_items`, `probe_items`), not a copy of it:

- K-means with k = the number of classes, scored by Hungarian accuracy, NMI and ARI (`--seeds N`: the mean over
  seeds `seed .. seed+N-1`);
- the cross-validated logistic-regression probe (folds seeded the same way), optionally grouped by a regex on the
  key (a patient never straddles folds).

`raw` is the pixel baseline of `cluster/probe --features raw`: each file in grayscale, squashed to
`raw_size`², scaled to [0, 1]; K-means sees its first `raw_pca` principal components (as `cluster --features raw`
does), the probe every pixel (as `probe --features raw` does). It does not depend on the backbone, resize or pad, so
a grid has at most one raw row.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from service.app.analysis import cluster_items, probe_items
from service.config import Config, PadMode, ResizePolicy
from service.errors import ConfigError, InvalidRequestError
from service.types import BackendName, Classifier, ClusterParams, FetchedItems, ProbeQuery

if TYPE_CHECKING:
    from service.jobs.embed_dir import FileItem

logger = logging.getLogger(__name__)

Features = Literal["cnn", "raw"]
FEATURES: tuple[Features, ...] = ("cnn", "raw")
RESIZES: tuple[ResizePolicy, ...] = ("squash", "letterbox")
PADS: tuple[PadMode, ...] = ("zero", "white", "edge")
KMEANS_BACKENDS = ("auto", "cuml", "torch", "faiss", "sklearn")
TORCHSCRIPT_PREFIX = "torchscript:"
LABEL = "label"
"""The attribute that holds each image's class (its parent folder), as `embedserve embed` names it."""

Progress = Callable[[str], None]
"""Receives one line of progress (the CLI writes it to stderr)."""


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One embedding of the grid: CNN features of a backbone under a resize policy (and pad), or raw pixels."""

    features: Features
    """`cnn`: the backbone's embedding; `raw`: the grayscale pixel baseline."""
    backbone: str | None = None
    """Registry name or `torchscript:PATH` (None for raw)."""
    resize: ResizePolicy | None = None
    """`squash` or `letterbox` (None for raw)."""
    pad: PadMode | None = None
    """Letterbox padding (None for squash and raw: it does not apply)."""

    @property
    def name(self) -> str:
        """A short label for tables and progress, e.g. `efficientnet_lite0 letterbox/edge` or `raw pixels`."""
        if self.features == "raw":
            return "raw pixels"
        backbone = self.backbone or ""
        if backbone.startswith(TORCHSCRIPT_PREFIX):
            backbone = TORCHSCRIPT_PREFIX + Path(backbone[len(TORCHSCRIPT_PREFIX) :]).name
        how = f"{self.resize}/{self.pad}" if self.resize == "letterbox" else str(self.resize)
        return f"{backbone} {how}"


@dataclass(frozen=True, kw_only=True)
class CompareGrid:
    """The choices to cross. Values are de-duplicated in order; settings that do not differ are one row (squash
    ignores the pad; raw pixels ignore backbone, resize and pad)."""

    backbones: tuple[str, ...] = ("efficientnet_lite0",)
    """Registry names (`efficientnet_lite0`, `efficientnet_lite2`) or `torchscript:PATH`."""
    resizes: tuple[ResizePolicy, ...] = ("squash",)
    """Resize policies of the CNN rows."""
    pads: tuple[PadMode, ...] = ("zero",)
    """Letterbox paddings (used only with `letterbox` in `resizes`)."""
    features: tuple[Features, ...] = ("cnn",)
    """`cnn`, `raw` or both."""

    def __post_init__(self) -> None:
        for name, attr, choices in (
            ("features", "features", FEATURES),
            ("resize", "resizes", RESIZES),
            ("pad", "pads", PADS),
        ):
            values = getattr(self, attr)
            if not values:
                raise ConfigError(f"the {name} list is empty; give at least one of {', '.join(choices)}")
            bad = [v for v in values if v not in choices]
            if bad:
                raise ConfigError(f"{name} {', '.join(map(repr, bad))} is not one of {', '.join(choices)}")
            object.__setattr__(self, attr, _unique(values))
        if "cnn" in self.features and not self.backbones:
            raise ConfigError(
                "the backbone list is empty; give efficientnet_lite0, efficientnet_lite2 or torchscript:PATH"
            )
        if any(not b.strip() for b in self.backbones):
            raise ConfigError("a backbone name is empty (a stray comma?); list names separated by commas")
        object.__setattr__(self, "backbones", _unique([b.strip() for b in self.backbones]))
        if len(self.pads) > 1 and "letterbox" not in self.resizes:
            raise ConfigError(
                f"pads {', '.join(self.pads)} only apply to letterbox resizing: add letterbox to the resize list"
            )

    def settings(self) -> list[Setting]:
        """Every distinct setting, CNN rows first (backbone, then resize, then pad), the raw row last."""
        out: list[Setting] = []
        if "cnn" in self.features:
            for backbone in self.backbones:
                for resize in self.resizes:
                    pads: tuple[PadMode | None, ...] = self.pads if resize == "letterbox" else (None,)
                    out += [Setting(features="cnn", backbone=backbone, resize=resize, pad=pad) for pad in pads]
        if "raw" in self.features:
            out.append(Setting(features="raw"))
        return out


@dataclass(frozen=True, kw_only=True)
class CompareOptions:
    """How every setting is judged."""

    seed: int = 0
    """First seed of K-means and of the probe's folds."""
    seeds: int = 1
    """Seeds per setting (`seed`, `seed+1`, ...); the table shows the means."""
    folds: int = 5
    """Cross-validation folds of the probe (lowered to what the smallest class or the groups allow)."""
    group_pattern: str | None = None
    """Regex on the key whose first group (else the match) is the group kept on one side of each split."""
    classifier: Classifier = "logreg"
    """Probe classifier: the logistic-regression linear probe, or kNN."""
    cluster_backend: BackendName = "auto"
    """Where K-means runs (`auto`: GPU first, else FAISS; `sklearn`, `faiss`, `torch`, `cuml`)."""
    raw_size: int = 64
    """Raw pixels: side of the downscaled grayscale image."""
    raw_pca: int = 16
    """Raw pixels: principal components K-means sees (0 = every pixel); the probe always sees every pixel."""
    keep_vectors: bool = False
    """Keep each row's vectors (`Row.vectors`); otherwise they are dropped once the row is judged."""

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"seeds={self.seeds}: give 1 or more")
        if self.folds < 2:
            raise ConfigError(f"folds={self.folds}: cross-validation needs at least 2")
        if self.raw_size < 2:
            raise ConfigError(f"raw_size={self.raw_size}: give a side of at least 2 pixels (e.g. 64)")
        if self.raw_pca < 0:
            raise ConfigError(f"raw_pca={self.raw_pca}: give 0 (every pixel) or a number of components")
        if self.cluster_backend not in KMEANS_BACKENDS:
            raise ConfigError(f"cluster_backend={self.cluster_backend!r} is not one of {', '.join(KMEANS_BACKENDS)}")
        if self.classifier not in ("logreg", "knn"):
            raise ConfigError(f"classifier={self.classifier!r} is not one of logreg, knn")
        if self.group_pattern is not None:
            try:
                re.compile(self.group_pattern)
            except re.error as e:
                raise ConfigError(f"group pattern {self.group_pattern!r} is not a valid regex: {e}") from e


@dataclass(slots=True)
class Row:
    """What one setting gave."""

    setting: Setting
    dim: int
    """Dimension of the features (before K-means' PCA for raw)."""
    n: int
    """Images embedded (and judged)."""
    failed: list[str]
    """Keys of the images that could not be embedded (left out of this row)."""
    seconds: float
    """Time to embed (or read, for raw) the images, model load excluded."""
    kmeans: dict[str, float]
    """Mean over seeds of `accuracy` (Hungarian), `nmi` and `ari`."""
    kmeans_per_seed: list[dict[str, float]]
    kmeans_backend: str
    probe_accuracy: float
    """Mean over seeds of the probe's cross-validated accuracy."""
    probe_per_seed: list[float]
    probe_folds: int
    """Folds the probe actually used."""
    model: str = ""
    """What ran: backbone name, runtime and precision (empty for raw)."""
    vectors: np.ndarray | None = None
    """The features (only with `keep_vectors`)."""
    keys: list[str] = field(default_factory=list)
    """The keys of `vectors`' rows (only with `keep_vectors`)."""

    @property
    def images_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class CompareTable:
    """Every row of a grid over one directory."""

    root: str
    images: int
    classes: dict[str, int]
    """Images per class (folder)."""
    options: CompareOptions
    grouped_by: str | None
    chance: float
    """The probe's chance level: the share of the largest class."""
    rows: list[Row]


def check_backbones(backbones: Sequence[str]) -> None:
    """Refuse unknown backbone names and missing TorchScript files before any model is loaded (ConfigError)."""
    from service.embedding.backbone import available_backbones

    known = available_backbones()
    for name in backbones:
        if name.startswith(TORCHSCRIPT_PREFIX):
            path = Path(name[len(TORCHSCRIPT_PREFIX) :])
            if not path.is_file():
                raise ConfigError(f"backbone {name}: {path} is not a file; give the path of a TorchScript model")
        elif name not in known:
            raise ConfigError(f"backbone {name!r} is unknown; use one of {', '.join(known)} or torchscript:PATH")


def labelled_images(root: Path) -> list[FileItem]:
    """The images under `root` with their class folder as label (the walk `embedserve embed` does)."""
    from service.jobs.embed_dir import find_images

    if not root.is_dir():
        why = "" if root.exists() else " (it does not exist)"
        raise InvalidRequestError(f"{root} is not a directory{why}; pass the directory that holds the class folders")
    items = find_images(root)
    if not items:
        raise InvalidRequestError(f"no images under {root}")
    loose = [item.key for item in items if not item.label]
    if loose:
        raise InvalidRequestError(
            f"{len(loose)} images are not in a class folder ({', '.join(loose[:3])}); compare needs "
            f"{root}/<class>/<image>, the folder name being the label"
        )
    classes = {item.label for item in items}
    if len(classes) < 2:
        raise InvalidRequestError(f"{root} has one class folder ({', '.join(map(str, classes))}); give at least two")
    return items


def key_groups(keys: Sequence[str], pattern: str) -> list[str]:
    """Each key's group: the first group of `pattern`'s first match (the whole match when it has no group)."""
    regex = re.compile(pattern)
    out = []
    for key in keys:
        m = regex.search(key)
        if m is None:
            raise InvalidRequestError(f"group pattern {pattern!r} does not match key {key!r}")
        out.append(m.group(1) if m.groups() else m.group(0))
    return out


def run_compare(
    root: Path,
    grid: CompareGrid,
    options: CompareOptions | None = None,
    *,
    base: Config | None = None,
    progress: Progress | None = None,
) -> CompareTable:
    """Embed the labelled images under `root` once per setting of `grid` and judge each (see the module docstring).

    `base` supplies everything the grid does not set (device, runtime, precision, threads, batch size, decoder).
    Bad grid values, an unknown backbone, a directory without class folders raise before any model is loaded.
    """
    options = options or CompareOptions()
    base = base or Config()
    say = progress or (lambda line: None)
    if "cnn" in grid.features:
        check_backbones(grid.backbones)
    items = labelled_images(root)
    keys = [item.key for item in items]
    groups = key_groups(keys, options.group_pattern) if options.group_pattern else None
    group_of = dict(zip(keys, groups, strict=True)) if groups is not None else {}
    classes = Counter(str(item.label) for item in items)
    settings = grid.settings()
    grouped_by = f"pattern {options.group_pattern}" if options.group_pattern else None
    say(
        f"{len(items)} images in {len(classes)} classes under {root}; {len(settings)} settings, "
        f"{options.seeds} seed{'s' if options.seeds > 1 else ''} each"
    )
    rows: list[Row] = []
    for i, setting in enumerate(settings, start=1):
        tag = f"[{i}/{len(settings)}] {setting.name}"
        if setting.features == "raw":
            say(f"{tag}: reading pixels ({options.raw_size}x{options.raw_size} grayscale)")
            features = _raw(items, options)
        else:
            say(f"{tag}: loading the model")
            features = _embed(items, _config_for(base, setting))
            say(f"{tag}: {len(features.items.keys)} embedded in {features.seconds:.1f} s ({features.model})")
            for key in features.failed[:5]:
                say(f"{tag}: could not embed {key}; left out")
        row_groups = [group_of[k] for k in features.items.keys] if groups is not None else None
        rows.append(_judge(setting, features, row_groups, grouped_by, options))
        r = rows[-1]
        say(
            f"{tag}: K-means accuracy {r.kmeans['accuracy']:.3f}, NMI {r.kmeans['nmi']:.3f}, "
            f"ARI {r.kmeans['ari']:.3f}; probe {r.probe_accuracy:.3f}"
        )
    return CompareTable(
        root=str(root),
        images=len(items),
        classes=dict(sorted(classes.items())),
        options=options,
        grouped_by=grouped_by,
        chance=max(classes.values()) / len(items),
        rows=rows,
    )


def _config_for(base: Config, setting: Setting) -> Config:
    backbone = dataclasses.replace(base.backbone, model=str(setting.backbone))
    decode = dataclasses.replace(base.decode, resize=setting.resize or "squash", pad=setting.pad or base.decode.pad)
    return dataclasses.replace(base, backbone=backbone, decode=decode)


@dataclass(slots=True)
class _Features:
    items: FetchedItems
    seconds: float
    failed: list[str] = field(default_factory=list)
    model: str = ""


def _attributes(item: FileItem) -> dict[str, str]:
    return {LABEL: str(item.label), "path": str(item.path)}


def _embed(items: Sequence[FileItem], cfg: Config) -> _Features:
    from service.embedding.engine import Engine

    with Engine.from_config(cfg) as engine:
        info = engine.info
        model = f"{info.backbone}, {info.runtime or 'torch'} {info.precision} on {info.device}"
        keys: list[str] = []
        vectors: list[np.ndarray] = []
        attributes: list[dict[str, str]] = []
        failed: list[str] = []
        started = time.perf_counter()
        for result in engine.embed_iter(items):
            if result.outcome.vector is None:
                failed.append(result.item.key)
                continue
            keys.append(result.item.key)
            vectors.append(result.outcome.vector)
            attributes.append(_attributes(result.item))
        seconds = time.perf_counter() - started
    if not vectors:
        raise InvalidRequestError(f"no image could be embedded with {cfg.backbone.model} (first: {failed[0]})")
    return _Features(FetchedItems(keys, np.stack(vectors).astype(np.float32), attributes), seconds, failed, model)


def _raw(items: Sequence[FileItem], options: CompareOptions) -> _Features:
    from service.analysis.evaluate import raw_pixel_features

    started = time.perf_counter()
    try:
        x = raw_pixel_features([item.path for item in items], size=options.raw_size, pca_dim=None)
    except OSError as e:
        raise InvalidRequestError(f"raw pixels: cannot read an image: {e}") from e
    seconds = time.perf_counter() - started
    return _Features(FetchedItems([item.key for item in items], x, [_attributes(item) for item in items]), seconds)


def _judge(
    setting: Setting, features: _Features, groups: list[str] | None, grouped_by: str | None, options: CompareOptions
) -> Row:
    items = features.items
    k = len({a[LABEL] for a in items.attributes})
    pca = options.raw_pca if setting.features == "raw" else None  # raw: K-means on PCA, as `cluster` does
    per_seed: list[dict[str, float]] = []
    probe: list[float] = []
    backend, folds = "", 0
    for seed in range(options.seed, options.seed + options.seeds):
        params = ClusterParams(algorithm="kmeans", k=k, seed=seed, backend=options.cluster_backend, pca_dim=pca)
        result = cluster_items(items, params, ground_truth_attribute=LABEL).result
        backend = result.backend
        per_seed.append({m: float(result.metrics[m]) for m in ("accuracy", "nmi", "ari")})
        query = ProbeQuery(
            collection="", target_attribute=LABEL, classifier=options.classifier, folds=options.folds, seed=seed
        )
        p = probe_items(items, query, groups=groups, group_name=grouped_by)
        probe.append(p.accuracy)
        folds = p.folds
    mean = {m: float(np.mean([s[m] for s in per_seed])) for m in ("accuracy", "nmi", "ari")}
    return Row(
        setting=setting,
        dim=int(items.vectors.shape[1]),
        n=len(items.keys),
        failed=features.failed,
        seconds=features.seconds,
        kmeans=mean,
        kmeans_per_seed=per_seed,
        kmeans_backend=backend,
        probe_accuracy=float(np.mean(probe)),
        probe_per_seed=probe,
        probe_folds=folds,
        model=features.model,
        vectors=items.vectors if options.keep_vectors else None,
        keys=list(items.keys) if options.keep_vectors else [],
    )
