"""Every address and knob of the streaming side, in one pydantic-settings class.

Precedence, highest first: keyword arguments (CLI flags) > `MIND_*` environment variables > the config
file (`load_settings(config=...)`, the `--config` flag, or `$MIND_CONFIG`; TOML, YAML, JSON or .env) >
defaults. An address left at None means "use the embedded server" (`mind up` starts it).

Secrets are SecretStr: repr, str, model_dump_json and logs show '**********'. Only kafka_config() and
the client factories see the real values. A password written inside redis_url or milvus_uri is moved into
redis_password / milvus_token when the settings are built, so the URL itself is safe to log.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("mind_config_file", default=None)

# librdkafka options that carry secrets: refused in kafka_extra (use the SecretStr fields) and masked
# by redact().
SECRET_KAFKA_KEYS = frozenset(
    {
        "sasl.password",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
    }
)


class _PrefixedDotEnv(DotEnvSettingsSource):
    """A .env config file where only MIND_* lines count: one shared with other tools may hold anything
    else, while a misspelt MIND_ name still fails (extra="forbid")."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        prefix = self.env_prefix.lower()
        return {k: v for k, v in super()._load_env_vars().items() if k.lower().startswith(prefix)}


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (from --config or MIND_CONFIG)")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    if suffix == ".env" or path.name.startswith(".env"):
        return _PrefixedDotEnv(settings_cls, env_file=path)
    raise ValueError(f"config file {path}: unknown format (use .toml, .yaml, .yml, .json or .env)")


def _split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without user:password, user, password) for URLs like redis://user:pw@host:6379/0."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    user = unquote(parts.username) if parts.username else None
    return urlunsplit(parts._replace(netloc=netloc)), user, unquote(parts.password)


