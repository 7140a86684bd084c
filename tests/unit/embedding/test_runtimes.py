"""The CPU runtimes (OpenVINO, ONNX Runtime, torch bf16) against the float32 torch path on real images."""

from __future__ import annotations

import io
import platform
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image
from sklearn.cluster import KMeans

from service.analysis.evaluate import hungarian_accuracy
from service.config import load_config
from service.embedding import runtimes
from service.embedding.backbone import Backbone
from service.embedding.decode import PillowDecoder
from service.embedding.engine import Engine
from service.embedding.runtimes import ThreadPlan, openvino_rt, plan_threads, resolve_precision, resolve_runtime
from service.embedding.runtimes.base import RuntimeOptions, check_cpu
from service.errors import ConfigError, ModelError
from service.jobs.files import schema_for
from service.wire.convert import model_info_from_proto, model_info_to_proto

CPU = torch.device("cpu")
COMBOS = [("openvino", "bfloat16"), ("openvino", "float32"), ("onnxruntime", "float32"), ("torch", "bfloat16")]
MIN_COSINE = 0.995
MAX_ACCURACY_SHIFT = 0.03


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    # Engines on a CPU runtime give torch one thread (it only preprocesses); later tests get theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory (and so one compiled-model cache) for the module."""
    return tmp_path_factory.mktemp("data")


