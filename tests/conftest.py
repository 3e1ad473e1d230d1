"""Shared fixtures: real servers started once per test session on loopback (a Tansu broker, a Valkey
server, a 3-master Valkey cluster when a test asks for it, a tritonserver serving towers exported by
mind.export, a milvus-lite server) and the worker's end-to-end model.

Tests share the servers and isolate themselves: a unique topic/group suffix per test (`uid`), a flushed
Redis database per test (`redis_db`), their own collection prefix and model name. On the cluster the
topic suffix is the isolation: every key a worker writes is tagged with its clicks topic."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from towerkit import ToyTower, export, real_mind
from tritonclient.utils import InferenceServerException

from indexer.build import index_items
from mind.experiment import DEFAULTS
from mind.export import export_user_tower
from mind.model import MIND
from mind.synthetic import generate
from mind.train import feature_tables, model_config_for, save_checkpoint
from stream.embedded.kafka import EmbeddedKafka
from stream.embedded.milvus import EmbeddedMilvus
from stream.embedded.redis import EmbeddedRedis
from stream.embedded.redis_cluster import EmbeddedRedisCluster
from stream.embedded.triton import EmbeddedTriton, free_port
from stream.settings import Settings
from stream.tower import TowerError, TritonTower


@dataclass
class Served:
    server: EmbeddedTriton
    repo: Path
    towers: dict[str, nn.Module]  # model name -> the eager tower its version 1 was exported from
    keeper: TritonKeeper  # restarts the server should it crash


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A real tritonserver serving `toy` (ToyTower), `flip` (version switches), `mind` (mind.model.MIND)."""
    base = tmp_path_factory.mktemp("triton")
    repo = base / "repo"
    towers: dict[str, nn.Module] = {"toy": ToyTower(0), "flip": ToyTower(1), "mind": real_mind()}
    for name, tower in towers.items():
        export(tower, repo, name, f"{name}-1")
    server = EmbeddedTriton(
        repo,
        base / "run",
        models=list(towers),
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        ready_timeout_s=180,
    )
    server.start()
    print(f"\ntritonserver ready in {server.start_seconds:.1f}s serving {sorted(towers)}")
    keeper = TritonKeeper(server)
    keeper.start()
    yield Served(server, repo, towers, keeper)
    keeper.halt()
    server.stop()


class TritonKeeper(threading.Thread):
    """Restarts the session's tritonserver on its own ports if it dies, with the models it had loaded.

    The 2.51 Python backend can abort under concurrent requests (an upstream crash in its shared-memory
    lock); one dead shared server would fail every later test. A restart is what an orchestrator does
    for the official container, and the worker under test rides it out with its Triton retries. Each
    crash's log is kept beside the server's (`crash-N.log`) and reported on stderr."""

    def __init__(self, server: EmbeddedTriton, poll_s: float = 1.0) -> None:
        super().__init__(name="triton-keeper", daemon=True)
        self.server, self.poll_s = server, poll_s
        self.loaded: set[str] = set(server.models)
        self.crashes = 0
        self.restarted = threading.Event()  # set once a restart has every model back
        self._halt = threading.Event()
        self.repo = TritonTower(server.grpc_url, "")  # only its client: the repository index

    def run(self) -> None:
        while not self._halt.wait(self.poll_s):
            proc = self.server.proc
            if proc is None:
                continue
            if proc.poll() is None:
                try:  # what is loaded now: a restart brings back exactly this
                    index = self.repo.client.get_model_repository_index(as_json=True, client_timeout=5)
                    self.loaded = {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}
                except InferenceServerException:
                    pass
                continue
            self.crashes += 1
            kept = self.server.log_path.with_name(f"crash-{self.crashes}.log")
            shutil.copyfile(self.server.log_path, kept)
            print(f"\ntritonserver exited ({proc.returncode}); restarting it, log in {kept}", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):  # its Python stubs outlive it in its group
                os.killpg(proc.pid, signal.SIGKILL)
            self.server.stop()
            self.server.start()
            for name in sorted(self.loaded - set(self.server.models)):
                try:
                    with TritonTower(self.server.grpc_url, name) as tower:
                        tower.load()
                except TowerError as exc:
                    print(f"tritonserver restart: {name} did not load again ({exc})", file=sys.stderr)
            self.restarted.set()

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=200)
        self.repo.close()


# ---- Milvus (indexer/ and stream/recall tests) -------------------------------------------------------


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real milvus-lite server (own process, TCP) for the session; tests isolate by collection prefix."""
    server = EmbeddedMilvus(tmp_path_factory.mktemp("milvus"))
    uri = server.start()
    print(f"\nmilvus-lite ready in {server.start_seconds:.1f}s at {uri}")
    yield uri
    server.stop()


# ---- Kafka and the key-value store -------------------------------------------------------------------


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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    """A real Redis Cluster: 3 valkey-server masters on loopback, assembled by `valkey-cli --cluster
    create`, every slot served, no replicas, no persistence and no password (tests/stream/test_cluster.py
    starts its own with a password and an ACL user)."""
    cluster = EmbeddedRedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3, persist=False)
    cluster.start()
    print(f"\nvalkey cluster ready in {cluster.start_seconds:.1f}s on ports {cluster.ports}")
    yield cluster
    cluster.stop()


@pytest.fixture(params=["valkey", "valkey-cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The key-value store a worker test runs on: the single server, then the cluster (redis+cluster://);
    the cluster starts only when a test asks for it."""
    if request.param == "valkey":
        return str(request.getfixturevalue("redis_url"))
    return str(request.getfixturevalue("redis_cluster").url)


