"""Waiting on a condition, never on a fixed sleep: a loaded machine only makes the wait longer, and a
condition that never comes true fails with a message that says what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def until(
    cond: Callable[[], Any], *, what: str | Callable[[], str], timeout: float = 60.0, every: float = 0.05
) -> Any:
    """Poll `cond` until it returns something truthy (and return that); after `timeout` seconds, fail the
    test naming `what` (a string, or a function that describes the state at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {text}")
        time.sleep(every)
