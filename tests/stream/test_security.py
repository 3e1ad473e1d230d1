"""Security basics, on real servers:

- every server the project starts (the embedded stack, Triton, the worker's metrics/health endpoint, the
  candidate view) listens on loopback only by default: no LISTEN socket on 0.0.0.0 / ::;
- Kafka SASL/TLS and Redis auth settings reach the clients (librdkafka configs, faust credentials, a real
  Valkey with requirepass); a wrong password stops the worker at once with a clear message;
- secrets set as MIND_KAFKA_SASL_PASSWORD / MIND_REDIS_PASSWORD / MIND_MILVUS_TOKEN never appear in any
  output or written file of `mind up`, `mind status`, `mind down`, the worker and the view.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
from workerkit import Reader, publish

from stream.embedded.kafka import free_port
from stream.embedded.redis import EmbeddedRedis
from stream.embedded.stack import read_state
from stream.schemas import Click, dump_click
from stream.settings import Settings, kafka_config, redis_client
from stream.state import WindowState
from stream.view import faust_credentials
from stream.worker import build_worker

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MIND = [sys.executable, "-m", "cli"]


def listening(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every LISTEN socket of the process and its children."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # milvus-lite listens on ::ffff:127.0.0.1
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def assert_loopback(name: str, pid: int, wait_s: float = 0.0) -> list[tuple[str, int]]:
    deadline = time.monotonic() + wait_s
    socks = listening(pid)
    while not socks and time.monotonic() < deadline:
        time.sleep(0.1)
        socks = listening(pid)
    assert socks, f"{name} (pid {pid}) listens on nothing"
    assert all(loopback(ip) for ip, _ in socks), f"{name} listens beyond loopback: {socks}"
    return socks


def run(cmd: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ---- (b) the settings reach the clients ---------------------------------------------------------------


def test_kafka_security_settings_reach_every_client() -> None:
    s = Settings(
        kafka_bootstrap="k1:9093,k2:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="mind",
        kafka_sasl_password="pw-sasl",
        kafka_ssl_ca_location="/etc/ca.pem",
        kafka_ssl_certificate_location="/etc/client.pem",
        kafka_ssl_key_location="/etc/client.key",
        kafka_ssl_key_password="pw-key",
    )
    want = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "mind",
        "sasl.password": "pw-sasl",
        "ssl.ca.location": "/etc/ca.pem",
        "ssl.certificate.location": "/etc/client.pem",
        "ssl.key.location": "/etc/client.key",
        "ssl.key.password": "pw-key",
    }
    for role in ("producer", "consumer", "admin"):
        conf = kafka_config(s, role)  # type: ignore[arg-type]
        assert {k: conf[k] for k in want} == want, role
    # the view (faust / aiokafka): the same credentials, TLS included when the protocol says so
    plain = s.model_copy(update={"kafka_security_protocol": "SASL_PLAINTEXT"})
    cred = faust_credentials(plain)
    assert (cred.username, cred.password, str(cred.mechanism.value)) == ("mind", "pw-sasl", "SCRAM-SHA-512")
    assert cred.ssl_context is None and "pw-sasl" not in repr(cred)
    tls = faust_credentials(
        s.model_copy(update={"kafka_ssl_ca_location": None, "kafka_ssl_certificate_location": None})
    )
    assert tls.ssl_context is not None and tls.password == "pw-sasl"
    assert faust_credentials(Settings(kafka_bootstrap="k:9092")) is None  # PLAINTEXT by default


def test_redis_auth_against_a_real_valkey_and_a_wrong_password_fails_fast(tmp_path: Path) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    server = EmbeddedRedis(tmp_path, password=secret, persist=False)
    url = server.start()
    try:
        assert (tmp_path / "redis" / "server.conf").stat().st_mode & 0o077 == 0  # requirepass file: 0600
        # the worker's client (stream.settings.redis_client), password given apart or inside the URL
        for k, s in enumerate(
            (
                Settings(redis_url=url, redis_password=secret),
                Settings(redis_url=url.replace("redis://", f"redis://:{secret}@")),
            )
        ):
            assert s.redis_url == url and secret not in repr(s)
            client = redis_client(s)
            state = WindowState(client, f"clicks{k}", 8)
            assert state.apply(0, 5, [("u", [5], [7])])[0].applied == 1
            assert state.read_windows([(0, "u")]) == [[7]]
            client.close()
        # the worker itself: a refused password is a configuration error, raised at once, not retried
        for wrong in (f"wrong-{secret}", None):
            s = Settings(redis_url=url, redis_password=wrong, kafka_bootstrap="127.0.0.1:1")
            stop = threading.Event()
            t0 = time.monotonic()
            with pytest.raises(ValueError, match="authentication failed") as err:
                build_worker(s, cast(Any, None), stop)  # redis is the first server it reaches
            assert time.monotonic() - t0 < 5 and "MIND_REDIS_PASSWORD" in str(err.value)
            assert secret not in str(err.value)
    finally:
        server.stop()


# ---- (a) loopback and (c) no secret in any output, one run of the whole thing -------------------------


def test_servers_bind_loopback_and_secrets_never_show(
    tmp_path: Path, cli_env: dict[str, str], worker_model: Any, triton: Any, uid: str
) -> None:
    """`mind up` (Tansu, Valkey with a password, milvus-lite), `mind status`, the worker (python -m
    stream.worker) and `mind view` run with every secret set to a unique marker; the worker processes
    clicks through the password-protected Valkey; then everything is grepped for the marker."""
    wm = worker_model
    marker = f"MARKER{uuid.uuid4().hex}"
    env = {
        **cli_env,
        "MIND_KAFKA_SASL_PASSWORD": marker,
        "MIND_REDIS_PASSWORD": marker,
        "MIND_MILVUS_TOKEN": marker,
        "PYTHONPATH": str(ROOT),
    }
    run_dir = Path(env["MIND_RUN_DIR"])
    outputs: dict[str, str] = {}
    t0 = time.monotonic()
    up = run([*MIND, "up", "--detach", "--no-triton"], env)
    outputs["mind up"] = up.stdout + up.stderr
    assert up.returncode == 0, outputs["mind up"]
    phases = {"up": time.monotonic() - t0}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        state = read_state(run_dir)
        assert state is not None
        addr = state["addresses"]
        # the worker on the stack's broker and password-protected Valkey, the session's Triton and Milvus;
        # started first (they take the longest), checked while they start
        s = wm.settings(addr["kafka_bootstrap"], addr["redis_url"], uid, metrics_port=free_port())
        config = tmp_path / "worker.json"
        fields = {k: v for k, v in s.model_dump(mode="json").items() if k in s.model_fields_set}
        config.write_text(json.dumps({**fields, "run_dir": str(run_dir)}))
        logs = {name: tmp_path / f"{name}.log" for name in ("worker", "view")}
        cmds = {
            "worker": [sys.executable, "-m", "stream.worker", "--config", str(config)]
            + ["--checkpoint", str(wm.checkpoint)],
            "view": [*MIND, "view", "--config", str(config), "--port", str(free_port())]
            + ["--app-id", f"sec-{uid}"],
        }
        for name, cmd in cmds.items():
            with open(logs[name], "wb") as out:
                procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        st = run([*MIND, "status"], env)
        outputs["mind status"] = st.stdout + st.stderr
        assert st.returncode == 0, st.stderr
        socks = {name: assert_loopback(name, svc["pid"]) for name, svc in state["services"].items()}
        assert set(socks) == {"kafka", "redis", "milvus"}
        socks["triton"] = assert_loopback("triton", triton.server.pid)
        assert len(socks["triton"]) >= 3  # gRPC, HTTP and metrics
        clicks = [
            Click(f"{uid}-{k}", str(k % 3), wm.inter.items.raw_of(2 + k), time.time()) for k in range(6)
        ]
        events: list[tuple[str | bytes | None, bytes | None]] = [(c.user_id, dump_click(c)) for c in clicks]
        events.append((b"0", b"{not json"))  # a dead letter too (its reason is logged)
        phases["checked"] = time.monotonic() - t0
        reader = Reader(addr["kafka_bootstrap"], s.recall_topic, s.partitions)
        try:
            publish(addr["kafka_bootstrap"], s.clicks_topic, events)
            reader.until(lambda v: {json.loads(x)["event_id"] for x in v} >= {clicks[-1].event_id}, 60)
        finally:
            reader.close()
        phases["recalled"] = time.monotonic() - t0
        socks["worker"] = assert_loopback("worker metrics/health", procs["worker"].pid, wait_s=5)
        socks["view"] = assert_loopback("view", procs["view"].pid, wait_s=30)
        phases["view"] = time.monotonic() - t0
        for p in procs.values():  # both at once: each takes seconds to leave its group
            p.send_signal(signal.SIGTERM)
        for name, p in procs.items():
            assert p.wait(30) == 0, f"{name}: {logs[name].read_text()[-2000:]}"
        phases["stopped"] = time.monotonic() - t0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        down = run([*MIND, "down"], env)
        outputs["mind down"] = down.stdout + down.stderr
    assert down.returncode == 0, outputs["mind down"]
    for name, path in logs.items():
        outputs[name] = path.read_text(errors="replace")
    assert "worker started" in outputs["worker"] and "dead letter" in outputs["worker"]

    # the marker: nowhere in what was printed or written, except Valkey's own 0600 config (requirepass)
    assert not [name for name, text in outputs.items() if marker in text]
    files = sorted({p for p in tmp_path.rglob("*") if p.is_file()})  # run_dir is inside tmp_path
    conf = run_dir / "redis" / "server.conf"
    assert conf.stat().st_mode & 0o077 == 0 and marker.encode() in conf.read_bytes()  # the password was used
    leaks = [str(p) for p in files if p != conf and marker.encode() in p.read_bytes()]
    assert not leaks
    print(
        f"\nlisten sockets (all loopback): { {k: sorted({ip for ip, _ in v}) for k, v in socks.items()} }; "
        f"{len(files)} files and {len(outputs)} outputs clean; {time.monotonic() - t0:.1f} s "
        f"({ {k: round(v, 1) for k, v in phases.items()} })"
    )
