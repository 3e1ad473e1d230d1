"""deploy/compose.yaml parses and agrees with the code: settings names and values, ports, topic and model
names, the CLI commands it runs, and the Prometheus targets. No docker here: parsing is all it gets."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
import yaml
from deploykit import (
    DEPLOY,
    compose,
    hostnames,
    interpolate,
    is_interpolated,
    known_env_names,
    mind_commands,
    mounts,
    seconds,
    secret_env_names,
    service_env,
    service_ports,
    services,
    settings_from_env,
)

from stream.settings import Settings
from stream.view import DEFAULT_PORT as VIEW_PORT

DEFAULTS = Settings.model_construct()  # the defaults, whatever MIND_* this process has
MIND_SERVICES = ("topics", "worker", "view", "indexer", "mind")
KAFKA = ("kafka-1", "kafka-2", "kafka-3")


def test_the_stack_has_every_part() -> None:
    names = set(services())
    assert (
        set(MIND_SERVICES) | set(KAFKA) | {"triton", "triton-gpu", "etcd", "minio", "milvus", "redis"}
        <= names
    )
    assert {"prometheus", "grafana"} <= names
    for name in MIND_SERVICES:  # one image, built from deploy/Dockerfile
        svc = services()[name]
        assert svc["image"] == "mind-stream:0.1.0" and svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY.parent / svc["build"]["dockerfile"]).is_file()


def test_kafka_is_three_kraft_brokers_with_replication_three() -> None:
    voters = set()
    cluster_ids = set()
    for i, name in enumerate(KAFKA, 1):
        svc, env = services()[name], service_env(name)
        assert svc["image"].startswith("apache/kafka:")
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        assert int(env["KAFKA_NODE_ID"]) == i and svc["hostname"] == name
        assert f"PLAINTEXT://{name}:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
        voters.add(env["KAFKA_CONTROLLER_QUORUM_VOTERS"])
        cluster_ids.add(env["CLUSTER_ID"])
        assert env["KAFKA_LOG_DIRS"] in mounts(name)  # the log on a volume
    assert voters == {"1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"} and len(cluster_ids) == 1
    env = service_env("kafka-1")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # topics come from the code (`mind topics`)
    replication = int(service_env("worker")["MIND_REPLICATION"])
    assert replication == 3 == len(KAFKA) and int(env["KAFKA_MIN_INSYNC_REPLICAS"]) < replication


def test_mind_env_names_are_real_and_values_validate() -> None:
    for name in MIND_SERVICES:
        env = service_env(name)
        unknown = sorted(k for k in env if k.startswith("MIND_") and k not in known_env_names())
        assert not unknown, f"{name}: no code reads {unknown}"
        s = settings_from_env(env)  # types and constraints as the worker would read them
        assert s.clicks_topic == DEFAULTS.clicks_topic and s.recall_topic == DEFAULTS.recall_topic
        assert s.dlq_topic == DEFAULTS.dlq_topic and s.triton_model == DEFAULTS.triton_model
        assert not s.embedded(), f"{name}: every address must be configured"


def test_secrets_are_never_literals() -> None:
    for name, svc in services().items():
        for key, value in (svc.get("environment") or {}).items():
            if key in secret_env_names() or "PASSWORD" in key or "SECRET" in key:
                assert is_interpolated(value), f"{name}: {key} must come from deploy/.env, not the file"


def test_addresses_point_at_services_and_ports_of_the_stack() -> None:
    env, names = service_env("worker"), hostnames()
    for hostport in env["MIND_KAFKA_BOOTSTRAP"].split(","):
        host, port = hostport.split(":")
        assert (
            names[host] in KAFKA
            and f"PLAINTEXT://{host}:{port}" in service_env(host)["KAFKA_ADVERTISED_LISTENERS"]
        )
    host, port = env["MIND_TRITON_URL"].split(":")
    assert int(port) == DEFAULTS.embedded_triton_grpc_port
    for triton in ("triton", "triton-gpu"):  # whichever profile runs answers as `triton`
        assert host in services()[triton]["networks"]["default"]["aliases"] and int(port) in service_ports(
            triton
        )
    redis = urlsplit(interpolate(env["MIND_REDIS_URL"]))  # the default: the single server
    assert names[redis.hostname] == "redis" and redis.port == DEFAULTS.embedded_redis_port
    assert redis.port in service_ports("redis")
    milvus = urlsplit(env["MIND_MILVUS_URI"])
    assert names[milvus.hostname] == "milvus" and milvus.port == DEFAULTS.embedded_milvus_port
    assert milvus.port in service_ports("milvus")


REDIS_NODES = ("redis-node-1", "redis-node-2", "redis-node-3")


def test_the_redis_cluster_profile_is_three_masters_assembled_by_a_job() -> None:
    """Profile redis-cluster: three cluster-mode masters, each with its own volume, password and persistence,
    a create job naming all three (no replicas), and the URL that switches the mind containers to it."""
    assert "profiles" not in services()["redis"]  # the default stays the single server
    for name in REDIS_NODES:
        svc = services()[name]
        assert svc["profiles"] == ["redis-cluster"] and svc["hostname"] == name
        assert svc["image"].startswith("valkey/valkey:")
        cmd = " ".join(svc["command"])
        for flag in ("--cluster-enabled yes", "--appendonly yes", '--requirepass "$$REDIS_PASSWORD"'):
            assert flag in cmd, f"{name}: {flag}"
        assert "--cluster-config-file /data/nodes.conf" in cmd and mounts(name)["/data"] == f"{name}-data"
        assert f"{name}-data" in compose()["volumes"]
        assert is_interpolated(svc["environment"]["REDIS_PASSWORD"])
        assert {6379, 16379} <= service_ports(name)
    job = services()["redis-cluster-create"]
    cmd = " ".join(job["command"])
    assert job["profiles"] == ["redis-cluster"] and job["restart"] == "no"
    assert "--cluster create" in cmd and "--cluster-replicas 0 --cluster-yes" in cmd
    assert all(f"getent hosts {n} " in cmd for n in REDIS_NODES)
    assert set(job["depends_on"]) == set(REDIS_NODES)
    assert is_interpolated(job["environment"]["REDISCLI_AUTH"])  # not -a: no password on a command line
    worker_dep = services()["worker"]["depends_on"]["redis-cluster-create"]
    assert worker_dep == {"condition": "service_completed_successfully", "required": False}
    # deploy/.env's MIND_REDIS_URL switches every mind container to the cluster
    example = (DEPLOY / "env.example").read_text()
    url = re.search(r"MIND_REDIS_URL=(\S+)", example)
    assert url is not None and "redis-cluster" in example
    env = service_env("worker")
    raw = env["MIND_REDIS_URL"]
    s = settings_from_env({**env, "MIND_REDIS_URL": interpolate(raw, {"MIND_REDIS_URL": url.group(1)})})
    assert s.redis_cluster and not settings_from_env(env).redis_cluster
    seed = urlsplit(s.redis_url)
    assert hostnames()[seed.hostname] in REDIS_NODES and seed.port in service_ports("redis-node-1")


def test_triton_serves_the_settings_model_from_the_shared_repository() -> None:
    env = service_env("worker")
    assert env["MIND_TRITON_MODEL"] == DEFAULTS.triton_model
    for name in ("triton", "triton-gpu"):
        svc = services()[name]
        assert svc["image"].startswith("nvcr.io/nvidia/tritonserver:") and svc["image"].endswith("-py3")
        cmd = svc["command"]
        assert "--model-control-mode=explicit" in cmd and f"--load-model={DEFAULTS.triton_model}" in cmd
        assert f"--model-repository={env['MIND_MODEL_REPO']}" in cmd  # where `mind roll` exports
        assert {8000, 8001, 8002} <= service_ports(name)
        assert mounts(name)["/models"] == mounts("worker")["/models"] == mounts("mind")["/models"]
    assert services()["triton"]["profiles"] == ["cpu"] and services()["triton-gpu"]["profiles"] == ["gpu"]
    devices = services()["triton-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and "deploy" not in services()["triton"]


def test_mind_services_run_real_commands() -> None:
    for name in ("topics", "worker", "view", "indexer"):
        assert services()[name]["command"][0] in mind_commands()
    assert services()["topics"]["command"][:1] == ["topics"] and services()["indexer"]["command"] == ["index"]


def test_workers_fit_the_partitions_and_serve_probes_on_the_metrics_port() -> None:
    svc, env = services()["worker"], service_env("worker")
    assert 1 < svc["deploy"]["replicas"] <= int(env["MIND_PARTITIONS"])
    port = int(env["MIND_METRICS_PORT"])
    assert port == DEFAULTS.metrics_port and port in service_ports("worker")
    assert env["MIND_METRICS_HOST"] == "0.0.0.0"  # scraped from other containers
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(svc["healthcheck"]["test"])
    assert seconds(svc["stop_grace_period"]) >= 40  # finish the batch, commit, flush (30 s + 10 s bounds)
    assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_view_listens_where_the_cli_expects() -> None:
    env = service_env("view")
    assert int(env["MIND_VIEW_PORT"]) == VIEW_PORT and VIEW_PORT in service_ports("view")
    assert env["MIND_VIEW_HOST"] == "0.0.0.0"


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


def test_prometheus_targets_are_compose_services_and_ports(prometheus: dict) -> None:
    names = hostnames()
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    workers = jobs["mind-worker"]["dns_sd_configs"][0]
    assert workers["names"] == ["worker"] and workers["type"] == "A"
    assert workers["port"] == int(service_env("worker")["MIND_METRICS_PORT"]) == DEFAULTS.metrics_port
    targets = [t for j in jobs.values() for c in j.get("static_configs", []) for t in c["targets"]]
    assert "triton:8002" in targets and DEFAULTS.embedded_triton_metrics_port == 8002
    for target in targets:
        host, port = target.split(":")
        assert host in names, f"{target}: no such service"
        assert int(port) in service_ports(names[host]), f"{target}: {names[host]} does not listen on {port}"
    assert f"view:{VIEW_PORT}" in targets  # the view serves /metrics on its HTTP port


def test_grafana_is_provisioned_from_the_committed_files() -> None:
    svc = services()["grafana"]
    mounted = mounts("grafana")
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/mind.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert (DEPLOY / mounted[path] / "mind.json").is_file()
    assert (DEPLOY / mounted["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").is_file()
    assert is_interpolated(svc["environment"]["GF_SECURITY_ADMIN_PASSWORD"])


def test_interpolation_helper_and_env_example() -> None:
    assert interpolate("${A:-x}/${B:?set B}") == "x/<B>" and interpolate("$${A}") == "${A}"
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    needed = {
        m
        for svc in services().values()
        for v in (svc.get("environment") or {}).values()
        for m in re.findall(r"\$\{(\w+):\?", str(v))
    }
    assert needed <= set(example), "every required variable is in env.example"
    assert example["COMPOSE_PROFILES"] in ("cpu", "gpu")
    assert compose()["name"] == "mind-stream"
