"""The embedded stack (`mind up` / `mind down`) with real servers: health, stop from another process, one
stack per run dir, clear errors, nothing left running (not even after Ctrl-C or a kill -9 of its owner)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream.embedded.stack import (
    Stack,
    StackError,
    StackRunning,
    is_alive,
    read_state,
    settings_for,
    status,
)
from stream.settings import Settings

MIND = [sys.executable, "-m", "cli"]


def _mind(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MIND, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _settings(run_dir: Path, **kw: Any) -> Settings:
    ports = {
        f"embedded_{n}_port": 0
        for n in ("kafka", "redis", "milvus", "triton_grpc", "triton_http", "triton_metrics")
    }
    return Settings(run_dir=run_dir, **{**ports, **kw})


def _pids(state: dict[str, Any]) -> list[tuple[int, int | None]]:
    return [(s["pid"], s["start"]) for s in state["services"].values()]


def _all_gone(pids: list[tuple[int, int | None]], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while any(is_alive(p, s) for p, s in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(is_alive(p, s) for p, s in pids)


def test_detached_up_status_refuse_second_down_from_cli(tmp_path: Path, cli_env: dict[str, str]) -> None:
    run = tmp_path / "run"
    up = _mind(["up", "--detach", "--no-triton", "--json", "--run-dir", str(run)], cli_env)
    assert up.returncode == 0, up.stderr
    state = orjson.loads(up.stdout)
    assert set(state["services"]) == {"kafka", "redis", "milvus"}
    assert state["skipped"]["triton"].startswith("disabled")
    assert all(s["host"] == "127.0.0.1" for s in state["services"].values())
    supervisor = (state["owner"]["pid"], state["owner"]["start"])
    try:
        st = _mind(["status", "--json", "--run-dir", str(run)], cli_env)
        assert st.returncode == 0 and orjson.loads(st.stdout)["healthy"], st.stdout
        # each server really answers, and the topics were created
        from confluent_kafka.admin import AdminClient
        from pymilvus import MilvusClient

        s = settings_for(run, Settings())
        topics = AdminClient({"bootstrap.servers": s.kafka_bootstrap}).list_topics(timeout=5).topics
        assert {"clicks", "recall", "clicks.dlq"} <= set(topics)
        import redis

        assert redis.Redis.from_url(s.redis_url).ping()
        assert MilvusClient(uri=s.milvus_uri).list_collections() == []
        assert (run / "kafka" / "tansu.log").exists() and (run / "redis" / "server.log").exists()

        again = _mind(["up", "--detach", "--run-dir", str(run)], cli_env)
        assert again.returncode == 3 and "already running" in again.stderr
    finally:
        down = _mind(["down", "--json", "--run-dir", str(run)], cli_env)
    assert down.returncode == 0, down.stderr
    report = orjson.loads(down.stdout)
    assert report["owner"] == "stopped" and set(report["services"]) == {"kafka", "redis", "milvus"}
    assert _all_gone([*_pids(state), supervisor])
    assert read_state(run) is None
    assert _mind(["status", "--run-dir", str(run)], cli_env).returncode == 3


def test_in_process_stack_second_refused_and_down_from_another_process(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    run = tmp_path / "run"
    stack = Stack(run, _settings(run), services=("kafka", "redis"))
    stack.start()
    try:
        s = settings_for(stack)
        assert s.kafka_bootstrap and s.redis_url and s.milvus_uri is None
        with pytest.raises(StackRunning, match="already running"):
            Stack(run, _settings(run), services=("kafka",)).start()
        state = stack.state()
        assert status(run)["running"]
        down = _mind(["down", "--run-dir", str(run)], cli_env)
        assert down.returncode == 0, down.stderr
        assert _all_gone(_pids(state))
    finally:
        stack.stop()  # finds its servers gone: nothing to do, no error
    assert not stack.running and read_state(run) is None
    Stack(run, _settings(run), services=("redis",)).start().stop()  # the run dir is free again


def test_owner_killed_then_down_cleans_up(tmp_path: Path, cli_env: dict[str, str]) -> None:
    run = tmp_path / "run"
    up = _mind(["up", "-d", "--only", "kafka,redis", "--json", "--run-dir", str(run)], cli_env)
    assert up.returncode == 0, up.stderr
    state = orjson.loads(up.stdout)
    os.kill(state["owner"]["pid"], signal.SIGKILL)  # servers run in their own sessions: they survive
    assert _all_gone([(state["owner"]["pid"], state["owner"]["start"])])
    st = status(run)
    assert st["running"] and not st["owner_alive"]
    again = _mind(["up", "-d", "--only", "kafka", "--run-dir", str(run)], cli_env)
    assert again.returncode == 3
    down = _mind(["down", "--run-dir", str(run)], cli_env)
    assert down.returncode == 0, down.stderr
    assert _all_gone(_pids(state))


def test_port_taken_is_a_clear_error_and_nothing_starts(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        stack = Stack(tmp_path, _settings(tmp_path, embedded_redis_port=taken), services=("kafka", "redis"))
        with pytest.raises(StackError, match=rf"redis: redis port 127\.0\.0\.1:{taken} is taken"):
            stack.start()
    assert stack.launchers == {} and read_state(tmp_path) is None and not stack.running


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "no-such-tansu"))
    with pytest.raises(StackError, match="kafka: CALF_TANSU_BIN=.*not an executable"):
        Stack(tmp_path, _settings(tmp_path), services=("kafka", "redis")).start()


def test_interrupt_during_start_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = Stack(tmp_path, _settings(tmp_path), services=("kafka", "redis"))
    started: list[tuple[int, int | None]] = []

    def ctrl_c(bootstrap: str) -> None:  # Ctrl-C lands right after the broker is up
        started.append((stack.launchers["kafka"].pid, None))
        raise KeyboardInterrupt

    monkeypatch.setattr(stack, "_create_topics", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        stack.start()
    assert started and _all_gone(started, timeout=2)
    assert read_state(tmp_path) is None and not stack.running


@pytest.mark.slow
def test_full_stack_with_triton(tmp_path: Path, cli_env: dict[str, str]) -> None:
    from towerkit import ToyTower, export

    repo = tmp_path / "repo"
    export(ToyTower(0), repo, "toy", "toy-1")
    run = tmp_path / "run"
    up = _mind(["up", "-d", "--triton", "--model-repo", str(repo), "--json", "--run-dir", str(run)], cli_env)
    assert up.returncode == 0, up.stderr
    state = orjson.loads(up.stdout)
    try:
        assert list(state["services"]) == ["kafka", "redis", "milvus", "triton"]  # dependency order
        assert state["services"]["triton"]["models"] == ["toy"]
        st = status(run)
        assert all(s["healthy"] for s in st["services"].values()), st
        triton_group = state["services"]["triton"]["pgid"]
        from stream.embedded.stack import group_members

        assert len(group_members(triton_group)) >= 2  # the server and its Python-backend stub
    finally:
        down = _mind(["down", "--run-dir", str(run)], cli_env)
    assert down.returncode == 0, down.stderr
    assert _all_gone(_pids(state)) and group_members(triton_group) == []
