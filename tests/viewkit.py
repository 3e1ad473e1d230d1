"""`mind view` as its own process over a recall topic, for the view's tests (shared by test_view and
test_hostile)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from stream.embedded.kafka import free_port


@dataclass
class View:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path
    health: dict[str, Any]


def healthz(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while restoring still carries the JSON body
        return json.loads(e.read())


@contextmanager
def running_view(
    kafka_bootstrap: str,
    msgs: list[tuple[bytes | None, bytes | None]],
    work: Path,
    tag: str,
    ready: Callable[[dict[str, Any]], bool],
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Iterator[View]:
    """Produce `msgs` (key, value) to a fresh recall topic, start `mind view` on a free port, wait until
    `ready(healthz)`; SIGTERM it afterwards. `env`: more MIND_* variables (e.g. the stores the user page
    reads), over the defaults below."""
    topic = f"recall-{tag}"
    if msgs:
        p = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
        for key, value in msgs:
            p.produce(topic, value, key)
        assert p.flush(10) == 0
    port = free_port()
    variables = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "MIND_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "MIND_RECALL_TOPIC": topic,
        "MIND_CLICKS_TOPIC": f"clicks-{tag}",
        "MIND_DLQ_TOPIC": f"dlq-{tag}",
        "MIND_PARTITIONS": "2",
        "MIND_RUN_DIR": str(work / "run"),
        **(env or {}),
    }
    log = work / "view.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "view", "--port", str(port), "--app-id", f"view-{tag}"]
            + ["--log-level", "warning"],
            env=variables,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    health: dict[str, Any] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            health = healthz(url)
            if ready(health):
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"view not ready ({health}); log:\n{log.read_text()[-3000:]}")
    try:
        yield View(url, port, proc, variables, log, health)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
