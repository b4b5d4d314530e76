"""Checkpoints of `mtp-ext train`: written with tensors and plain Python types only, read with
torch's safe loader (`weights_only=True`), which refuses anything that could run code on load.

A file that needs more (a checkpoint altered or written by other code) is refused with an error
that names the file and the refused globals. One the user trusts is converted once with
`mtp-ext convert-checkpoint IN OUT --allow NAME ...`: it is read by the same safe loader with
just those names allowed, and written back in plain types (docs/design.md, "Files read")."""
from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Iterable, List, Tuple

import torch

KEYS = ("model", "config", "optimizer", "step", "args", "data_rng", "draft_tree", "tokenizer",
        "progress", "draft_stats")
_CODE_MODULES = {"os", "posix", "nt", "subprocess", "builtins", "sys", "shutil", "runpy",
                 "importlib", "pty", "socket", "webbrowser", "code", "pickle", "marshal"}
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds globals that the safe loader refuses."""


def _safe_load(path: str, allowed: Iterable = ()):
    with torch.serialization.safe_globals(list(allowed)):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path, allowed: Iterable = ()) -> dict:
    """The checkpoint dict of `path`, read with the safe loader (plus the `allowed` globals, for
    convert_checkpoint only). Errors name the file: FileNotFoundError, UnsafeCheckpointError for
    refused globals (nothing of the file runs), ValueError for anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = _safe_load(path, allowed)
    except pickle.UnpicklingError:
        try:  # the globals that the file names, listed without running any of them
            refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            refused = []
        if not refused:  # not a torch file (or a legacy one)
            raise ValueError(f"{path!r} is not a checkpoint written by `mtp-ext train` (not "
                             f"a file torch.save wrote)") from None
        head = (f"checkpoint {path!r} refused: it holds {', '.join(refused)}, which the safe "
                f"loader (torch.load weights_only=True) does not accept: loading it could run "
                f"code. `mtp-ext train` writes only tensors and plain Python types, so this file "
                f"was written by other code or altered. ")
        if any(n.split(".")[0] in _CODE_MODULES for n in refused):
            raise UnsafeCheckpointError(head + "Those are functions that run programs, not "
                                        "data: no checkpoint needs them; delete the file")
        raise UnsafeCheckpointError(head + f"If you trust it and know what wrote it, convert it "
                                    f"once: mtp-ext convert-checkpoint {path} NEW.pt --allow "
                                    f"{' '.join(refused)}")
    except Exception as e:  # not a torch file, truncated, ...
        if _truncated(path):
            raise ValueError(f"checkpoint {path!r} is truncated ({os.path.getsize(path)} bytes, "
                             f"the end of the file missing: a copy or write that did not "
                             f"finish)") from None
        raise ValueError(f"{path!r} is not a checkpoint written by `mtp-ext train` "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise ValueError(f"{path!r} is not a checkpoint written by `mtp-ext train` (a "
                         f"{type(ckpt).__name__} without 'model' and 'config')")
    return ckpt


def _truncated(path: str) -> bool:
    """A file that starts as torch.save's zip archive but lacks the archive's end."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def write_checkpoint(path: Path, ckpt: dict) -> None:
    """ckpt in plain types (paths as strings, dataclasses as dicts) written atomically (a
    temporary file, then a rename); TypeError before writing for any other value that is not a
    tensor or a plain Python type (what read_checkpoint accepts)."""
    ckpt = plain(ckpt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def plain(x, where: str = "checkpoint"):
    """x with paths as strings and dataclasses as dicts; TypeError for any other type that is
    not a tensor, a generator state, a container of them or a plain Python value."""
    if isinstance(x, torch.Tensor) or isinstance(x, _PLAIN):
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {plain(k, where): plain(v, f"{where}[{k!r}]") for k, v in x.items()}
    if type(x) in (list, tuple):
        return type(x)(plain(v, f"{where}[{i}]") for i, v in enumerate(x))
    raise TypeError(f"{where}: a {type(x).__module__}.{type(x).__qualname__} is not a tensor or "
                    f"a plain Python value")


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"--allow {name!r}: no such global ({e})") from None
    return obj


def convert_checkpoint(src: str, dst: str, allow: List[str]) -> Tuple[List[str], str]:
    """src read by the safe loader with the globals named in `allow` (e.g. pathlib.PosixPath)
    and nothing else; its `mtp-ext train` entries written to dst in plain types. Returns the
    entries dropped and dst. For a file the user trusts: an allowed name runs on load."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("convert-checkpoint: OUT must differ from IN (IN is kept)")
    ckpt = read_checkpoint(src, allowed=[_resolve(n) for n in allow])
    dropped = sorted(str(k) for k in ckpt if k not in KEYS)
    try:
        out = plain({k: ckpt[k] for k in KEYS if k in ckpt}, os.fspath(src))
    except TypeError as e:
        raise ValueError(f"convert-checkpoint: {e}; it has no plain form") from None
    write_checkpoint(Path(dst), out)
    read_checkpoint(dst)  # what was written loads with the safe loader alone
    return dropped, dst
