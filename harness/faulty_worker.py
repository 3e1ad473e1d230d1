"""A stream worker that SIGKILLs or SIGSTOPs itself at a chosen stage: the chaos harness's way to die, or
to freeze into a zombie, at an exact point.

    python -m harness.faulty_worker --kill-at window:3 --config worker.toml --checkpoint mind.pt
    python -m harness.faulty_worker --stop-at kv_write:2 --config worker.toml --checkpoint mind.pt

`--kill-at STAGE:N` kills the process on entering STAGE for the N-th time; `STAGE:N:exit` on leaving it
after it succeeded (`produce:3:exit` dies between the recall delivery and the commit). `--stop-at` stops
it there instead (SIGSTOP: every thread, librdkafka's heartbeats included), as a long GC pause or a
swapped-out process would; the harness sends SIGCONT later. The fault wraps the worker's stage seam from
the outside: the production worker reads no fault setting.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from stream.worker import Batch, Worker, argument_parser, run_from_args


class KillPoint(NamedTuple):
    stage: str
    nth: int
    at_exit: bool

    @classmethod
    def parse(cls, spec: str) -> KillPoint:
        stage, n, *rest = [*spec.split(":"), ""] if spec.count(":") == 0 else spec.split(":")
        if not stage or rest not in ([], ["exit"]) or not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"{spec!r}: use STAGE:N or STAGE:N:exit (N >= 1)")
        return cls(stage, int(n), rest == ["exit"])

    def __str__(self) -> str:
        return f"{self.stage}:{self.nth}" + (":exit" if self.at_exit else "")


def faulty(point: KillPoint, sig: signal.Signals = signal.SIGKILL) -> type[Worker]:
    """A Worker whose stage `point.stage` sends `sig` to its own process at its n-th entry (or exit)."""
    hits = [0]

    def hit(name: str, exiting: bool) -> None:
        if name == point.stage and exiting == point.at_exit:
            hits[0] += 1
            if hits[0] == point.nth:
                os.kill(os.getpid(), sig)

    class FaultyWorker(Worker):
        @contextmanager
        def _stage(self, batch: Batch, name: str) -> Iterator[None]:
            hit(name, False)
            with super()._stage(batch, name):
                yield
            hit(name, True)

    return FaultyWorker


def main(argv: Sequence[str] | None = None) -> int:
    ap = argument_parser(prog="python -m harness.faulty_worker")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--kill-at", type=KillPoint.parse, help="SIGKILL at STAGE:N or STAGE:N:exit")
    how.add_argument("--stop-at", type=KillPoint.parse, help="SIGSTOP at STAGE:N or STAGE:N:exit")
    args = ap.parse_args(argv)
    if args.kill_at is not None:
        return run_from_args(args, worker_type=faulty(args.kill_at))
    return run_from_args(args, worker_type=faulty(args.stop_at, signal.SIGSTOP))


if __name__ == "__main__":
    sys.exit(main())
