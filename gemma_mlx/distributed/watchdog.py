"""A deadline on every pipeline step: MLX's distributed receive blocks without a timeout.

A rank whose peer process ends sees its socket close and MLX raises; a peer that hangs, or a Mac
that loses power or its cable, closes nothing, and the receive would wait forever. The watchdog
thread ends such a process with a message once a step has run past its deadline: the blocked
receive is native code that no Python exception can interrupt.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

EXIT_TIMEOUT = 3  # exit status of a process the watchdog ends


class Watchdog:
    """Ends the process when an armed step outlives its deadline."""

    def __init__(self, timeout: float, rank: int) -> None:
        self.timeout = timeout
        self.rank = rank
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._limit = timeout
        self._waiting_for = ""
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def step(self, waiting_for: str, timeout: float | None = None) -> Iterator[None]:
        """Arm the deadline for the block (a step that waits on other ranks): `timeout`
        seconds, or the watchdog's own."""
        with self._lock:
            self._limit = self.timeout if timeout is None else timeout
            self._deadline = time.monotonic() + self._limit
            self._waiting_for = waiting_for
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None

    def _watch(self) -> None:
        period = min(1.0, self.timeout / 10)  # a start-up deadline is longer, never shorter
        while True:
            time.sleep(period)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                waiting_for, limit = self._waiting_for, self._limit
            if late:
                sys.stderr.write(
                    f"gemma_mlx pipeline: rank {self.rank} waited {limit:g} s for "
                    f"{waiting_for}; another rank died or hangs, ending this one "
                    "(GEMMA_MLX_PIPELINE_TIMEOUT sets the limit)\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_TIMEOUT)
