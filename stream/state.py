"""The worker's state in the key-value store (Redis protocol): windows, processed offsets, interests.

Key layout (`prefix` defaults to "mind"; `{...}` is a Redis Cluster hash tag, so one partition's keys share
a slot and one script may touch them all):

    mind:{clicks.3}:offset         string  last offset of partition 3 applied to the windows
    mind:{clicks.3}:win:<user>     list    the user's item indices, oldest first, at most max_len
    mind:interests:<user>          hash    vec (float32 bytes, [k, d] active interests), k, d,
                                           model_version, ts (unix seconds of the refresh)

Exactly-once effect: APPLY_LUA appends a partition's clicks of one batch AND stores the partition's new
offset in one script, which Redis runs atomically. A click is appended only if its offset is greater than
the stored one, so a re-delivered click (crash before the Kafka commit, a rebalance, a zombie worker) is
skipped, and a batch that overlaps an applied one applies only its newer clicks. Windows are per
partition because the windows and the offset that guards them must be written together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import redis
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from stream import metrics

_T = TypeVar("_T")

# KEYS[1] = the partition's offset key, KEYS[1 + i] = window key of user i.
# ARGV[1] = last offset of the batch in this partition, ARGV[2] = max_len, then per user i:
# n_i, followed by n_i (offset, item) pairs in offset order.
# Returns {offset stored before, clicks applied, offset stored after}.
APPLY_LUA = """
local stored = tonumber(redis.call('GET', KEYS[1]) or '-1')
local last = tonumber(ARGV[1])
if stored >= last then
  return {stored, 0, stored}
end
for i = 2, #KEYS do  -- check every key first: a script's writes are not rolled back on a later error
  local t = redis.call('TYPE', KEYS[i]).ok
  if t ~= 'list' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE window key ' .. KEYS[i] .. ' holds a ' .. t .. '; nothing applied')
  end