@pytest.fixture
def uid() -> str:
    """A short unique suffix for topic and group names on the shared broker."""
    return uuid.uuid4().hex[:8]


# ---- the stream worker's end-to-end stack (tests/stream/test_worker.py) ---------------------------------


@dataclass
class WorkerModel:
    """A tiny random-init MIND, its checkpoint, served by Triton and indexed in Milvus as one version."""

    checkpoint: Path
    inter: Any  # mind.dataset.Interactions the checkpoint was saved from
    model: Any  # mind.model.MIND (eval mode)
    item_vectors: Any  # torch [n_items, d], exactly what the index holds (rows 2..)
    triton_url: str
    triton_model: str
    milvus_uri: str
    milvus_prefix: str
    model_version: str
    max_len: int

    def settings(self, kafka_bootstrap: str, redis_url: str, uid: str, **kw: Any) -> Any:
        """Worker settings on the shared servers, isolated by topic, group and key names."""
        base: dict[str, Any] = dict(
            kafka_bootstrap=kafka_bootstrap,
            redis_url=redis_url,
            triton_url=self.triton_url,
            triton_model=self.triton_model,
            milvus_uri=self.milvus_uri,
            milvus_prefix=self.milvus_prefix,
            clicks_topic=f"clicks-{uid}",
            recall_topic=f"recall-{uid}",
            dlq_topic=f"dlq-{uid}",
            group_id=f"workers-{uid}",
            partitions=4,
            session_timeout_ms=6000,
            window_len=self.max_len,
            batch_max=64,
            batch_timeout_ms=50,
            recall_n=20,
            metrics_port=0,
            producer_linger_ms=1,
        )
        base.update(kw)
        return Settings(**base)


@pytest.fixture(scope="session")
def worker_model(tmp_path_factory: pytest.TempPathFactory, triton: Any, milvus_uri: str) -> WorkerModel:
    """~500 items, 40 users, window 8, d=16, K=4: small enough to export, load and index in seconds."""
    inter = generate(n_users=40, n_items=500, n_categories=10, seq_len=(5, 12), seed=3)
    # MIND-K's default scoring (cosine / temperature), so the served path is the one users get
    cfg = model_config_for(inter, d=16, K=4, max_len=8, **DEFAULTS["mind"]["model"])
    torch.manual_seed(0)
    model = MIND(cfg).eval()
    path = tmp_path_factory.mktemp("worker") / "mind.pt"
    save_checkpoint(path, model, inter, None)
    side_t, _ = feature_tables(inter)
    tag = uuid.uuid4().hex[:8]
    name, version = f"worker_mind_{tag}", f"w{tag}"
    export_user_tower(
        model,
        triton.repo,
        model_name=name,
        max_len=cfg.max_len,
        n_side=side_t.shape[1],
        n_profile=cfg.n_profile_fields,
        K=cfg.K,
        d=cfg.d,
        model_version=version,
        vocab_hash=inter.items.digest(),
        item_side=side_t.numpy(),
        side_vocab=cfg.n_side,
        profile_vocab=cfg.n_profile,
    )
    with TritonTower(triton.server.grpc_url, name) as tower:
        tower.load()
    vectors = model.item_vectors(side_t)
    prefix = f"w{tag}"
    index_items(vectors, version, uri=milvus_uri, prefix=prefix, progress=False)
    return WorkerModel(
        path, inter, model, vectors, triton.server.grpc_url, name, milvus_uri, prefix, version, cfg.max_len
    )


# ---- embedded stack, publish and view tests ------------------------------------------------------------

EMBEDDED_PORTS_ANY = {
    f"MIND_EMBEDDED_{name}_PORT": "0"
    for name in ("KAFKA", "REDIS", "MILVUS", "TRITON_GRPC", "TRITON_HTTP", "TRITON_METRICS")
}


@pytest.fixture
def cli_env(tmp_path: Any) -> dict[str, str]:
    """Environment for `mind` subprocesses: any free port for every embedded server, no stray MIND_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIND_")}
    env.update(EMBEDDED_PORTS_ANY)
    env["MIND_RUN_DIR"] = str(tmp_path / "run")
    return env


@pytest.fixture
def topic_settings(kafka_bootstrap: str, uid: str, tmp_path: Any) -> Any:
    """Settings on the session broker with this test's own clicks / recall / DLQ topics (2 partitions)."""
    return Settings(
        kafka_bootstrap=kafka_bootstrap,
        clicks_topic=f"clicks-{uid}",
        recall_topic=f"recall-{uid}",
        dlq_topic=f"dlq-{uid}",
        partitions=2,
        run_dir=tmp_path / "run",
    )
