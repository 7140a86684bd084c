"""The command line as ops and new users meet it: logging, exit codes, TLS flags, early failures, attributes."""

from __future__ import annotations

import io
import json
import logging
import subprocess
from pathlib import Path

import grpc
import pytest

from service.api.errors import RequestIdFilter, request_id
from service.cli import common
from service.cli.common import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_SERVER_ERROR,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    connection,
    exit_code,
)
from service.cli.logs import resolve, setup_logging
from service.cli.main import build_parser, main
from service.client import EmbedClient
from service.client.channel import RemoteError
from service.errors import (
    CollectionNotFoundError,
    ConfigError,
    EngineUnavailableError,
    InvalidImageError,
    KeyNotFoundError,
)
from tests.unit.api.test_ops import FakeEngine, Served, make_cfg

CLIENT_COMMANDS = (
    ["embed", "d", "--out", "o.parquet", "--server", "h:1"],
    ["neighbors", "--server", "h:1", "--key", "k"],
    ["export", "--server", "h:1", "--collection", "c", "--out", "o.parquet"],
    ["cluster", "--server", "h:1", "--collection", "c"],
    ["probe", "--server", "h:1", "--collection", "c"],
    ["filter", "--server", "h:1", "--collection", "c"],
    ["outliers", "--server", "h:1", "--collection", "c"],
)


def test_log_level_and_format_precedence() -> None:
    assert resolve(None, None, command="serve", env={}) == ("INFO", "text")
    assert resolve(None, None, command="embed", env={}) == ("WARNING", "text")
    env = {"EMBEDSERVE_LOG_LEVEL": "debug", "EMBEDSERVE_LOG_FORMAT": "JSON"}
    assert resolve(None, None, command="serve", env=env) == ("DEBUG", "json")
    assert resolve("error", "text", command="serve", env=env) == ("ERROR", "text")
    with pytest.raises(ConfigError, match="EMBEDSERVE_LOG_LEVEL"):
        resolve("loud", None, command="serve", env={})
    with pytest.raises(ConfigError, match="text or json"):
        resolve(None, "xml", command="serve", env={})


def test_json_lines_carry_the_request_id_and_faiss_probing_is_quiet() -> None:
    stream = io.StringIO()
    handler = setup_logging("INFO", "json", stream=stream)
    try:
        handler.addFilter(RequestIdFilter())
        token = request_id.set("req-7")
        try:
            logging.getLogger("service.api.test").info("embedded %d images", 3)
        finally:
            request_id.reset(token)
        logging.getLogger("service.api.test").warning("outside a call")
        logging.getLogger("faiss.loader").info("Could not load library with AVX512 support due to: ...")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("service.api.test").exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]  # one object per line, also for the traceback
    assert len(entries) == 3
    assert entries[0]["message"] == "embedded 3 images" and entries[0]["request_id"] == "req-7"
    assert entries[0]["level"] == "INFO" and entries[0]["logger"] == "service.api.test"
    assert "request_id" not in entries[1]
    assert "ValueError: boom" in entries[2]["exc"]
    assert not any("faiss" in e["logger"] for e in entries)


def test_exit_codes_are_distinct_per_kind_of_failure() -> None:
    cases = {
        RemoteError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"): EXIT_UNAVAILABLE,
        RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"): EXIT_UNAVAILABLE,
        RemoteError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"): EXIT_UNAVAILABLE,
        RemoteError(grpc.StatusCode.NOT_FOUND, "no collection"): EXIT_NOT_FOUND,
        RemoteError(grpc.StatusCode.UNAUTHENTICATED, "no token"): EXIT_AUTH,
        RemoteError(grpc.StatusCode.INVALID_ARGUMENT, "bad"): EXIT_USAGE,
        RemoteError(grpc.StatusCode.INTERNAL, "oops"): EXIT_SERVER_ERROR,
        CollectionNotFoundError("c"): EXIT_NOT_FOUND,
        KeyNotFoundError("k"): EXIT_NOT_FOUND,
        EngineUnavailableError("starting"): EXIT_UNAVAILABLE,
        InvalidImageError("not an image"): EXIT_FAILED,
        ConfigError("bad value"): EXIT_USAGE,
    }
    for error, code in cases.items():
        assert exit_code(error) == code, error
    codes = {common.EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_SERVER_ERROR}
    assert len(codes) == 7


@pytest.mark.parametrize("argv", CLIENT_COMMANDS, ids=lambda a: a[0])
def test_every_client_subcommand_takes_tls_flags(argv: list[str]) -> None:
    args = build_parser().parse_args([*argv, "--tls", "--ca-cert", "ca.pem", "--token", "t"])
    assert args.tls is True and args.ca_cert == "ca.pem" and args.token == "t"


