"""Config: flags > EMBEDSERVE_* environment > TOML file > defaults; bad values say how to fix them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.config import Config, ConfigError, load_config


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.backbone.model == "efficientnet_lite0"
    assert (cfg.server.host, cfg.server.port, cfg.server.metrics_port) == ("127.0.0.1", 50051, 9464)
    assert cfg.data_dir == "./var/embedserve"


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    file = tmp_path / "embedserve.toml"
    file.write_text(
        'data_dir = "/from/file"\n[decode]\nresize = "letterbox"\npad = "white"\n[engine]\nbatch_size = 8\n'
    )
    env = {"EMBEDSERVE_DECODE_PAD": "edge", "EMBEDSERVE_ENGINE_BATCH_SIZE": "16", "EMBEDSERVE_DATA_DIR": "/from/env"}
    cfg = load_config(file, env=env, overrides={"engine.batch_size": 32, "decode.resize": None})
    assert cfg.decode.resize == "letterbox"  # file (flag unset)
    assert cfg.decode.pad == "edge"  # env beats file
    assert cfg.engine.batch_size == 32  # flag beats env
    assert cfg.data_dir == "/from/env"


def test_env_booleans_and_unrelated_variables() -> None:
    cfg = load_config(env={"EMBEDSERVE_BACKBONE_WARMUP": "false", "HOME": "/root", "EMBEDSERVEX": "1"})
    assert cfg.backbone.warmup is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"decode.resize": "crop"}, "decode.resize='crop' is not one of squash, letterbox"),
        ({"engine.batch_size": 0}, "engine.batch_size=0 must be positive"),
        ({"engine.batch_size": "many"}, "engine.batch_size='many' must be an integer"),
        ({"decode.nope": 1}, "unknown setting decode.nope"),
        ({"server.tls_cert": "c.pem"}, "tls_cert and server.tls_key must be given together"),
        ({"batcher.max_queue_size": 0}, "batcher.max_queue_size=0 must be positive"),
        ({"server.max_concurrent_rpcs": -1}, "server.max_concurrent_rpcs=-1 must be >= 0"),
    ],
)
def test_invalid_values_explain_the_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(env={}, overrides=overrides)


def test_a_queue_smaller_than_a_batch_caps_the_batch_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.config"):
        for _ in range(3):
            cfg = load_config(env={}, overrides={"batcher.max_queue_size": 7, "batcher.max_batch_size": 48})
            assert (cfg.batcher.max_batch_size, cfg.batcher.max_queue_size) == (7, 7)
    assert [r.getMessage() for r in caplog.records] == [
        "batcher.max_batch_size=48 is above batcher.max_queue_size=7: batches hold at most 7 images"
    ]
    assert load_config(env={}, overrides={"batcher.max_queue_size": 100}).batcher.max_batch_size == 64


def test_unknown_env_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="EMBEDSERVE_DECODE_COLOUR"):
        load_config(env={"EMBEDSERVE_DECODE_COLOUR": "red"})


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[decode\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
