"""Settings: defaults, MIND_* environment variables, config files, precedence, and secrets never shown."""

from __future__ import annotations

import logging
from pathlib import Path

import pydantic
import pytest

from stream.settings import Settings, kafka_config, load_settings, redact, redis_client

SECRETS = ("s3cret-sasl", "s3cret-redis", "s3cret-milvus", "s3cret-key")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MIND_* variable from the developer's shell may leak into these tests."""
    import os

    for k in list(os.environ):
        if k.upper().startswith("MIND_"):
            monkeypatch.delenv(k)


def test_defaults_mean_embedded() -> None:
    s = Settings()
    assert s.embedded() == ("kafka", "redis", "triton", "milvus")
    assert (s.clicks_topic, s.recall_topic, s.dlq_topic) == ("clicks", "recall", "clicks.dlq")
    assert s.session_timeout_ms == 6000 and s.embedded_host == "127.0.0.1"
    with pytest.raises(ValueError, match="MIND_KAFKA_BOOTSTRAP"):
        kafka_config(s, "producer")


def test_env_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIND_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("MIND_PARTITIONS", "12")
    monkeypatch.setenv("mind_window_len", "80")  # case-insensitive
    monkeypatch.setenv("MIND_KAFKA_EXTRA", '{"client.rack": "eu-1a"}')
    s = Settings()
    assert s.kafka_bootstrap == "kafka-1:9092,kafka-2:9092" and s.partitions == 12 and s.window_len == 80
    assert s.embedded() == ("redis", "triton", "milvus")
    assert kafka_config(s, "admin")["client.rack"] == "eu-1a"
    monkeypatch.setenv("MIND_PARTITIONS", "zero")
    with pytest.raises(pydantic.ValidationError):
        Settings()


def test_config_files_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "mind.toml"
    toml.write_text(
        'partitions = 6\ngroup_id = "from-toml"\nredis_url = "redis://kv:6379/2"\n'
        '[kafka_extra]\n"client.rack" = "r1"\n'
    )
    yaml = tmp_path / "mind.yaml"
    yaml.write_text("partitions: 7\ntriton_url: triton:8001\n")
    js = tmp_path / "mind.json"
    js.write_text('{"partitions": 9}')
    env = tmp_path / "prod.env"
    env.write_text("MIND_PARTITIONS=5\nMIND_MILVUS_URI=http://milvus:19530\nUNRELATED=whatever\n")

    s = load_settings(toml)
    assert (s.partitions, s.group_id, s.redis_url, s.kafka_extra) == (
        6,
        "from-toml",
        "redis://kv:6379/2",
        {"client.rack": "r1"},
    )
    assert load_settings(yaml).triton_url == "triton:8001" and load_settings(yaml).partitions == 7
    assert load_settings(js).partitions == 9
    assert load_settings(env).milvus_uri == "http://milvus:19530" and load_settings(env).partitions == 5

    monkeypatch.setenv("MIND_CONFIG", str(toml))
    assert Settings().group_id == "from-toml"  # the file named by MIND_CONFIG
    monkeypatch.setenv("MIND_GROUP_ID", "from-env")
    assert Settings().group_id == "from-env"  # env beats file
    assert (
        load_settings(None, group_id="from-flag", partitions=None).group_id == "from-flag"
    )  # flag beats env
    assert load_settings(None, partitions=None).partitions == 6  # None = flag not given
    assert load_settings(yaml).partitions == 7  # an explicit --config beats MIND_CONFIG


def test_bad_config_files(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text("partitons = 3\n")
    with pytest.raises(pydantic.ValidationError, match="partitons"):
        load_settings(typo)
    env_typo = tmp_path / "typo.env"
    env_typo.write_text("MIND_WINDOW_LENN=3\n")
    with pytest.raises(pydantic.ValidationError, match="window_lenn"):
        load_settings(env_typo)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    ini = tmp_path / "mind.ini"
    ini.write_text("")
    with pytest.raises(ValueError, match="unknown format"):
        load_settings(ini)
    with pytest.raises(pydantic.ValidationError, match="legal Kafka topic"):
        Settings(recall_topic="recall topic")


def _secret_settings(tmp_path: Path) -> Settings:
    f = tmp_path / "secrets.toml"
    f.write_text('kafka_sasl_password = "s3cret-sasl"\nkafka_ssl_key_password = "s3cret-key"\n')
    return load_settings(
        f,
        kafka_bootstrap="b:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="mind",
        redis_url="redis://worker:s3cret-redis@kv.internal:6380/1",
        milvus_uri="https://root:s3cret-milvus@milvus.internal:19530",
    )


def test_secrets_never_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = _secret_settings(tmp_path)
    with caplog.at_level(logging.INFO):
        logging.getLogger("mind.test").info("settings %s %r", s, s)
    shown = [
        repr(s),
        str(s),
        s.model_dump_json(),
        str(s.model_dump()),
        caplog.text,
        s.redis_url,
        s.milvus_uri,
    ]
    for text in shown:
        for secret in SECRETS:
            assert secret not in text
    assert "**********" in s.model_dump_json()
    # the URL passwords were moved into SecretStr fields, and the clients still get them
    assert s.redis_url == "redis://kv.internal:6380/1" and s.redis_username == "worker"
    assert s.redis_password is not None and s.redis_password.get_secret_value() == "s3cret-redis"
    assert s.milvus_token is not None and s.milvus_token.get_secret_value() == "root:s3cret-milvus"
    client = redis_client(s)
    kw = client.connection_pool.connection_kwargs
    assert (kw["password"], kw["username"], kw["host"], kw["port"], kw["db"]) == (
        "s3cret-redis",
        "worker",
        "kv.internal",
        6380,
        1,
    )


def test_kafka_config_roles_and_redaction(tmp_path: Path) -> None:
    s = _secret_settings(tmp_path)
    prod, cons, admin = (kafka_config(s, r) for r in ("producer", "consumer", "admin"))
    for conf in (prod, cons, admin):
        assert conf["bootstrap.servers"] == "b:9093" and conf["security.protocol"] == "SASL_SSL"
        assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["sasl.username"] == "mind"
        assert conf["sasl.password"] == "s3cret-sasl" and conf["ssl.key.password"] == "s3cret-key"
        safe = str(redact(conf))
        assert not any(secret in safe for secret in SECRETS) and "mind" in safe
    assert prod["enable.idempotence"] is True and prod["acks"] == "all"
    assert cons["enable.auto.commit"] is False and cons["enable.auto.offset.store"] is False
    assert cons["session.timeout.ms"] == 6000 and cons["heartbeat.interval.ms"] == 2000
    assert cons["group.id"] == "mind-worker" and "group.id" not in prod
    assert kafka_config(s, "admin", bootstrap="127.0.0.1:1")["bootstrap.servers"] == "127.0.0.1:1"
    with pytest.raises(ValueError, match="role"):
        kafka_config(s, "streamer")  # type: ignore[arg-type]


def test_secret_in_the_wrong_place_is_refused_without_echo() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Settings(kafka_extra={"sasl.password": "s3cret-sasl"})
    assert "use the kafka_sasl_*" in str(info.value) and "s3cret-sasl" not in str(info.value)
    with pytest.raises(pydantic.ValidationError) as info:
        Settings(partitions="s3cret-key")  # type: ignore[arg-type]
    assert "s3cret-key" not in str(info.value)
