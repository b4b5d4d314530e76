"""`python tests/kill_worker.py MODE K TRAIN-ARGS...`: runs `mtp-ext train TRAIN-ARGS` and
interrupts its own process at a chosen moment, as a crash, an out-of-memory kill or a user
would:
  batch K   SIGKILL as the K-th batch is drawn (after K-1 steps, mid-run)
  save K    SIGKILL in the K-th checkpoint write, half of the file written
  sigint K  two SIGINTs as the K-th batch is drawn (the second must end the run at once)
Under torchrun only rank 0 is interrupted (the agent then ends the other ranks)."""
import io
import os
import signal
import sys

import torch

from mtp_ext.training import train as T
from mtp_ext.cli import main


def hook(mode: str, k: int):
    calls = [0]

    def nth() -> bool:
        calls[0] += 1
        return calls[0] == k

    if mode in ("batch", "sigint"):
        if mode == "sigint":
            # SIGINT as a terminal's process has it (Python's KeyboardInterrupt handler). A shell
            # that starts a job in the background (`cmd &`, as CI runners may) starts it with
            # SIGINT ignored, and the worker would inherit that: its second SIGINT would then be
            # ignored too, the run's "previous behaviour", and the test would see it finish.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        draw = T.sample_batch

        def sample_batch(*args, **kw):
            if nth():
                if mode == "batch":
                    os.kill(os.getpid(), signal.SIGKILL)
                signal.raise_signal(signal.SIGINT)  # handled: the run is asked to stop
                signal.raise_signal(signal.SIGINT)  # the previous handler: KeyboardInterrupt
            return draw(*args, **kw)
        T.sample_batch = sample_batch
    elif mode == "save":
        save = torch.save

        def partial_save(obj, f, *args, **kw):
            if nth():
                buf = io.BytesIO()
                save(obj, buf, *args, **kw)
                with open(f, "wb") as out:
                    out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    out.flush()
                    os.fsync(out.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *args, **kw)
        torch.save = partial_save
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    mode, k = sys.argv[1], int(sys.argv[2])
    if int(os.environ.get("RANK", "0")) == 0:
        hook(mode, k)
    sys.exit(main(["train", *sys.argv[3:]]))
