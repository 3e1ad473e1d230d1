"""The worker's state in the key-value store (Redis protocol): windows, processed offsets, recent event ids,
interest vectors.

Key layout (`prefix` defaults to "mind"; `{...}` is a Redis Cluster hash tag, so every key of one partition
shares a slot and one script may touch them all):

    mind:{clicks.3}:offset         string  last offset of partition 3 applied to the windows
    mind:{clicks.3}:gen            string  the partition's log generation: bumped when the offset is reset
                                           for a new log (a broker that lost its data), 0 when absent
    mind:{clicks.3}:events         zset    event ids applied recently (score = offset), at most
                                           `event_memory` per partition: the duplicate-event check
    mind:{clicks.3}:win:<user>     list    the user's behaviours, oldest first, at most max_len; an entry
                                           is "item:ts" (item index, click time in unix seconds), or
                                           "item" as written before times were kept (time unknown = 0)
    mind:{clicks.3}:int:<user>     hash    vec (float32 bytes, [k, d] active interests), k, d,
                                           model_version, ts (unix seconds of the refresh), fence (see
                                           below: the generation and offset of the triggering click)

Exactly-once effect: APPLY_LUA appends a partition's clicks of one batch AND stores the partition's new
offset in one script, which Redis runs atomically. A click is appended only if its offset is greater than
the stored one, so a re-delivered click (crash before the Kafka commit, a rebalance, a zombie worker) is
skipped, and a batch that overlaps an applied one applies only its newer clicks. A click whose event id
was applied within the last `event_memory` clicks of its partition is skipped too (a producer that retried
without idempotence, a log replayed twice). The script returns the touched windows, so a partition's
share of a batch is one script call for both the write and the read; calling it again (a retry) applies
nothing and returns the same windows. The calls of a batch's partitions go out in one pipelined round
trip (without MULTI: each call is atomic by itself, and the partitions are independent).

Fencing: every write derived from a batch carries the fence of the click that triggered it,
`fence(generation, offset)` = generation * 10**12 + offset, which only grows along a partition's history,
even across a reset of the log (a new generation). INTERESTS_LUA writes a user's interest vectors only if
the refresh's fence is newer than the stored one, atomically, so a worker that stalls past its session (a
zombie) and wakes up cannot overwrite the fresher vectors of the partition's new owner. The recall message
carries the same fence, and the candidate view keeps the newest by it. Windows are fenced by the
partition offset itself.

Redis Cluster (`client` a redis.cluster.RedisCluster, see stream.settings.redis_client): each script call
names only keys of one partition, so it goes to the one node that serves that slot. Script calls and reads
are pipelines without MULTI, which the cluster client splits by node. While a slot migrates, a script call
that names a key the node does not hold (moved already, or absent, like the generation key of a partition
never reset) is refused with TRYAGAIN or redirected before it runs; redis-py retries TRYAGAIN for about
0.4 s, then raises, and the worker retries the batch, which the offset guard makes safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import redis
from redis.exceptions import NoScriptError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from stream import metrics
from stream.settings import cluster_error

_T = TypeVar("_T")

FENCE_STRIDE = 10**12  # offsets below a trillion; generation * stride + offset stays exact in a Lua double


def fence(generation: int, offset: int) -> int:
    """The order of writes derived from a partition's clicks: by log generation, then by offset."""
    return int(generation) * FENCE_STRIDE + int(offset)


# KEYS[1] = the partition's offset key, KEYS[2] = its recent event ids, KEYS[3] = its log generation,
# KEYS[3 + i] = window key of user i.
# ARGV[1] = last offset of the batch in this partition, ARGV[2] = max_len, ARGV[3] = event_memory (0 = no
# event-id check), then per user i: n_i, followed by n_i (offset, event id, entry) triples in offset order.
# Returns {offset stored before, clicks applied, duplicate events skipped, offset stored after, generation,
# window...}:
# the windows of the users in KEYS order, each a list of entries.
APPLY_LUA = """
local stored = tonumber(redis.call('GET', KEYS[1]) or '-1')
local last = tonumber(ARGV[1])
local max_len = tonumber(ARGV[2])
local memory = tonumber(ARGV[3])
local applied, dupes = 0, 0
if stored < last then
  for i = 4, #KEYS do  -- check every key first: a script's writes are not rolled back on a later error
    local t = redis.call('TYPE', KEYS[i]).ok
    if t ~= 'list' and t ~= 'none' then
      return redis.error_reply('WRONGTYPE window key ' .. KEYS[i] .. ' holds a ' .. t .. '; nothing applied')
    end
  end
  local p = 4
  for i = 4, #KEYS do
    local n = tonumber(ARGV[p])
    p = p + 1
    local entries = {}
    for j = 1, n do
      local off, event = tonumber(ARGV[p]), ARGV[p + 1]
      if off > stored then
        if memory > 0 and redis.call('ZSCORE', KEYS[2], event) then
          dupes = dupes + 1
        else
          entries[#entries + 1] = ARGV[p + 2]
          if memory > 0 then redis.call('ZADD', KEYS[2], off, event) end
        end
      end
      p = p + 3
    end
    if #entries > 0 then
      for s = 1, #entries, 1000 do  -- unpack() has a stack limit: push in chunks
        redis.call('RPUSH', KEYS[i], unpack(entries, s, math.min(s + 999, #entries)))
      end
      redis.call('LTRIM', KEYS[i], -max_len, -1)
      applied = applied + #entries
    end
  end
  if memory > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -memory - 1) end
  redis.call('SET', KEYS[1], last)
end
local out = {stored, applied, dupes, math.max(stored, last), tonumber(redis.call('GET', KEYS[3]) or '0')}
for i = 4, #KEYS do out[#out + 1] = redis.call('LRANGE', KEYS[i], 0, -1) end
return out
"""