end
local max_len = tonumber(ARGV[2])
local p = 3
local applied = 0
for i = 2, #KEYS do
  local n = tonumber(ARGV[p])
  p = p + 1
  local items = {}
  for j = 1, n do
    if tonumber(ARGV[p]) > stored then
      items[#items + 1] = ARGV[p + 1]
    end
    p = p + 2
  end
  if #items > 0 then
    for s = 1, #items, 1000 do  -- unpack() has a stack limit: push in chunks
      redis.call('RPUSH', KEYS[i], unpack(items, s, math.min(s + 999, #items)))
    end
    redis.call('LTRIM', KEYS[i], -max_len, -1)
    applied = applied + #items
  end
end
redis.call('SET', KEYS[1], last)
return {stored, applied, last}
"""

# Connection-level failures: worth a quick retry here; the worker pauses and retries longer.
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class ApplyResult(NamedTuple):
    stored_before: int  # -1: the partition had no stored offset
    applied: int  # clicks appended
    skipped: int  # clicks at or below the stored offset (re-delivered)


class WindowState:
    """Redis adapter for one clicks topic. Thread-safe as the redis-py client is (connection pool)."""

    def __init__(
        self,
        client: Any,
        topic: str,
        max_len: int,
        *,
        prefix: str = "mind",
        attempts: int = 3,
        wait_max_s: float = 1.0,
    ) -> None:
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        self.client, self.topic, self.max_len, self.prefix = client, topic, max_len, prefix
        self._apply = client.register_script(APPLY_LUA)  # EVALSHA, loading the script on NOSCRIPT
        self._retrying = Retrying(
            stop=stop_after_attempt(max(1, attempts)),
            wait=wait_exponential(multiplier=0.05, max=wait_max_s),
            retry=retry_if_exception_type(TRANSIENT),
            before_sleep=lambda _rs: metrics.RETRIES.labels("redis").inc(),
            reraise=True,
        )

    def _call(self, fn: Callable[[], _T]) -> _T:
        return self._retrying(fn)

    # ---- keys ------------------------------------------------------------------------------------

    def slot_tag(self, partition: int) -> str:
        return f"{{{self.topic}.{int(partition)}}}"

    def offset_key(self, partition: int) -> str:
        return f"{self.prefix}:{self.slot_tag(partition)}:offset"

    def window_key(self, partition: int, user_id: str) -> str:
        return f"{self.prefix}:{self.slot_tag(partition)}:win:{user_id}"

    def interests_key(self, user_id: str) -> str:
        return f"{self.prefix}:interests:{user_id}"

    # ---- windows + offsets, atomically -------------------------------------------------------------

    def apply(
        self, partition: int, last_offset: int, users: Sequence[tuple[str, Sequence[int], Sequence[int]]]
    ) -> ApplyResult:
        """One script call for one partition's share of a batch.

        users: (user_id, offsets, items) per user, offsets ascending. Clicks with offset <= the stored
        offset are skipped; the stored offset becomes `last_offset` unless it already was >= it.
        """
        keys = [self.offset_key(partition)]
        args: list[Any] = [int(last_offset), self.max_len]
        total = 0
        for user_id, offsets, items in users:
            if len(offsets) != len(items):
                raise ValueError("offsets and items must have the same length")
            keys.append(self.window_key(partition, user_id))
            args.append(len(items))
            for off, item in zip(offsets, items, strict=True):
                args.extend((int(off), int(item)))
            total += len(items)
        before, applied, _ = self._call(lambda: self._apply(keys=keys, args=args))
        return ApplyResult(int(before), int(applied), total - int(applied))

    def read_windows(self, users: Sequence[tuple[int, str]]) -> list[list[int]]:
        """The windows of (partition, user) pairs, oldest item first (one pipelined round trip)."""
        if not users:
            return []

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for partition, user_id in users:
                pipe.lrange(self.window_key(partition, user_id), 0, -1)
            return list(pipe.execute())

        return [[int(x) for x in w] for w in self._call(run)]

    def offsets(self, partitions: Sequence[int]) -> dict[int, int]:
        """Stored last-applied offset per partition; -1 where none (read on partition assignment)."""

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for p in partitions:
                pipe.get(self.offset_key(p))
            return list(pipe.execute())

        got = self._call(run) if partitions else []
        return {p: int(v) if v is not None else -1 for p, v in zip(partitions, got, strict=True)}

    def reset_offset(self, partition: int, offset: int) -> None:
        """Overwrite a partition's stored offset: an operator's tool for when the log it guarded is gone
        (a broker that lost its data restarts offsets at 0, and clicks at or below the stored offset
        would be skipped)."""
        self._call(lambda: self.client.set(self.offset_key(partition), int(offset)))

    # ---- interest vectors --------------------------------------------------------------------------

    def write_interests(
        self,
        users: Sequence[str],
        vectors: np.ndarray,
        active: np.ndarray,
        model_version: str,
        ts: float | None = None,
    ) -> None:
        """Store each user's active interest vectors [k, d] (float32 bytes) with the version and time."""
        vec = np.asarray(vectors, dtype=np.float32)
        act = np.asarray(active, dtype=bool)
        if vec.ndim != 3 or act.shape != vec.shape[:2] or len(users) != vec.shape[0]:
            raise ValueError(f"need vectors [B,K,d] and active [B,K] for {len(users)} users")
        now = time.time() if ts is None else float(ts)
        d = vec.shape[2]

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for u, v, a in zip(users, vec, act, strict=True):
                rows = np.ascontiguousarray(v[a], dtype="<f4")
                pipe.hset(
                    self.interests_key(u),
                    mapping={
                        "vec": rows.tobytes(),
                        "k": int(rows.shape[0]),
                        "d": d,
                        "model_version": model_version,
                        "ts": repr(now),
                    },
                )
            pipe.execute()

        if users:
            self._call(run)

    def read_interests(self, user_id: str) -> tuple[np.ndarray, str, float] | None:
        """(vectors [k, d], model_version, ts) or None: for the candidate view, tools and tests."""
        h = self._call(lambda: self.client.hgetall(self.interests_key(user_id)))
        if not h:
            return None
        k, d = int(h[b"k"]), int(h[b"d"])
        vec = np.frombuffer(h[b"vec"], dtype="<f4").reshape(k, d)
        return vec, h[b"model_version"].decode(), float(h[b"ts"])