def _photos() -> list[bytes]:
    out = []
    for image in (skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def _embed(
    datas: list[bytes], data_dir: Path, runtime: str, precision: str, **extra: object
) -> tuple[np.ndarray, Engine]:
    overrides = {
        "backbone.device": "cpu",
        "backbone.runtime": runtime,
        "backbone.cpu_precision": precision,
        "engine.batch_size": 16,
        "data_dir": str(data_dir),
    } | extra
    engine = Engine.from_config(load_config(env={}, overrides=overrides))
    try:
        outcomes = engine.embed(datas)
    finally:
        engine.close()
    assert all(o.ok for o in outcomes)
    return np.stack([o.vector for o in outcomes if o.vector is not None]), engine


def _kmeans_accuracy(vectors: np.ndarray, labels: list[str]) -> float:
    # On 32 scans one K-means seed alone swings accuracy by +-0.1 (one image is 0.031): average 20 seeds so the
    # comparison measures the embeddings, not the initialisation.
    seeds = range(20)
    return float(
        np.mean([hungarian_accuracy(labels, KMeans(4, n_init=10, random_state=s).fit_predict(vectors)) for s in seeds])
    )


@pytest.fixture(scope="module")
def reference(oct_files: list[Path], data_dir: Path) -> np.ndarray:
    """The float32 torch embeddings of the 32 OCT scans, then the photos."""
    vectors, engine = _embed([f.read_bytes() for f in oct_files] + _photos(), data_dir, "torch", "float32")
    assert (engine.info.runtime, engine.info.precision) == ("torch", "float32")
    return vectors


@pytest.mark.parametrize(("runtime", "precision"), COMBOS)
def test_runtime_keeps_embeddings_and_clusters_of_the_float32_path(
    runtime: str,
    precision: str,
    reference: np.ndarray,
    oct_files: list[Path],
    oct_labels: list[str],
    data_dir: Path,
) -> None:
    if precision == "bfloat16" and not runtimes.cpu_has_bf16():
        pytest.skip("this CPU has neither AMX-BF16 nor AVX512-BF16 (OpenVINO would run float32)")
    vectors, engine = _embed([f.read_bytes() for f in oct_files] + _photos(), data_dir, runtime, precision)
    assert (engine.info.runtime, engine.info.precision) == (runtime, precision)
    cosine = (vectors * reference).sum(axis=1)
    assert cosine.min() >= MIN_COSINE, f"{runtime} {precision}: min cosine {cosine.min():.4f} (photos are the last 4)"
    n = len(oct_files)
    shift = abs(_kmeans_accuracy(vectors[:n], oct_labels) - _kmeans_accuracy(reference[:n], oct_labels))
    assert shift <= MAX_ACCURACY_SHIFT, f"{runtime} {precision}: K-means accuracy moved by {shift:.3f}"


@pytest.mark.parametrize(("runtime", "precision"), COMBOS[:3])
def test_user_torchscript_resnet18_runs_on_every_runtime(runtime: str, precision: str, tmp_path: Path) -> None:
    if precision == "bfloat16" and not runtimes.cpu_has_bf16():
        pytest.skip("this CPU has neither AMX-BF16 nor AVX512-BF16")
    torch.manual_seed(0)
    path = tmp_path / "resnet18.ts"
    torch.jit.script(torchvision.models.resnet18(weights=None).eval()).save(str(path))
    name = f"torchscript:{path}"
    reference = Backbone.create(name, device="cpu", optimize="none")
    other = Backbone.create(name, device="cpu", runtime=runtime, cpu_precision=precision, cache_dir=tmp_path / "c")
    assert other.runtime_name == runtime
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    want, got = reference.forward(x), other.forward(x)
    assert got.shape == want.shape == (4, 1000)
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert cosine.min() >= (MIN_COSINE if precision == "bfloat16" else 0.99999), cosine


def test_openvino_cache_is_reused_and_keyed_by_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = Backbone.create("efficientnet_lite0", device="cpu", runtime="openvino", cache_dir=cache)
    entries = sorted((cache / "openvino").iterdir())
    assert [e.name.split("-")[:3] for e in entries] == [["efficientnet_lite0", "224", "float32"]]
    assert (entries[0] / "model.xml").is_file()

    def no_conversion(*args: object) -> None:
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr(openvino_rt, "_convert", no_conversion)
    again = Backbone.create("efficientnet_lite0", device="cpu", runtime="openvino", cache_dir=cache)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(again.forward(x), first.forward(x))
    with pytest.raises(AssertionError, match="converted again"):
        Backbone.create("efficientnet_lite0", device="cpu", runtime="openvino", input_size=256, cache_dir=cache)


def test_openvino_splits_a_batch_across_streams_in_input_order() -> None:
    one = Backbone.create("efficientnet_lite0", device="cpu", runtime="openvino", threads=2, streams=1)
    two = Backbone.create("efficientnet_lite0", device="cpu", runtime="openvino", threads=2, streams=2)
    x = torch.randn(5, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(two.forward(x), one.forward(x), atol=1e-4, rtol=1e-4)


def test_auto_runtime_and_precision() -> None:
    assert resolve_runtime("auto", torch.device("cuda")) == "torch"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert resolve_runtime("auto", CPU) == ("openvino" if x86 else "torch")
    assert resolve_runtime("onnxruntime", CPU) == "onnxruntime"
    expected = "bfloat16" if runtimes.cpu_has_bf16() else "float32"
    assert resolve_precision("auto", "openvino", CPU, "float16") == expected
    assert resolve_precision("auto", "onnxruntime", CPU, "float16") == "float32"
    assert resolve_precision("auto", "torch", torch.device("cuda"), "float16") == "float16"
    with pytest.raises(ConfigError, match="onnxruntime"):
        resolve_precision("bfloat16", "onnxruntime", CPU, "float16")
    with pytest.raises(ConfigError, match="onnxruntime"):
        load_config(env={}, overrides={"backbone.runtime": "onnxruntime", "backbone.cpu_precision": "bfloat16"})
    with pytest.raises(ModelError, match="runs on the CPU"):
        options = RuntimeOptions(device=torch.device("cuda"), precision="float32", threads=1, streams=1, cache_dir=None)
        check_cpu("openvino", options)


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("runtime", ["openvino", "torch", "onnxruntime"])
def test_thread_plan_fits_the_budget(cores: int, runtime: str) -> None:
    plan = plan_threads(budget=cores, decode_workers=0, inference_threads=0, streams=0, runtime=runtime, device=CPU)
    assert plan.decode_workers >= 1 and plan.inference_threads >= 1
    assert 1 <= plan.streams <= plan.inference_threads
    if cores < 2:
        assert (plan.decode_workers, plan.inference_threads) == (1, 1)
    elif runtime == "openvino":  # its threads sleep while they wait: decode runs beside inference, on every core
        assert plan.inference_threads == cores and 1 <= plan.decode_workers <= max(1, cores // 4 + 1)
        assert plan.streams == max(2, cores // 2)
    else:  # spinning threads: decode + inference never more than the cores
        assert plan.decode_workers + plan.inference_threads == cores and plan.streams == 1


def test_thread_plan_honours_and_checks_explicit_counts() -> None:
    kw = {"runtime": "openvino", "device": CPU}
    assert plan_threads(budget=8, decode_workers=3, inference_threads=0, streams=0, **kw) == ThreadPlan(8, 3, 8, 4)
    assert plan_threads(budget=8, decode_workers=0, inference_threads=6, streams=3, **kw) == ThreadPlan(8, 2, 6, 3)
    assert plan_threads(budget=2, decode_workers=1, inference_threads=2, streams=0, **kw) == ThreadPlan(2, 1, 2, 2)
    with pytest.raises(ConfigError, match=r"backbone\.threads=5 is more than the 4 cores"):
        plan_threads(budget=4, decode_workers=2, inference_threads=5, streams=0, **kw)
    with pytest.raises(ConfigError, match=r"decode\.workers=3 is more than the 2 cores"):
        plan_threads(budget=2, decode_workers=3, inference_threads=0, streams=0, **kw)
    with pytest.raises(ConfigError, match="each stream needs a thread"):
        plan_threads(budget=4, decode_workers=2, inference_threads=2, streams=3, **kw)
    torch_kw = {"runtime": "torch", "device": CPU}
    with pytest.raises(ConfigError, match="more than the 4 cores"):
        plan_threads(budget=4, decode_workers=2, inference_threads=3, streams=0, **torch_kw)
    # Decode workers asked for every core: inference still gets one thread (with a warning), never zero.
    oversubscribed = plan_threads(budget=2, decode_workers=2, inference_threads=0, streams=0, **torch_kw)
    assert oversubscribed == ThreadPlan(2, 2, 1, 1)
    onnx = plan_threads(budget=4, decode_workers=0, inference_threads=0, streams=4, runtime="onnxruntime", device=CPU)
    assert onnx.streams == 1


def test_engine_reports_runtime_on_the_wire_and_in_parquet(data_dir: Path, oct_files: list[Path]) -> None:
    _, engine = _embed([oct_files[0].read_bytes()], data_dir, "onnxruntime", "float32")
    info = engine.info
    assert (info.runtime, info.precision) == ("onnxruntime", "float32")
    assert model_info_from_proto(model_info_to_proto(info)) == info
    meta = schema_for(info).metadata
    assert meta[b"embedserve.runtime"] == b"onnxruntime"
    assert meta[b"embedserve.precision"] == b"float32"
    assert meta[b"embedserve.device"] == b"cpu"
    assert isinstance(schema_for(info), pa.Schema)


def test_grayscale_jpegs_decode_as_one_channel(oct_files: list[Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cfg = load_config(env={}).decode
    with ThreadPoolExecutor(1) as pool:
        (out,) = PillowDecoder(cfg, CPU, pool).decode([oct_files[0].read_bytes()], (224, 224), "squash")
    assert isinstance(out, torch.Tensor)
    with Image.open(oct_files[0]) as img:
        assert img.mode == "L"
        assert tuple(out.shape) == (1, img.height, img.width)
        np.testing.assert_array_equal(out[0].numpy(), np.asarray(img))
