"""SIGTERM and SIGINT during `mtp-ext train`: the first one asks the run to stop after its
current step (it then writes a checkpoint and exits 0); a second one acts as if the run had no
handler (SIGINT: KeyboardInterrupt at once; SIGTERM: the process ends). Under torchrun each rank
has its own request; the training loop sums them over the ranks with the step's losses, so every
rank stops after the same step."""
from __future__ import annotations

import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager: installs the handlers (main thread only; elsewhere it does nothing) and
    restores the previous ones on exit. `signal_name` is the name of the first signal caught,
    or None."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        self._restore()  # the second signal: the previous behaviour

    def _restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()
        return False

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
