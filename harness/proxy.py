"""A TCP proxy that makes a dependency slow or drops its connections, for the chaos harness.

`toxiproxy` is not installable here, so this is a small asyncio one: it listens on a loopback port, forwards
to a target, and can (a) hold every chunk of data for a random 50-200 ms in each direction (a slow network
or an overloaded server) or (b) close every open connection and refuse new ones for a while (a dropped
link). The worker is pointed at the proxy instead of the server; everything else talks to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from typing import Any


class Proxy:
    """One listening port in front of one target, on its own event-loop thread."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self._rng = random.Random(seed)
        self._delay: tuple[float, float] | None = None
        self._refuse_until = 0.0
        self._conns: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"proxy:{target_port}", daemon=True
        )
        self.connections = 0
        self.refused = 0

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Proxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, self.host, 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._call(self._drop_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ---- faults ------------------------------------------------------------------------------------

    def slow(self, lo_ms: float = 50.0, hi_ms: float = 200.0) -> None:
        """Hold each chunk, in each direction, for a uniform lo..hi ms."""
        self._delay = (lo_ms / 1000.0, hi_ms / 1000.0)

    def drop(self, seconds: float) -> None:
        """Close every open connection now and refuse new ones for `seconds`."""
        self._refuse_until = time.monotonic() + seconds
        self._call(self._drop_all())

    def heal(self) -> None:
        """Back to a plain pass-through."""
        self._delay = None
        self._refuse_until = 0.0

    # ---- forwarding --------------------------------------------------------------------------------

    async def _drop_all(self) -> None:
        for w in list(self._conns):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._conns.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()  # the target is down: so is the proxy, for this connection
            return
        self.connections += 1
        self._conns.update((writer, up_w))
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer), return_exceptions=True)
        for w in (writer, up_w):
            self._conns.discard(w)
            w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self._delay is not None:
                    await asyncio.sleep(self._rng.uniform(*self._delay))
                dst.write(data)
                await dst.drain()
        finally:
            with contextlib.suppress(Exception):
                dst.transport.abort()