def test_connection_from_flags_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    for name in ("EMBEDSERVE_TLS", "EMBEDSERVE_CA_CERT", "EMBEDSERVE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    plain = parser.parse_args(["neighbors", "--server", "h:1", "--key", "k"])
    assert connection(plain) == {"token": None, "tls": False, "root_certificates": None}
    monkeypatch.setenv("EMBEDSERVE_TLS", "1")
    monkeypatch.setenv("EMBEDSERVE_TOKEN", "tok")
    assert connection(plain) == {"token": "tok", "tls": True, "root_certificates": None}
    monkeypatch.setenv("EMBEDSERVE_TLS", "0")
    monkeypatch.setenv("EMBEDSERVE_CA_CERT", str(ca))
    assert connection(plain)["tls"] is True and connection(plain)["root_certificates"] == ca.read_bytes()
    missing = parser.parse_args(["neighbors", "--server", "h:1", "--key", "k", "--ca-cert", str(tmp_path / "no")])
    with pytest.raises(common.UsageError, match="--ca-cert"):
        connection(missing)


def test_embed_of_a_missing_directory_fails_before_loading_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import service.embedding.engine as engine_module

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine_module.Engine, "from_config", no_model)
    assert main(["embed", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "o.parquet")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_usage_errors_of_neighbors_and_attributes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["neighbors", "--server", "127.0.0.1:9", "--key", "k", "-k", "0", "--wait", "0"]) == EXIT_USAGE
    assert "at least 1" in capsys.readouterr().err
    argv = ["embed", str(tmp_path), "--out", str(tmp_path / "o.parquet"), "--attr", "patient=-(\\d+)-"]
    assert main(argv) == EXIT_USAGE
    assert "--store" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"openssl cannot make a test certificate: {e}")
    return cert, key


def test_cli_talks_to_a_tls_server_and_exit_codes_tell_failures_apart(
    tmp_path: Path, tls_pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tls_pair
    served = Served(
        make_cfg(tmp_path / "data", server__tls_cert=str(cert), server__tls_key=str(key), server__auth_token="s3"),
        FakeEngine(),
    )
    try:
        target = f"localhost:{served.port}"
        with EmbedClient(target, token="s3", root_certificates=cert.read_bytes()) as client:
            assert client.embed([("stored", b"x")], store=True)[0].ok
        base = ["neighbors", "--server", target, "--key", "missing-key", "--wait", "0"]
        # Trusted CA and the right token: the server answers, and an unknown key is NOT_FOUND (exit 4).
        assert main([*base, "--ca-cert", str(cert), "--token", "s3"]) == EXIT_NOT_FOUND
        assert "key_not_found" in capsys.readouterr().err
        # Wrong token and no token: exit 5, and the message says which.
        assert main([*base, "--ca-cert", str(cert), "--token", "nope"]) == EXIT_AUTH
        assert "wrong token" in capsys.readouterr().err
        assert main([*base, "--ca-cert", str(cert)]) == EXIT_AUTH
        assert "no token" in capsys.readouterr().err
        # Plaintext against a TLS server cannot connect: exit 3.
        assert main([*base, "--token", "s3"]) == EXIT_UNAVAILABLE
    finally:
        served.close()


def test_embed_store_keeps_attributes_from_paths_and_csv(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    keys = ["CNV/CNV-6294785-1.jpeg", "CNV/CNV-6294785-2.jpeg", "DME/DME-15307-3.jpeg"]
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(b"fake")
    table = tmp_path / "meta.csv"
    table.write_text("key,eye\nCNV/CNV-6294785-1.jpeg,left\nDME/DME-15307-3.jpeg,right\n")
    served = Served(make_cfg(tmp_path / "data"), FakeEngine())
    try:
        argv = ["embed", str(root), "--out", str(tmp_path / "o.parquet"), "--server", served.target, "--store",
                "--attr", r"patient=-(\d+)-", "--attributes", str(table), "--wait", "0", "--quiet"]  # fmt: skip
        assert main(argv) == common.EXIT_OK
        with EmbedClient(served.target) as client:
            (page,) = list(client.iter_items(keys=keys, include_vectors=False))
        got = {k: {n: v for n, v in a.items() if n != "path"} for k, a in zip(page.keys, page.attributes, strict=True)}
        assert got == {
            keys[0]: {"label": "CNV", "patient": "6294785", "eye": "left"},
            keys[1]: {"label": "CNV", "patient": "6294785"},
            keys[2]: {"label": "DME", "patient": "15307", "eye": "right"},
        }
    finally:
        served.close()


def test_grpc_core_logging_defaults_to_errors_only() -> None:
    from service.cli.logs import quiet_grpc_core

    env: dict[str, str] = {}
    quiet_grpc_core(env)
    assert env == {"GRPC_VERBOSITY": "ERROR"}
    mine = {"GRPC_VERBOSITY": "DEBUG"}
    quiet_grpc_core(mine)
    assert mine == {"GRPC_VERBOSITY": "DEBUG"}


@pytest.mark.parametrize("command", [["serve"], ["embed", "d", "--out", "o.parquet"]])
def test_engine_flags_override_the_environment(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSERVE_BACKBONE_RUNTIME", "torch")
    monkeypatch.setenv("EMBEDSERVE_BACKBONE_CPU_PRECISION", "float32")
    flags = ["--runtime", "openvino", "--cpu-precision", "bfloat16", "--cpu-threads", "3", "--decode-workers", "1"]
    args = build_parser().parse_args([*command, *flags])
    cfg = common.load(args, common.engine_overrides(args))
    assert (cfg.backbone.runtime, cfg.backbone.cpu_precision) == ("openvino", "bfloat16")
    assert (cfg.engine.cpu_threads, cfg.decode.workers) == (3, 1)
    args = build_parser().parse_args(command)  # without the flags the environment's values hold
    cfg = common.load(args, common.engine_overrides(args))
    assert (cfg.backbone.runtime, cfg.backbone.cpu_precision) == ("torch", "float32")


def test_engine_flags_that_cannot_go_together_are_a_usage_error() -> None:
    args = build_parser().parse_args(["serve", "--runtime", "onnxruntime", "--cpu-precision", "bfloat16"])
    with pytest.raises(ConfigError, match="needs runtime openvino or torch"):
        common.load(args, common.engine_overrides(args))
    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(["serve", "--runtime", "tensorrt"])
    assert usage.value.code == EXIT_USAGE
