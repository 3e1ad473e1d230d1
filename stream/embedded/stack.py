"""`mind up` / `mind down`: the four embedded servers as one stack, owned by one process, stoppable by any.

Start order is dependency order: the broker (then the topics), the key-value store, milvus-lite, Triton.
Each launcher health-checks its own server (cluster id, PING from our pid, list_collections, model
ready); a failure or Ctrl-C at any point stops what was already started, so nothing is left running.

Why a state file *and* a lock: `run_dir/stack.json` records, after each service has started, its pid,
process-group id, kernel start time (so a recycled pid is never mistaken for ours), ports and address.
`mind down` from another process reads it and stops every process group (SIGTERM, then SIGKILL), then
verifies that none of their processes is left. `run_dir/stack.lock` is flock()ed by the owning process
for the stack's whole life: a second `up` on the same run dir fails at once, even while the first is
still starting, and the kernel drops the lock when the owner dies, however it dies.

The owner is either a `mind up` supervisor (foreground, or `--detach`ed) or any Python program using
`Stack` directly. milvus-lite 2.5 exits by itself when its owner dies (it watches a lock we hold); the
other servers run in their own sessions and survive an owner killed with -9: `mind down` still finds
them through the state file. Linux only (/proc).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson

from stream.embedded.kafka import EmbeddedKafka, find_tansu
from stream.embedded.milvus import EmbeddedMilvus, find_milvus_lite
from stream.embedded.process import free_port, port_is_free
from stream.embedded.redis import EmbeddedRedis, find_redis_server
from stream.embedded.triton import EmbeddedTriton, check_numpy, find_tritonserver
from stream.settings import Settings, kafka_config
from stream.topics import ensure_topics

log = logging.getLogger(__name__)

SERVICES = ("kafka", "redis", "milvus", "triton")  # start order; stopped in reverse
STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"


class StackError(RuntimeError):
    """A service could not be started (the message names it and says why), or a stop did not finish."""


class StackRunning(StackError):
    """A stack already runs on this run directory; `state` is its state file."""

    def __init__(self, message: str, state: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.state = state


# ---- processes, by /proc --------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start time in clock ticks) of a pid, None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0].decode(), int(fields[2]), int(fields[19])


def process_start(pid: int) -> int | None:
    st = _stat(pid)
    return st[2] if st else None


def is_alive(pid: int, start: int | None = None) -> bool:
    """True for a running (not zombie) process that, when `start` is given, is the one we recorded."""
    st = _stat(pid)
    return st is not None and st[0] not in "ZX" and (start is None or st[2] == start)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group: a server and what it spawned (Triton's stubs)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] == pgid and st[0] not in "ZX":
                out.append(int(entry.name))
    return out


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_group(pgid: int, pid: int, start: int | None, grace_s: float = 10.0) -> str:
    """SIGTERM a recorded service's group, SIGKILL it after grace_s; returns what happened.

    Only acts when the group leader is still the process we started (pid + start time) or members of
    its group are left: a recycled pid in a foreign group is never signalled.
    """
    leader_ours = is_alive(pid, start)
    if not leader_ours and not group_members(pgid):
        return "already stopped"
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_members(pgid) and not is_alive(pid, start):
            return "stopped"
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not group_members(pgid) and not is_alive(pid, start):
            return "killed"
        time.sleep(0.05)
    raise StackError(f"process group {pgid} survived SIGKILL: {group_members(pgid)}")


# ---- state file ---------------------------------------------------------------------------------------


def read_state(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The stack's state file, or None when no stack was started on this run dir (or it was stopped)."""
    path = Path(run_dir) / STATE_FILE
    try:
        state: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError as exc:
        raise StackError(
            f"{path} is not valid JSON ({exc}); remove it after checking that no server runs"
        ) from None
    return state


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomic replace, so a reader (`mind down`, `mind status`) never sees half a file."""
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
    os.replace(tmp, run_dir / STATE_FILE)


def live_services(state: dict[str, Any]) -> dict[str, list[int]]:
    """Service name -> its live processes, for the services a state file records."""
    out = {}
    for name, svc in state.get("services", {}).items():
        members = group_members(svc["pgid"])
        if is_alive(svc["pid"], svc.get("start")) and svc["pid"] not in members:
            members.append(svc["pid"])
        if members:
            out[name] = members
    return out


def owner_alive(state: dict[str, Any]) -> bool:
    owner = state.get("owner") or {}
    return bool(owner.get("pid")) and is_alive(owner["pid"], owner.get("start"))


# ---- health ---------------------------------------------------------------------------------------------


def _tcp_ok(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def service_health(name: str, svc: dict[str, Any]) -> bool:
    """Cheap liveness for `mind status`: the recorded process is ours and its port(s) accept; Triton ready."""
    if not is_alive(svc["pid"], svc.get("start")):
        return False
    host = svc["host"]
    if not all(_tcp_ok(host, p) for p in svc["ports"].values()):
        return False
    if name == "triton":
        try:
            url = f"http://{host}:{svc['ports']['http']}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as r:
                return int(r.status) == 200
        except OSError:
            return False
    return True


def status(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What runs on a run dir: {"running": bool, "owner_alive", "services": {name: {..., "healthy"}}}."""
    state = read_state(run_dir)
    if state is None:
        return {"running": False, "run_dir": str(Path(run_dir).resolve()), "services": {}}
    services = {
        name: {**svc, "healthy": service_health(name, svc)} for name, svc in state.get("services", {}).items()
    }
    return {
        "running": any(s["healthy"] for s in services.values()) or owner_alive(state),
        "run_dir": state.get("run_dir"),
        "phase": state.get("phase"),
        "owner_alive": owner_alive(state),
        "owner": state.get("owner"),
        "services": services,
        "skipped": state.get("skipped", {}),
        "addresses": state.get("addresses", {}),
    }