# KEYS[i] = interests key of user i (one partition: one slot). ARGV: 6 values per user i: fence, vec
# bytes, k, d, model_version, ts. Writes a user's hash only if its stored fence is older. Returns the
# number of users written.
INTERESTS_LUA = """
local written = 0
for i = 1, #KEYS do
  local a = (i - 1) * 6
  local fence = tonumber(ARGV[a + 1])
  local stored = tonumber(redis.call('HGET', KEYS[i], 'fence') or '-1')
  if fence > stored then
    redis.call('HSET', KEYS[i], 'fence', ARGV[a + 1], 'vec', ARGV[a + 2], 'k', ARGV[a + 3], 'd', ARGV[a + 4],
               'model_version', ARGV[a + 5], 'ts', ARGV[a + 6])
    written = written + 1
  end
end
return written
"""

# Connection-level failures: worth a quick retry here; the worker pauses and retries longer.
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _cluster_errors_as_redis_errors(fn: Callable[[], _T]) -> _T:
    """fn(), with the cluster client's "no node / slot not served" errors raised as a redis ConnectionError
    (stream.settings.cluster_error): its pipelines do not pass through the client's own translation."""
    try:
        return fn()
    except Exception as exc:
        err = cluster_error(exc)
        if err is exc:
            raise
        raise err from exc


def _raise_first_error(outs: Sequence[Any]) -> None:
    """Pipelined calls answer each for itself: the first that failed fails the batch."""
    failed = next((out for out in outs if isinstance(out, BaseException)), None)
    if failed is not None:
        raise failed


class ApplyResult(NamedTuple):
    stored_before: int  # -1: the partition had no stored offset
    applied: int  # clicks appended
    skipped: int  # clicks at or below the stored offset (re-delivered)
    duplicates: int  # clicks whose event id was applied already (a duplicated event)
    generation: int = 0  # the partition's log generation (its fences are built on it)


class Window(NamedTuple):
    """One user's behaviours, oldest first: item indices and click times (unix seconds, 0 = unknown)."""

    items: list[int]
    times: list[int]


class UserClicks(NamedTuple):
    """One user's clicks of a batch in one partition, in offset order."""

    user_id: str
    offsets: Sequence[int]
    items: Sequence[int]
    event_ids: Sequence[str] = ()  # empty: no event-id check for these clicks
    times: Sequence[int] = ()  # click times, unix seconds; empty: unknown (0)


class Share(NamedTuple):
    """One partition's share of a batch for the window script: its users' clicks and the batch's last
    offset in that partition (the value the offset guard stores)."""

    partition: int
    last_offset: int
    users: Sequence[UserClicks | tuple[Any, ...]]


class InterestRows(NamedTuple):
    """One partition's share of a batch for the interests script: users, their fences, vectors [B,K,d]
    and active masks [B,K]."""

    partition: int
    users: Sequence[str]
    fences: Sequence[int]
    vectors: np.ndarray
    active: np.ndarray


def parse_window(entries: Sequence[bytes | str]) -> Window:
    """Stored entries -> Window. "item:ts" since times are kept, a bare "item" before (time unknown)."""
    items, times = [], []
    for e in entries:
        text = e.decode() if isinstance(e, bytes) else e
        item, _, ts = text.partition(":")
        items.append(int(item))
        times.append(int(ts) if ts else 0)
    return Window(items, times)


