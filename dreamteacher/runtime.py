"""What a run needs besides its model: the Ctrl-C stop flag."""

from __future__ import annotations

import contextlib
import logging
import signal

logger = logging.getLogger("dreamteacher")

__all__ = ["StopFlag"]


class StopFlag:
    """First SIGINT (Ctrl-C): finish the current step, save a checkpoint, exit cleanly. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler, Ctrl-C raises as usual
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