# ---- down -----------------------------------------------------------------------------------------------


@dataclass
class DownReport:
    services: dict[str, str] = field(default_factory=dict)  # name -> stopped / killed / already stopped
    owner: str = "none"  # what happened to the owning process
    seconds: float = 0.0


def down(run_dir: str | os.PathLike[str], grace_s: float = 10.0) -> DownReport:
    """Stop the stack recorded in run_dir from any process; verified: raises if a process survives.

    A `mind up` supervisor is asked first (SIGTERM: it stops the services in order and exits). Then
    every recorded service group still alive gets SIGTERM, then SIGKILL after grace_s. The state file is
    removed at the end; a stack owned by a Python program (not a supervisor) is left to notice by itself.
    """
    t0 = time.monotonic()
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    report = DownReport()
    if state is None:
        report.owner = "no stack"
        return report
    owner = state.get("owner") or {}
    if owner.get("supervisor") and owner.get("pid") != os.getpid() and owner_alive(state):
        os.kill(owner["pid"], signal.SIGTERM)
        deadline = time.monotonic() + grace_s * 2 + 5
        while owner_alive(state) and time.monotonic() < deadline:
            time.sleep(0.05)
        report.owner = "stopped" if not owner_alive(state) else "did not exit"
    elif owner_alive(state):
        report.owner = "left running (not a supervisor)"
    for name in reversed(SERVICES):
        svc = state.get("services", {}).get(name)
        if svc is not None:
            what = stop_group(svc["pgid"], svc["pid"], svc.get("start"), grace_s)
            if what == "already stopped" and report.owner == "stopped":
                what = "stopped by the supervisor"
            report.services[name] = what
    if report.owner == "did not exit":  # a stuck supervisor: its servers are down, it goes too
        os.kill(owner["pid"], signal.SIGKILL)
        report.owner = "killed"
    left = live_services(state)
    if left:
        raise StackError(f"processes still running after down: {left}")
    current = read_state(run_dir)
    if current is not None and current.get("owner") == state.get("owner"):
        (run_dir / STATE_FILE).unlink(missing_ok=True)
    report.seconds = time.monotonic() - t0
    return report


# ---- the stack ------------------------------------------------------------------------------------------


def models_in(repository: Path) -> list[str]:
    """Model names in a Triton repository (folders holding config.pbtxt); none before `mind export`."""
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())


def _pid_of(launcher: Any) -> int:
    """The server's pid: the launchers' `pid` property (Triton's: its `proc`)."""
    pid = getattr(launcher, "pid", None)
    if pid is None:
        proc = getattr(launcher, "proc", None)
        pid = proc.pid if proc is not None else None
    if not isinstance(pid, int):
        raise StackError(f"{type(launcher).__name__} started but exposes no pid")
    return pid


def _port(configured: int, host: str) -> int:
    """A configured port, or (0) one the OS reports free now."""
    return configured or free_port(host)