class WindowState:
    """Redis adapter for one clicks topic. Thread-safe as the redis-py client is (connection pool)."""

    def __init__(
        self,
        client: Any,
        topic: str,
        max_len: int,
        *,
        prefix: str = "mind",
        event_memory: int = 0,
        attempts: int = 3,
        wait_max_s: float = 1.0,
    ) -> None:
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        if event_memory < 0:
            raise ValueError("event_memory must be >= 0 (0 = no duplicate-event check)")
        self.client, self.topic, self.max_len, self.prefix = client, topic, max_len, prefix
        self.event_memory = event_memory
        self._apply = client.register_script(APPLY_LUA)  # EVALSHA, loading the script on NOSCRIPT
        self._interests = client.register_script(INTERESTS_LUA)
        self._retrying = Retrying(
            stop=stop_after_attempt(max(1, attempts)),
            wait=wait_exponential(multiplier=0.05, max=wait_max_s),
            retry=retry_if_exception_type(TRANSIENT),
            before_sleep=lambda _rs: metrics.RETRIES.labels("redis").inc(),
            reraise=True,
        )

    def _call(self, fn: Callable[[], _T]) -> _T:
        return self._retrying(lambda: _cluster_errors_as_redis_errors(fn))

    # ---- keys ------------------------------------------------------------------------------------

    def slot_tag(self, partition: int) -> str:
        return f"{{{self.topic}.{int(partition)}}}"

    def offset_key(self, partition: int) -> str:
        return f"{self.prefix}:{self.slot_tag(partition)}:offset"

    def generation_key(self, partition: int) -> str:
        return f"{self.prefix}:{self.slot_tag(partition)}:gen"

    def events_key(self, partition: int) -> str:
        return f"{self.prefix}:{self.slot_tag(partition)}:events"

    def window_key(self, partition: int, user_id: str) -> str:
        return f"{self.prefix}:{self.slot_tag(partition)}:win:{user_id}"

    def interests_key(self, partition: int, user_id: str) -> str:
        return f"{self.prefix}:{self.slot_tag(partition)}:int:{user_id}"

    # ---- windows + offsets, atomically -------------------------------------------------------------

    def apply(
        self, partition: int, last_offset: int, users: Sequence[UserClicks | tuple[Any, ...]]
    ) -> tuple[ApplyResult, list[Window]]:
        """One partition's share of a batch (see apply_batch)."""
        into: dict[int, tuple[ApplyResult, list[Window]]] = {}
        self.apply_batch([Share(partition, last_offset, users)], into)
        return into[partition]

    def apply_batch(self, shares: Sequence[Share], into: dict[int, tuple[ApplyResult, list[Window]]]) -> None:
        """Apply each partition's share of a batch, one script call each, all in one round trip; each
        partition's result (what it did, and its users' windows after it, in `users` order) lands in
        `into` as it arrives, so a caller that retries after an error sends only the partitions missing.

        Clicks with offset <= the stored offset are skipped, and so are clicks whose event id is among the
        partition's last `event_memory` applied ones; the stored offset becomes `last_offset` unless it
        already was >= it.
        """
        calls, totals = [], []
        for share in shares:
            keys, args, total = self._apply_call(share)
            calls.append((keys, args))
            totals.append(total)
        outs: list[Any] = [None] * len(calls)
        try:
            self._scripts(self._apply, calls, outs)
        finally:  # what succeeded is kept, even when the retries of the rest ran out
            for share, total, out in zip(shares, totals, outs, strict=True):
                if out is None or isinstance(out, BaseException):
                    continue
                before, applied, dupes, gen = int(out[0]), int(out[1]), int(out[2]), int(out[4])
                windows = [parse_window(w) for w in out[5:]]
                res = ApplyResult(before, applied, total - applied - dupes, dupes, gen)
                into[share.partition] = res, windows
        _raise_first_error(outs)

    def _apply_call(self, share: Share) -> tuple[list[str], list[Any], int]:
        partition = share.partition
        keys = [self.offset_key(partition), self.events_key(partition), self.generation_key(partition)]
        args: list[Any] = [int(share.last_offset), self.max_len, self.event_memory]
        total = 0
        for u in share.users:
            uc = u if isinstance(u, UserClicks) else UserClicks(*u)
            n = len(uc.offsets)
            if (
                len(uc.items) != n
                or (uc.event_ids and len(uc.event_ids) != n)
                or (uc.times and len(uc.times) != n)
            ):
                raise ValueError("offsets, items, event ids and times must have the same length")
            keys.append(self.window_key(partition, uc.user_id))
            args.append(n)
            events = uc.event_ids or [f"@{int(o)}" for o in uc.offsets]  # no id: the offset stands for it
            times = uc.times or [0] * n
            for off, ev, item, ts in zip(uc.offsets, events, uc.items, times, strict=True):
                args.extend((int(off), ev, f"{int(item)}:{int(ts)}"))
            total += n
        return keys, args, total

    def _scripts(self, script: Any, calls: Sequence[tuple[list[str], list[Any]]], results: list[Any]) -> None:
        """Each (keys, args) call of a registered script, in one pipelined round trip; `results` gets a
        result per call, or the error it raised, as they arrive. Connection failures are retried (the
        calls that succeeded are not sent again); a script the server does not hold yet (NOSCRIPT) is
        loaded and its calls sent again."""
        todo = list(range(len(calls)))

        def run() -> None:
            while todo:
                pipe = self.client.pipeline(transaction=False)
                for i in todo:
                    keys, args = calls[i]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                outs = [
                    cluster_error(out) if isinstance(out, Exception) else out
                    for out in pipe.execute(raise_on_error=False)
                ]
                missing = [i for i, out in zip(todo, outs, strict=True) if isinstance(out, NoScriptError)]
                lost = next((o for o in outs if isinstance(o, TRANSIENT)), None)
                for i, out in zip(todo, outs, strict=True):
                    if not isinstance(out, (NoScriptError, *TRANSIENT)):
                        results[i] = out
                if lost is not None:
                    todo[:] = [i for i, out in zip(todo, outs, strict=True) if isinstance(out, TRANSIENT)]
                    raise lost
                if missing:
                    self.client.script_load(script.script)
                todo[:] = missing

        if calls:
            self._call(run)

    def read_windows(self, users: Sequence[tuple[int, str]]) -> list[list[int]]:
        """The item indices of (partition, user) windows, oldest first (one pipelined round trip)."""
        return [w.items for w in self.read_windows_with_times(users)]

    def read_windows_with_times(self, users: Sequence[tuple[int, str]]) -> list[Window]:
        if not users:
            return []

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for partition, user_id in users:
                pipe.lrange(self.window_key(partition, user_id), 0, -1)
            return list(pipe.execute())

        return [parse_window(w) for w in self._call(run)]

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
        would be skipped). The recent event ids go with it: they belonged to the lost log. The partition's
        generation is bumped, so the fences of the new log's writes order after the old log's."""

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.offset_key(partition), int(offset))
            pipe.delete(self.events_key(partition))
            pipe.incr(self.generation_key(partition))
            pipe.execute()

        self._call(run)

    # ---- interest vectors --------------------------------------------------------------------------

    def write_interests(
        self,
        partition: int,
        users: Sequence[str],
        fences: Sequence[int],
        vectors: np.ndarray,
        active: np.ndarray,
        model_version: str,
        ts: float | None = None,
    ) -> int:
        """One partition's share of a batch (see write_interests_batch)."""
        return self.write_interests_batch(
            [InterestRows(partition, users, fences, vectors, active)], model_version, ts
        )

    def write_interests_batch(
        self, shares: Sequence[InterestRows], model_version: str, ts: float | None = None
    ) -> int:
        """Store each user's active interest vectors [k, d] (float32 bytes) with the version and time, if its
        fence (`fence(generation, triggering click's offset)`) is newer than the stored one. One script call
        per partition, all in one round trip; returns how many users were written (the others were older).
        A retry writes nothing twice: the fence check skips what was written."""
        now = repr(time.time() if ts is None else float(ts))
        calls = [call for share in shares if (call := self._interests_call(share, model_version, now))]
        outs: list[Any] = [None] * len(calls)
        self._scripts(self._interests, calls, outs)
        _raise_first_error(outs)
        return sum(int(out) for out in outs)

    @staticmethod
    def _check_rows(share: InterestRows) -> tuple[np.ndarray, np.ndarray]:
        vec = np.asarray(share.vectors, dtype=np.float32)
        act = np.asarray(share.active, dtype=bool)
        n = len(share.users)
        if vec.ndim != 3 or act.shape != vec.shape[:2] or n != vec.shape[0] or len(share.fences) != n:
            raise ValueError(f"need vectors [B,K,d], active [B,K] and fences for {n} users")
        return vec, act

    def _interests_call(
        self, share: InterestRows, model_version: str, now: str
    ) -> tuple[list[str], list[Any]] | None:
        vec, act = self._check_rows(share)
        if not share.users:
            return None
        d = vec.shape[2]
        keys, args = [], []
        for u, fence_, v, a in zip(share.users, share.fences, vec, act, strict=True):
            rows = np.ascontiguousarray(v[a], dtype="<f4")
            keys.append(self.interests_key(share.partition, u))
            args.extend((int(fence_), rows.tobytes(), int(rows.shape[0]), d, model_version, now))
        return keys, args

    def read_interests(self, partition: int, user_id: str) -> tuple[np.ndarray, str, float, int] | None:
        """(vectors [k, d], model_version, ts, fence) or None: for the candidate view, tools and tests."""
        h = self._call(lambda: self.client.hgetall(self.interests_key(partition, user_id)))
        if not h:
            return None
        k, d = int(h[b"k"]), int(h[b"d"])
        vec = np.frombuffer(h[b"vec"], dtype="<f4").reshape(k, d)
        return vec, h[b"model_version"].decode(), float(h[b"ts"]), int(h[b"fence"])
