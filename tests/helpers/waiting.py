"""Polling for tests: a timeout is a test failure (AssertionError), naming what never came."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from resultstore_devtools import procs

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout: float, what: str,
               interval: float = 0.25) -> T:
    return procs.eventually(probe, timeout, what, interval, error=AssertionError)