class Stack:
    """The embedded servers as one unit: `with Stack(run_dir, settings) as s:` or start()/stop().

    services: which to start (default: settings.embedded(), i.e. those with no address configured).
    triton: None = start it when the model repository has a model, else skip and record why (flag in
    `skipped`); True = required; False = never. Ports come from settings.embedded_*_port (0 = free).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        settings: Settings | None = None,
        *,
        model_repository: str | os.PathLike[str] | None = "model_repo",
        services: tuple[str, ...] | None = None,
        triton: bool | None = None,
        supervisor: bool = False,
        triton_timeout_s: float = 180.0,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        base = settings or Settings(run_dir=self.run_dir)
        self.settings = base.model_copy(update={"run_dir": self.run_dir})
        self.model_repository = Path(model_repository).resolve() if model_repository else None
        wanted = services if services is not None else self.settings.embedded()
        unknown = set(wanted) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services {sorted(unknown)}; choose from {SERVICES}")
        self.wanted = tuple(s for s in SERVICES if s in wanted)
        self.triton_mode = triton
        self.supervisor = supervisor
        self.triton_timeout_s = triton_timeout_s
        self.host = self.settings.embedded_host
        self.launchers: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self._records: dict[str, dict[str, Any]] = {}
        self._lock: IO[str] | None = None
        self._started_at = 0.0

    # -- locking and preflight --

    def _acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.run_dir / LOCK_FILE, "a")  # noqa: SIM115 (held for the stack's life)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            state = read_state(self.run_dir)
            pid = (state or {}).get("owner", {}).get("pid", "?")
            raise StackRunning(
                f"a stack is already running on {self.run_dir} (owner pid {pid}): use it, or `mind down "
                f"--run-dir {self.run_dir}` first",
                state,
            ) from None
        state = read_state(self.run_dir)
        left = live_services(state) if state else {}
        if left:
            lock.close()
            raise StackRunning(
                f"processes of a previous stack on {self.run_dir} still run ({left}) though its owner is "
                f"gone: `mind down --run-dir {self.run_dir}` first",
                state,
            )
        self._lock = lock

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _triton_models(self) -> list[str]:
        repo = self.model_repository
        if "triton" not in self.wanted or self.triton_mode is False:
            if "triton" in self.wanted:
                self.skipped["triton"] = "disabled (--no-triton)"
            return []
        models = models_in(repo) if repo else []
        if not models:
            why = f"model repository {repo} holds no model yet (run `mind export`)"
            if self.triton_mode:
                raise StackError(f"triton: {why}")
            self.skipped["triton"] = why
        return models

    def _preflight(self, triton_models: list[str]) -> dict[str, dict[str, int]]:
        """Find every binary and check every fixed port before starting anything (clear, early errors)."""

        s = self.settings
        finders: dict[str, Any] = {
            "kafka": find_tansu,
            "redis": find_redis_server,
            "milvus": find_milvus_lite,
        }
        ports: dict[str, dict[str, int]] = {
            "kafka": {"kafka": s.embedded_kafka_port},
            "redis": {"redis": s.embedded_redis_port},
            "milvus": {"grpc": s.embedded_milvus_port},
        }
        if triton_models:
            finders["triton"] = lambda: (find_tritonserver(), check_numpy())
            ports["triton"] = {
                "grpc": s.embedded_triton_grpc_port,
                "http": s.embedded_triton_http_port,
                "metrics": s.embedded_triton_metrics_port,
            }
        todo = [n for n in self.wanted if n in finders]
        for name in todo:
            try:
                finders[name]()
            except Exception as exc:  # each finder has its own error type; all mean "binary missing"
                raise StackError(f"{name}: {exc}") from exc
        for name in todo:
            for what, port in ports[name].items():
                if port and not port_is_free(port, self.host):
                    raise StackError(
                        f"{name}: {what} port {self.host}:{port} is taken (another server, or a stack on "
                        f"another run dir?); set MIND_EMBEDDED_* ports (0 = any free port) or stop it"
                    )
        resolved: dict[str, dict[str, int]] = {}
        for name in todo:
            resolved[name] = {}
            for what, port in ports[name].items():
                p = _port(port, self.host)
                while p in {q for r in resolved.values() for q in r.values()}:
                    p = _port(0, self.host)
                resolved[name][what] = p
        return resolved

    # -- start / stop --

    def start(self) -> Stack:
        """Start the wanted services in order; on any error (or Ctrl-C) stop those already started."""
        self._acquire()
        self._started_at = time.time()
        try:
            models = self._triton_models()
            ports = self._preflight(models)
            self._save("starting")
            for name in self.wanted:
                if name in ports:
                    self._start_one(name, ports[name], models)
                    self._save("starting")
            self._save("ready")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_one(self, name: str, ports: dict[str, int], models: list[str]) -> None:
        s, host = self.settings, self.host
        t0 = time.monotonic()
        log.info("starting %s on %s %s", name, host, ports)
        try:
            if name == "kafka":
                kafka = self.launchers[name] = EmbeddedKafka(self.run_dir, port=ports["kafka"], host=host)
                address = kafka.start()
                self._create_topics(address)
                self.addresses["kafka_bootstrap"] = address
            elif name == "redis":
                pw = s.redis_password.get_secret_value() if s.redis_password else None
                redis = self.launchers[name] = EmbeddedRedis(
                    self.run_dir, port=ports["redis"], host=host, password=pw
                )
                address = redis.start()
                self.addresses["redis_url"] = address
            elif name == "milvus":
                milvus = self.launchers[name] = EmbeddedMilvus(self.run_dir, port=ports["grpc"], host=host)
                address = milvus.start()
                self.addresses["milvus_uri"] = address
            else:
                assert self.model_repository is not None
                triton = self.launchers[name] = EmbeddedTriton(
                    self.model_repository,
                    self.run_dir / "triton",
                    models=models,
                    host=host,
                    grpc_port=ports["grpc"],
                    http_port=ports["http"],
                    metrics_port=ports["metrics"],
                    ready_timeout_s=self.triton_timeout_s,
                )
                triton.start()
                address = triton.grpc_url
                self.addresses["triton_url"] = address
        except StackError:
            raise
        except Exception as exc:  # the launchers' own errors carry the reason and the log tail
            raise StackError(f"{name}: {exc}") from exc
        pid = _pid_of(self.launchers[name])
        self._records[name] = {
            "pid": pid,
            "pgid": os.getpgid(pid),
            "start": process_start(pid),
            "host": host,
            "ports": ports,
            "address": address,
            "started_at": time.time(),
            "start_seconds": round(time.monotonic() - t0, 3),
            "log_dir": str(self.run_dir / name),
        }
        if name == "triton":
            self._records[name]["models"] = models
        log.info("%s ready at %s in %.1fs", name, address, time.monotonic() - t0)

    def _create_topics(self, bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(kafka_config(self.settings, "admin", bootstrap=bootstrap))
        ensure_topics(admin, self.settings)

    def _save(self, phase: str) -> None:
        me = os.getpid()
        _write_state(
            self.run_dir,
            {
                "version": 1,
                "run_dir": str(self.run_dir),
                "phase": phase,
                "owner": {"pid": me, "start": process_start(me), "supervisor": self.supervisor},
                "started_at": self._started_at,
                "services": self._records,
                "skipped": self.skipped,
                "addresses": self.addresses,
                "topics": {
                    "clicks": self.settings.clicks_topic,
                    "recall": self.settings.recall_topic,
                    "dlq": self.settings.dlq_topic,
                },
            },
        )

    def stop(self) -> None:
        """Stop in reverse order (each launcher: SIGTERM, then SIGKILL), remove the state file, unlock."""
        for name in reversed(SERVICES):
            launcher = self.launchers.pop(name, None)
            if launcher is None:
                continue
            try:
                launcher.stop()
            except Exception as exc:  # keep stopping the others; down() verifies by pid below
                log.warning("stopping %s: %s", name, exc)
        for name, rec in self._records.items():  # whatever a launcher left (e.g. Triton's stubs)
            stop_group(rec["pgid"], rec["pid"], rec.get("start"), grace_s=5.0)
            log.debug("%s stopped", name)
        self._records.clear()
        if self._lock is not None:
            state = read_state(self.run_dir)
            if state is not None and (state.get("owner") or {}).get("pid") == os.getpid():
                (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        self._release()

    @property
    def running(self) -> bool:
        return self._lock is not None

    def state(self) -> dict[str, Any]:
        return read_state(self.run_dir) or {}

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _addresses_of(target: Stack | dict[str, Any] | str | os.PathLike[str]) -> dict[str, str]:
    if isinstance(target, Stack):
        return dict(target.addresses)
    if isinstance(target, dict):
        return dict(target.get("addresses", {}))
    state = read_state(target)
    return dict(state.get("addresses", {})) if state else {}


def settings_for(
    target: Stack | dict[str, Any] | str | os.PathLike[str], settings: Settings | None = None
) -> Settings:
    """Settings whose addresses point at a started stack (a Stack, its state dict, or its run dir).

    Addresses already configured in `settings` (production services) win over the stack's.
    """
    base = settings
    if base is None:
        base = target.settings if isinstance(target, Stack) else Settings()
    found = _addresses_of(target)
    update = {k: v for k, v in found.items() if getattr(base, k) is None}
    return base.model_copy(update=update)


def resolve(settings: Settings) -> Settings:
    """Fill the unset addresses from the stack running on settings.run_dir, if any (the CLI default)."""
    if not settings.embedded():
        return settings
    state = read_state(settings.run_dir)
    if state is None or not live_services(state):
        return settings
    return settings_for(state, settings)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT raise KeyboardInterrupt while inside, so `mind up` cleans up the same way
    for all three; SIGINT explicitly, since a shell starts background jobs with SIGINT ignored."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