class Settings(BaseSettings):
    """Addresses, credentials and knobs for the broker, key-value store, Triton, Milvus and the worker."""

    # hide_input_in_errors: a validation error must not echo a secret that was put in the wrong field.
    model_config = SettingsConfigDict(
        env_prefix="MIND_", extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    run_dir: Path = Field(Path("runs/stack"), description="Embedded servers' data and logs.")

    # ---- broker --------------------------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(None, description="host:port[,host:port]; None = embedded Tansu.")
    kafka_client_id: str = "mind-stream"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = None
    kafka_sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None
    ) = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    kafka_ssl_certificate_location: str | None = None
    kafka_ssl_key_location: str | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_extra: dict[str, str] = Field(
        default_factory=dict, description="Other (non-secret) librdkafka options, for every client."
    )
    clicks_topic: str = "clicks"
    recall_topic: str = "recall"
    dlq_topic: str = "clicks.dlq"
    partitions: int = Field(
        4, ge=1, description="Partitions of clicks, and of recall unless recall_partitions."
    )
    recall_partitions: int | None = Field(
        None,
        ge=1,
        description="Partitions of recall; None = as many as clicks. Its readers scale by them.",
    )
    dlq_partitions: int = Field(1, ge=1)
    replication: int = Field(1, ge=1, description="Replication factor; 3 on a production cluster.")
    clicks_retention_ms: int | None = Field(None, description="None = the broker's default.")
    dlq_retention_ms: int = Field(
        30 * 24 * 3600 * 1000, description="Keep dead letters 30 days; -1 = forever."
    )
    catalog_topic: str = Field(
        "catalog", description="Catalogue records (catalog.v1) keyed by item id, compacted: the feed's input."
    )
    catalog_dlq_topic: str = Field(
        "catalog.dlq", description="Bad catalogue records (dlq.v1, from the topic or a JSONL file)."
    )
    catalog_partitions: int = Field(1, ge=1, description="Partitions of the catalogue topic.")
    group_id: str = "mind-worker"
    session_timeout_ms: int = Field(
        6000, ge=1, description="A group's first join on Tansu waits about half of this (DESIGN.md)."
    )
    heartbeat_interval_ms: int | None = Field(None, ge=1, description="None = session_timeout_ms / 3.")
    max_poll_interval_ms: int = Field(300_000, ge=1)
    fetch_wait_max_ms: int = Field(
        5,
        ge=0,
        description="Longest a fetch waits for data. The embedded Tansu holds every fetch this long (5 ms: "
        "p50 24 vs 28 ms at 10 ms, docs/load.md) and stops serving a partition past ~11k record batches at "
        "5 ms; Apache Kafka answers as soon as data is there.",
    )
    assignment_strategy: str = Field(
        "range", description="Eager; cooperative-sticky never finished a rebalance on Tansu 0.6."
    )
    producer_linger_ms: int = Field(5, ge=0)
    # Bounds on what a client holds in memory when downstream is slower than the stream: the backlog then
    # stays in the broker (docs/load.md). librdkafka's own defaults are 65536 KB / 100,000 messages per
    # partition prefetched by a consumer, and 1 GB / 100,000 messages queued in a producer.
    consumer_queued_max_kbytes: int = Field(
        8192, ge=1, description="librdkafka queued.max.messages.kbytes: prefetched messages, all partitions."
    )
    consumer_queued_min_messages: int = Field(
        10_000, ge=1, description="librdkafka queued.min.messages: prefetch target per partition."
    )
    producer_queue_max_kbytes: int = Field(
        65_536, ge=1, description="librdkafka queue.buffering.max.kbytes: a producer's unsent messages."
    )
    producer_queue_max_messages: int = Field(
        100_000, ge=1, description="librdkafka queue.buffering.max.messages (full: produce() waits)."
    )

    # ---- key-value store ------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="redis://host:port/db, or redis+cluster://host:port (a Redis Cluster); None = embedded.",
    )
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_cluster: bool = Field(
        False,
        description="redis_url is one node of a Redis Cluster (the client finds the others); set by a "
        "redis+cluster:// or rediss+cluster:// URL.",
    )

    # ---- model server -------------------------------------------------------------------------------
    triton_url: str | None = Field(None, description="gRPC host:port; None = embedded tritonserver.")
    triton_model: str = "mind_user_tower"
    triton_timeout_s: float = Field(10.0, gt=0)

    # ---- vector store -------------------------------------------------------------------------------
    milvus_uri: str | None = Field(None, description="http://host:port or a local .db file; None = embedded.")
    milvus_token: SecretStr | None = None
    milvus_prefix: str = Field("items", description="Collection prefix of the versioned item index.")

    # ---- worker ---------------------------------------------------------------------------------------
    checkpoint: Path | None = Field(
        None, description="Trained model (vocabulary, side-id and profile tables); same version as served."
    )
    drop_seen: bool = Field(True, description="Drop items already in the user's window from the candidates.")
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics (0.0.0.0 to be scraped).")
    window_len: int = Field(50, ge=1, description="Behaviours kept per user (the model's max_len).")
    batch_max: int = Field(
        1024, ge=1, description="Micro-batch bound by count (bigger recall batches: 2.1k vs 1.4k clicks/s)."
    )
    batch_timeout_ms: int = Field(
        100,
        ge=1,
        description="Longest the loop waits for a click when none is buffered; a batch never waits to fill.",
    )
    fetch_stall_s: float = Field(
        30.0,
        gt=0,
        description="A partition with lag that has not advanced this long while consumption runs is stalled.",
    )
    event_id_memory: int = Field(
        10_000,
        ge=0,
        description="Event ids remembered per partition; a click with one of them is skipped (0 = off).",
    )
    recall_n: int = Field(50, ge=1, description="Candidates per recall message.")
    catalog_enabled: bool = Field(
        True,
        description="Follow the item catalogue in the key-value store: new items, side ids, published "
        "vocabularies (false = the checkpoint's vocabulary only, unknown items stay the unknown item).",
    )
    catalog_refresh_s: float = Field(
        1.0,
        ge=0,
        description="Longest the worker goes without reading the catalogue (unknown items read it at once).",
    )
    max_event_bytes: int = Field(65536, ge=64, description="Bigger click payloads go to the DLQ (too_large).")
    max_future_skew_s: float = Field(
        300.0, ge=0, description="Clicks stamped further ahead are dead-lettered."
    )
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus /metrics; 0 = off.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True

    # ---- embedded servers' ports (`mind up`) ----------------------------------------------------------
    embedded_host: str = Field("127.0.0.1", description="Bind address of every embedded server (loopback).")
    embedded_kafka_port: int = 9092
    embedded_redis_port: int = 6379
    embedded_triton_grpc_port: int = 8001
    embedded_triton_http_port: int = 8000
    embedded_triton_metrics_port: int = 8002
    embedded_milvus_port: int = 19530

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        path = _CONFIG_FILE.get() or os.environ.get("MIND_CONFIG")
        if path:
            sources.append(_file_source(settings_cls, Path(path)))
        return (*sources, file_secret_settings)

    @model_validator(mode="before")
    @classmethod
    def _move_url_passwords(cls, data: Any) -> Any:
        """redis://user:pw@h and https://user:pw@h: keep the password out of the (loggable) URL."""
        if not isinstance(data, dict):
            return data
        for url_key, user_key, secret_key in (
            ("redis_url", "redis_username", "redis_password"),
            ("milvus_uri", None, "milvus_token"),
        ):
            url = data.get(url_key)
            if not isinstance(url, str) or "@" not in url:
                continue
            clean, user, password = _split_userinfo(url)
            if password is None:
                continue
            data[url_key] = clean
            if user_key is None:  # Milvus takes "user:password" as its token
                data.setdefault(secret_key, f"{user}:{password}" if user else password)
            else:
                data.setdefault(secret_key, password)
                if user and user != "default":
                    data.setdefault(user_key, user)
        return data

    @model_validator(mode="after")
    def _cluster_url(self) -> Settings:
        """redis+cluster:// says redis_cluster; a cluster has one database (0) and no embedded stand-in."""
        if self.redis_url and is_cluster_url(self.redis_url):
            self.redis_cluster = True
        if self.redis_cluster:
            if not self.redis_url:
                raise ValueError(
                    "redis_cluster needs redis_url, one node of the cluster (e.g. "
                    "redis+cluster://host:6379): the embedded key-value store is a single server"
                )
            db = urlsplit(self.redis_url).path.strip("/")
            if db not in ("", "0"):
                raise ValueError(f"a Redis Cluster has only database 0, and redis_url names database {db}")
        return self

    @field_validator("clicks_topic", "recall_topic", "dlq_topic", "catalog_topic", "catalog_dlq_topic")
    @classmethod
    def _legal_topic(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", v) or v in (".", ".."):
            raise ValueError(f"{v!r} is not a legal Kafka topic name ([A-Za-z0-9._-], 1..249 characters)")
        return v

    @field_validator("kafka_extra")
    @classmethod
    def _no_secrets_in_extra(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in v if k in SECRET_KAFKA_KEYS or "password" in k or "secret" in k)
        if bad:
            raise ValueError(
                f"kafka_extra must not carry secrets ({', '.join(bad)}): use the kafka_sasl_* / kafka_ssl_* "
                "fields, which are hidden from logs"
            )
        return v

    @property
    def recall_partition_count(self) -> int:
        """The recall topic's partitions: recall_partitions, else as many as clicks."""
        return self.recall_partitions or self.partitions

    def embedded(self) -> tuple[str, ...]:
        """The services with no address configured, which `mind up` starts locally."""
        missing = {
            "kafka": self.kafka_bootstrap,
            "redis": self.redis_url,
            "triton": self.triton_url,
            "milvus": self.milvus_uri,
        }
        return tuple(name for name, addr in missing.items() if addr is None)


def load_settings(config: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Settings from `config` (else $MIND_CONFIG), the environment and `overrides` (flags; None = unset)."""
    token = _CONFIG_FILE.set(Path(config) if config else None)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _CONFIG_FILE.reset(token)


Role = Literal["producer", "consumer", "admin"]


def kafka_config(
    settings: Settings, role: Role, *, bootstrap: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """The confluent-kafka config for one client role. It holds secrets: log redact(conf), never conf.

    producer: idempotent (acks=all), so retries never duplicate or reorder per partition.
    consumer: the group, no auto-commit and no auto offset store (the worker commits after delivery).
    `bootstrap` overrides settings.kafka_bootstrap (e.g. the embedded broker's address).
    """
    servers = bootstrap or settings.kafka_bootstrap
    if not servers:
        raise ValueError(
            "no Kafka bootstrap address: set MIND_KAFKA_BOOTSTRAP (or kafka_bootstrap in the config file), "
            "or start the embedded broker with `mind up` and pass its address"
        )
    conf: dict[str, Any] = {"bootstrap.servers": servers, "client.id": f"{settings.kafka_client_id}-{role}"}
    optional = {
        "security.protocol": settings.kafka_security_protocol,
        "sasl.mechanism": settings.kafka_sasl_mechanism,
        "sasl.username": settings.kafka_sasl_username,
        "sasl.password": settings.kafka_sasl_password,
        "ssl.ca.location": settings.kafka_ssl_ca_location,
        "ssl.certificate.location": settings.kafka_ssl_certificate_location,
        "ssl.key.location": settings.kafka_ssl_key_location,
        "ssl.key.password": settings.kafka_ssl_key_password,
    }
    for key, value in optional.items():
        if value is not None:
            conf[key] = value.get_secret_value() if isinstance(value, SecretStr) else value
    if role == "producer":
        conf.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": settings.producer_linger_ms,
                "queue.buffering.max.kbytes": settings.producer_queue_max_kbytes,
                "queue.buffering.max.messages": settings.producer_queue_max_messages,
            }
        )
    elif role == "consumer":
        conf.update(
            {
                "group.id": settings.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": settings.session_timeout_ms,
                "heartbeat.interval.ms": settings.heartbeat_interval_ms
                or max(1, settings.session_timeout_ms // 3),
                "max.poll.interval.ms": settings.max_poll_interval_ms,
                "partition.assignment.strategy": settings.assignment_strategy,
                "fetch.wait.max.ms": settings.fetch_wait_max_ms,
                "queued.max.messages.kbytes": settings.consumer_queued_max_kbytes,
                "queued.min.messages": settings.consumer_queued_min_messages,
            }
        )
    elif role != "admin":
        raise ValueError(f"unknown Kafka client role {role!r} (producer, consumer or admin)")
    conf.update(settings.kafka_extra)
    conf.update(overrides)
    return conf


def redact(conf: dict[str, Any]) -> dict[str, Any]:
    """A copy of a client config that is safe to log: secret values replaced by '**********'."""
    return {
        k: "**********" if (k in SECRET_KAFKA_KEYS or "password" in k or "secret" in k) and v else v
        for k, v in conf.items()
    }


def redis_client(settings: Settings, url: str | None = None, **kw: Any) -> Any:
    """A redis-py client for settings.redis_url (or `url`, e.g. the embedded server's), password applied:
    a `redis.Redis`, or with redis_cluster (or a redis+cluster:// URL) a `redis.cluster.RedisCluster`
    that has already read the slot map from the seed node. `kw` goes to the client (a `retry` is the
    cluster client's own in cluster mode: its node connections never retry by themselves)."""
    import redis

    target = url or settings.redis_url
    if not target:
        raise ValueError(
            "no key-value store address: set MIND_REDIS_URL, or start the embedded one (`mind up`)"
        )
    pw = settings.redis_password.get_secret_value() if settings.redis_password else None
    if settings.redis_cluster or is_cluster_url(target):
        return _cluster_client(target, username=settings.redis_username, password=pw, **kw)
    return redis.Redis.from_url(target, username=settings.redis_username, password=pw, **kw)


# ---- Redis Cluster ------------------------------------------------------------------------------------

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    """redis+cluster://host:port (rediss+cluster:// with TLS): a node of a Redis Cluster."""
    return urlsplit(url).scheme.lower() in _CLUSTER_SCHEMES


def _plain_url(url: str) -> str:
    """The redis:// / rediss:// URL redis-py parses, for a redis+cluster:// one."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=_CLUSTER_SCHEMES.get(parts.scheme.lower(), parts.scheme)))


@functools.cache
def _cluster_types() -> tuple[type[Exception], type[Any]]:
    """(ClusterUnavailable, ClusterClient), made once: redis is imported when a client is first needed
    (it costs the CLI about 0.2 s at start), and isinstance() needs one class, not one per call."""
    import redis
    from redis.cluster import RedisCluster

    class ClusterUnavailable(redis.exceptions.ConnectionError):
        """No node of the cluster answered, or none serves a slot (yet): a down server, to every caller."""

    class ClusterClient(RedisCluster):
        """RedisCluster whose commands raise cluster_error(...); WindowState translates its pipelines."""

        def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().execute_command(*args, **kwargs)
            except Exception as exc:
                err = cluster_error(exc)
                if err is exc:
                    raise
                raise err from exc

    return ClusterUnavailable, ClusterClient


def cluster_error(exc: BaseException) -> BaseException:
    """What a caller should see for an exception of the cluster client.

    redis-py raises "no node reachable" and "slot not covered" as RedisClusterException, which is not a
    RedisError: the worker would take it for a bug and stop, where a single server's outage pauses and
    retries. Those become ClusterUnavailable (a redis ConnectionError); a refused password stays an
    AuthenticationError (fail fast); anything else, e.g. a cross-slot call or a node that is not in
    cluster mode, is returned as it is (a configuration error or a bug).
    """
    import redis

    if not isinstance(exc, redis.exceptions.RedisClusterException):
        return exc
    unavailable, _ = _cluster_types()
    cause = exc.__cause__
    if isinstance(cause, redis.exceptions.AuthenticationError):
        return cause
    if isinstance(cause, redis.exceptions.RedisClusterException):  # e.g. "Cluster mode is not enabled"
        return exc
    text = str(exc)
    if (
        isinstance(exc, redis.exceptions.SlotNotCoveredError)
        or "cannot be connected" in text
        or "No targets" in text
    ):
        return unavailable(text)
    return exc


def _cluster_client(url: str, **kw: Any) -> Any:
    """ClusterClient from a redis+cluster:// or redis:// URL. It reads the slot map now, so an unreachable
    cluster raises ClusterUnavailable here, a refused password AuthenticationError, and a server that is
    not in cluster mode ValueError (a configuration error: retrying cannot help)."""
    _, client_type = _cluster_types()
    try:
        return client_type.from_url(_plain_url(url), **kw)
    except Exception as exc:
        err = cluster_error(exc)
        if err is not exc:
            raise err from exc
        if "Cluster mode is not enabled" in str(exc):
            raise ValueError(
                f"{_plain_url(url)} is not a Redis Cluster node (Cluster mode is not enabled on it): unset "
                "MIND_REDIS_CLUSTER and use a redis:// URL for a single server"
            ) from exc
        raise
