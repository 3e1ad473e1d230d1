"""What the embedded-server launchers (kafka, redis, milvus, triton) share: ports, the child process, its log.

`ServerProcess` runs one server binary in its own process group (so that a stop also reaches whatever it
forked), with stdout and stderr appended to a log file in its run directory; it waits until a health check
passes (failing fast, with the log tail, when the process dies first), stops with SIGTERM and then SIGKILL
of the whole group, and is a context manager. Each launcher keeps what is its own: finding the binary, the
command line, the health check, and the error type its callers catch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (binding is the only reliable test).

    SO_REUSEADDR like the servers themselves, so TIME_WAIT leftovers of a stopped server do not count as
    taken (a restart on the same port must work) while a live listener still does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (tiny race until the server binds it; fine on one host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def binary_from_env(var: str, error: type[RuntimeError]) -> Path | None:
    """The executable named by $var, None when it is unset or empty; error when it is not executable."""
    override = os.environ.get(var)
    if not override:
        return None
    if not (os.path.isfile(override) and os.access(override, os.X_OK)):
        raise error(f"{var}={override!r} is not an executable file")
    return Path(override)


def tcp_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when a TCP connection to host:port succeeds; raises OSError when it does not.

    A health check's first step: client libraries back off for seconds on a refused connection, a plain
    socket does not.
    """
    socket.create_connection((host, port), timeout=timeout_s).close()
    return True


def log_tail(path: Path, n: int = 30) -> str:
    """The last n lines of a log file, or "(no log)"."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_process(
    proc: subprocess.Popen[bytes], term_s: float, *, grace_s: float = 0.0, kill_wait_s: float = 10.0
) -> int | None:
    """Wait grace_s for it to exit by itself, then SIGTERM and wait term_s, then SIGKILL its process group.

    Returns the exit code; raises subprocess.TimeoutExpired when it is not gone kill_wait_s after SIGKILL.
    """
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(term_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(kill_wait_s)


class ServerProcess(Generic[T]):
    """Base of the launchers: one server child process in `run_dir`, its log at `log_path`.

    A subclass sets `run_dir`, `log_path`, `_error` (its launch error type) and `_name` (the server's name
    in messages; empty: the binary's file name), defines start() (returning what `with` gives: an address,
    or the launcher itself) around `_launch(cmd, ready)`, where ready() calls `_wait_healthy` with the
    server's own check, and may extend stop().
    """

    _error: type[RuntimeError] = RuntimeError
    _name = ""
    _tail_lines = 30
    _stop_at_exit = False  # also stop it when this interpreter exits (atexit), if stop() was never called

    run_dir: Path
    log_path: Path
    start_seconds: float | None

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._t0 = 0.0
        self._binary_name = ""
        self.start_seconds = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> T:
        raise NotImplementedError

    # ---- start ----------------------------------------------------------------------------------------

    def _launch(
        self,
        cmd: Sequence[str],
        ready: Callable[[], None],
        *,
        env: Mapping[str, str] | None = None,
        truncate_log: bool = False,
    ) -> None:
        """Spawn cmd, then ready() (which raises unless the server answers); on any failure stop() and
        re-raise. Sets start_seconds."""
        self._spawn(cmd, env=env, truncate_log=truncate_log)
        try:
            ready()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - self._t0

    def _port(self, port: int | None, host: str, other: str, more: str = "") -> int:
        """port if it is free, a free one if it is None; the launcher's error when it is taken."""
        if port is None:
            return free_port(host)
        if not port_is_free(port, host):
            raise self._error(
                f"port {port} on {host} is taken (another {other}?); "
                f"pass another port, or None for a free one{more}"
            )
        return port

    def _spawn(self, cmd: Sequence[str], *, env: Mapping[str, str] | None, truncate_log: bool) -> None:
        """Start cmd in run_dir in a new session (its own process group), output appended to log_path
        (which the child keeps open; this process does not)."""
        self._binary_name = Path(cmd[0]).name
        with open(self.log_path, "wb" if truncate_log else "ab") as log:
            self._t0 = time.monotonic()
            self._proc = subprocess.Popen(
                list(cmd),
                env=None if env is None else dict(env),
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self._stop_at_exit:
            atexit.register(self.stop)  # never leave an orphan server behind a crashed caller

    def _failure(self, message: str) -> RuntimeError:
        """The launcher's error, with where the log is and its tail."""
        return self._error(f"{message}; log {self.log_path}:\n{log_tail(self.log_path, self._tail_lines)}")

    def _exited(self) -> RuntimeError | None:
        """The error to raise when the child has already exited, else None."""
        assert self._proc is not None
        if self._proc.poll() is None:
            return None
        name = self._name or self._binary_name
        return self._failure(f"{name} exited with code {self._proc.returncode} at start")

    def _wait_healthy(
        self,
        check: Callable[[], object],
        timeout_s: float,
        what: str,
        *,
        interval_s: float = 0.05,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        """Call check() until it returns True, within timeout_s of the spawn.

        Anything else it returns, and any exception in retry_on it raises (except the launcher's own
        error), is the reason it is not ready yet, quoted in the timeout error `what (reason)`. The child
        exiting first raises at once, with the log tail.
        """
        deadline = self._t0 + timeout_s
        last: object = None
        while True:
            if err := self._exited():
                raise err
            try:
                result = check()
                if result is True:
                    return
                last = result
            except self._error:
                raise
            except retry_on as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise self._failure(f"{what} within {timeout_s:.0f}s ({last})")
            time.sleep(interval_s)

    # ---- stop -----------------------------------------------------------------------------------------

    def _stop_process(
        self, timeout_s: float, *, grace_s: float = 0.0, kill_wait_s: float = 10.0
    ) -> int | None:
        """Forget the child and stop it (see stop_process); None when none was running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if self._stop_at_exit:
            atexit.unregister(self.stop)
        return stop_process(proc, timeout_s, grace_s=grace_s, kill_wait_s=kill_wait_s)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL of its process group after timeout_s; returns the exit code."""
        return self._stop_process(timeout_s)

    def kill(self) -> int | None:
        """SIGKILL of its process group with no grace (fault injection)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        return self.stop()

    def log_tail(self, n: int = 30) -> str:
        return log_tail(self.log_path, n)

    def __enter__(self) -> T:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
