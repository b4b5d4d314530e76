"""The checkpoints of a `mtp-ext train` run in its folder OUT:

    OUT/checkpoints/step-00000200.pt   periodic ones (--save-every), the newest --keep kept
    OUT/checkpoint.pt                  the finished run's (what `generate` reads): a hard link
                                       to its step file where the filesystem allows, else a copy

Each file is written atomically (mtp_ext.training.checkpoint.write_checkpoint: a temporary file, then a
rename), so a run killed at any moment, mid-save included, leaves only complete files (and a
`*.tmp` that the next run removes). `--resume` takes the newest step file that reads; a file
that does not (truncated by a copy or a full disk) is reported and the one before it is used.
A file that the safe loader refuses (mtp_ext.training.checkpoint.UnsafeCheckpointError) is never skipped:
it stops the run."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .checkpoint import UnsafeCheckpointError, read_checkpoint, write_checkpoint

FINAL = "checkpoint.pt"
STEPS_DIR = "checkpoints"
_STEP_FILE = re.compile(r"step-(\d+)\.pt")


def step_path(out, step: int) -> Path:
    return Path(out) / STEPS_DIR / f"step-{step:08d}.pt"


def step_files(out) -> List[Tuple[int, Path]]:
    """(step, path) of OUT's step checkpoints, oldest first."""
    d = Path(out) / STEPS_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_FILE.fullmatch(p.name))]
    return sorted(found)


def existing(out) -> List[Path]:
    """The checkpoints a new run in OUT would mix with: the final one and the step files."""
    final = Path(out) / FINAL
    return ([final] if final.exists() else []) + [p for _, p in step_files(out)]


def clear(out) -> None:
    """Removes OUT's checkpoints and leftover temporary files (--overwrite: a new run)."""
    for p in existing(out):
        p.unlink()
    remove_partial(out)


def remove_partial(out) -> None:
    """The temporary files of saves that a killed run did not finish."""
    for d in (Path(out), Path(out) / STEPS_DIR):
        if d.is_dir():
            for p in d.glob("*.tmp"):
                p.unlink(missing_ok=True)


def newest(out, log: Callable[[str], None] = print) -> Optional[Tuple[Path, dict]]:
    """(path, checkpoint) of the newest step file that reads, else of OUT/checkpoint.pt (a run
    written before step files existed); None when OUT holds no checkpoint. An unreadable file is
    logged and skipped; if every file is unreadable, ValueError naming them."""
    candidates = [p for _, p in reversed(step_files(out))]
    if not candidates and (Path(out) / FINAL).exists():
        candidates = [Path(out) / FINAL]
    errors = []
    for p in candidates:
        try:
            return p, read_checkpoint(p)
        except UnsafeCheckpointError:
            raise
        except (ValueError, OSError) as e:
            errors.append(f"{e}")
            log(f"skipping {p}: {e}")
    if errors:
        raise ValueError(f"no checkpoint in {out} can be read: " + "; ".join(errors))
    return None


def save_step(out, step: int, ckpt: dict, keep: int) -> Path:
    """Writes OUT's step file for `step` and removes all but the newest `keep` (>= 1)."""
    path = step_path(out, step)
    write_checkpoint(path, ckpt)
    for _, old in step_files(out)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def publish_final(out, step_file: Path) -> Path:
    """OUT/checkpoint.pt as the finished run's step file: a hard link (no second write), or a
    copy where the filesystem has no links; replaced atomically either way."""
    final = Path(out) / FINAL
    tmp = final.with_suffix(f".{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(step_file, tmp)
    except OSError:
        shutil.copyfile(step_file, tmp)
    os.replace(tmp, final)
    return final
