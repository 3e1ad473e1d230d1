"""deploy/k8s parses and agrees with the code: settings names and values, secrets by secretKeyRef only,
probe endpoints and ports of stream/health.py, the autoscaler's group / topic / ceiling, the commands the
jobs run. No cluster here: parsing is all it gets."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import yaml
from deploykit import (
    K8S,
    k8s,
    k8s_docs,
    known_env_names,
    mind_commands,
    pod_spec,
    secret_env_names,
    settings_from_env,
    workloads,
)

from stream.settings import Settings
from stream.view import DEFAULT_PORT as VIEW_PORT

DEFAULTS = Settings.model_construct()  # the defaults, whatever MIND_* this process has


def settings_map() -> dict[str, str]:
    (cm,) = k8s("ConfigMap", "mind-settings")
    return cm["data"]


def container(doc: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    cs = pod_spec(doc)["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = k8s(kind, name)
    return doc


def test_every_manifest_parses_and_kustomize_lists_them() -> None:
    docs = k8s_docs()
    assert all("apiVersion" in d and "kind" in d for _, d in docs)
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in docs}
    assert {
        ("Deployment", "mind-worker"),
        ("ScaledObject", "mind-worker"),
        ("Deployment", "mind-view"),
        ("Service", "mind-view"),
        ("Job", "mind-index"),
        ("Job", "mind-roll"),
        ("CronJob", "mind-index-incremental"),
        ("Job", "mind-topics"),
        ("ConfigMap", "mind-settings"),
    } <= kinds


def test_settings_names_are_real_and_values_validate() -> None:
    data = settings_map()
    unknown = sorted(k for k in data if k not in known_env_names())
    assert not unknown, f"no code reads {unknown}"
    s = settings_from_env(data)
    assert (s.clicks_topic, s.recall_topic, s.dlq_topic) == (
        DEFAULTS.clicks_topic,
        DEFAULTS.recall_topic,
        DEFAULTS.dlq_topic,
    )
    assert s.group_id == DEFAULTS.group_id and s.triton_model == DEFAULTS.triton_model
    assert s.replication == 3 and not s.embedded()
    assert urlsplit(s.redis_url).port == DEFAULTS.embedded_redis_port
    assert urlsplit(s.milvus_uri).port == DEFAULTS.embedded_milvus_port
    for doc in workloads():
        for c in pod_spec(doc)["containers"]:
            names = [e["name"] for e in c.get("env", []) if e["name"].startswith("MIND_")]
            assert set(names) <= known_env_names(), f"{doc['metadata']['name']}: {names}"


def test_secrets_come_only_from_secret_key_refs() -> None:
    secrets = secret_env_names()
    assert not secrets & set(settings_map()), "a secret setting in the ConfigMap"
    for doc in workloads():
        for c in pod_spec(doc)["containers"]:
            for e in c.get("env", []):
                if e["name"] in secrets:
                    assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "mind-secrets"
    env = {e["name"]: e for e in container(one("Deployment", "mind-worker")).get("env", [])}
    assert env["MIND_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert {"MIND_MILVUS_TOKEN", "MIND_KAFKA_SASL_PASSWORD"} <= set(env)


def test_every_project_container_reads_the_settings_and_runs_a_real_command() -> None:
    for doc in workloads():
        for c in pod_spec(doc)["containers"]:
            if c["image"] != "mind-stream":
                continue
            assert c["args"][0] in mind_commands(), c["args"]
            assert {"configMapRef": {"name": "mind-settings"}} in c["envFrom"]
    assert container(one("Job", "mind-topics"))["args"][0] == "topics"
    assert container(one("Job", "mind-index"))["args"] == ["index"]
    assert container(one("Job", "mind-roll"))["args"][0] == "roll"
    for name in ("mind-index", "mind-roll"):  # on demand: `kubectl apply -k` must not run them
        assert one("Job", name)["spec"]["suspend"] is True
    assert "suspend" not in one("Job", "mind-topics")["spec"]
    args = container(one("CronJob", "mind-index-incremental"))["args"]
    assert args[:2] == ["index", "--incremental"] and "--items" in args


def test_worker_probes_ports_and_graceful_shutdown() -> None:
    dep = one("Deployment", "mind-worker")
    c, data = container(dep), settings_map()
    port = int(data["MIND_METRICS_PORT"])
    assert port == DEFAULTS.metrics_port and data["MIND_METRICS_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == port
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # liveness may fail only after the loop was silent longer than stream/health.py's bound
    from stream.health import Health

    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30
    assert Health.liveness_for(DEFAULTS.batch_timeout_ms) == 90
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    grace = pod_spec(dep)["terminationGracePeriodSeconds"]
    assert pre[0] == "sleep" and grace >= int(pre[1]) + 40  # then finish, commit, flush (30 s + 10 s)
    assert (
        dep["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pod_spec(dep)["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mind-models"


def test_worker_replicas_and_autoscaler_fit_the_partitions() -> None:
    data, dep, so = settings_map(), one("Deployment", "mind-worker"), one("ScaledObject", "mind-worker")
    partitions = int(data["MIND_PARTITIONS"])
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert 1 <= so["spec"]["minReplicaCount"] <= dep["spec"]["replicas"] <= so["spec"]["maxReplicaCount"]
    assert so["spec"]["maxReplicaCount"] == partitions  # one member per partition at most
    (trigger,) = so["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["consumerGroup"] == data["MIND_GROUP_ID"] == DEFAULTS.group_id
    assert meta["topic"] == data["MIND_CLICKS_TOPIC"] == DEFAULTS.clicks_topic
    assert meta["bootstrapServers"] == data["MIND_KAFKA_BOOTSTRAP"]
    assert int(meta["lagThreshold"]) > 0 and meta["allowIdleConsumers"] == "false"


def test_view_deployment_and_service() -> None:
    dep, svc = one("Deployment", "mind-view"), one("Service", "mind-view")
    c = container(dep)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert int(env["MIND_VIEW_PORT"]) == VIEW_PORT and env["MIND_VIEW_HOST"] == "0.0.0.0"
    assert dep["spec"]["replicas"] == 1  # one app id = one full copy of the table
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == VIEW_PORT
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http" and svc["spec"]["ports"][0]["port"] == VIEW_PORT
    assert "/healthz" in " ".join(c["readinessProbe"]["exec"]["command"])


def test_triton_serves_the_settings_model_from_the_shared_volume() -> None:
    dep, svc, data = one("Deployment", "triton"), one("Service", "triton"), settings_map()
    args = container(dep)["args"]
    assert "--model-control-mode=explicit" in args and f"--load-model={DEFAULTS.triton_model}" in args
    assert f"--model-repository={data['MIND_MODEL_REPO']}" in args
    host, port = data["MIND_TRITON_URL"].split(":")
    assert host == svc["metadata"]["name"] and int(port) == DEFAULTS.embedded_triton_grpc_port
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"] == int(port)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}[
        "metrics"
    ] == DEFAULTS.embedded_triton_metrics_port
    claims = {
        doc["metadata"]["name"]: v["persistentVolumeClaim"]["claimName"]
        for doc in workloads()
        for v in pod_spec(doc).get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert set(claims.values()) == {one("PersistentVolumeClaim", "mind-models")["metadata"]["name"]}
    assert {"triton", "mind-worker", "mind-index", "mind-index-incremental", "mind-roll"} <= set(claims)
