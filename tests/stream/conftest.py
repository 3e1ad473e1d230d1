"""Session-scoped real servers for the stream tests: one Tansu broker and one Valkey server.

Tests share them and isolate themselves: a unique topic/group suffix per test (`uid`), and a flushed
Redis database per test (`redis_db`). Both servers start in well under a second.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from stream.embedded.kafka import EmbeddedKafka
from stream.embedded.redis import EmbeddedRedis


@pytest.fixture(scope="session")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedKafka]:
    """A real Tansu broker (memory storage) on a free loopback port."""
    server = EmbeddedKafka(tmp_path_factory.mktemp("kafka"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_server: EmbeddedKafka) -> str:
    return kafka_server.bootstrap_servers


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real valkey-server (no persistence: the tests do not restart it) on a free loopback port."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def redis_db(redis_server: EmbeddedRedis) -> Iterator[Any]:
    """A client to the session server whose database is empty when the test starts."""
    client: Any = redis_server.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def uid() -> str:
    """A short unique suffix for topic and group names on the shared broker."""
    return uuid.uuid4().hex[:8]
