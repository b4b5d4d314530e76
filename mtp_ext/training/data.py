"""The corpus of `mtp-ext train` and its batches. The default corpus is the Python standard
library's own source files, present on every Python installation, split deterministically into
train and validation files by a hash of their path; `--data` a folder of text files."""
from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import tokenizer as tokenizers

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


MAX_FILE_BYTES = 1 << 30  # a --data file is read whole into memory


def _check_data_file(p: Path, root: Path):
    target = p.resolve()
    if p.is_symlink() and not target.is_relative_to(root.resolve()):
        raise ValueError(f"{p} links to {target}, outside the data folder {root}: copy "
                         f"the file into the folder to train on it")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{p}: {size / 2**30:.1f} GiB, over the "
                         f"{MAX_FILE_BYTES >> 30} GiB a data file may have (each is read "
                         f"whole into memory): split it into smaller files")


def _text_files(root: Path, suffixes: Optional[Tuple[str, ...]], user: bool) -> List[Path]:
    """Files under root (not under its own site-packages, dist-packages or __pycache__
    subfolders: the folders above root do not count; symbolic links to folders are not
    followed). In a user's folder, a link to a file outside it or a file over MAX_FILE_BYTES:
    ValueError (the standard library may link to /etc, as Debian's sitecustomize.py does)."""
    out = []
    for p in sorted(root.rglob("*")):
        skip = {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
        if not p.is_file() or skip or (suffixes is not None and p.suffix not in suffixes):
            continue
        if user:
            _check_data_file(p, root)
        out.append(p)
    return out


def load_corpus(data: Optional[str] = None, val_fraction: float = 0.05):
    """(train bytes, validation bytes, description) as uint8 tensors. data: a folder of text
    files (binary files, with NUL bytes or not UTF-8, are skipped); None: the standard
    library's .py files. A file goes to validation when crc32(relative path) says so."""
    train, val, what = load_corpus_files(data, val_fraction)
    byte = tokenizers.ByteTokenizer()
    return byte.encode_corpus(train), byte.encode_corpus(val), what


def load_corpus_files(data: Optional[str] = None, val_fraction: float = 0.05):
    """load_corpus's files: (train [bytes], validation [bytes], description)."""
    if data is None:
        root, files = stdlib_root(), _text_files(stdlib_root(), (".py",), user=False)
        what = f"Python standard library sources ({root})"
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {data!r} is not a folder of text files")
        files, what = _text_files(root, None, user=True), f"text files under {root}"
    texts = []  # (bucket, bytes)
    for p in files:
        try:
            b = p.read_bytes()
            b.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if b and b"\x00" not in b:
            texts.append((zlib.crc32(str(p.relative_to(root)).encode()) % 1000, b))
    cut = val_fraction * 1000
    if texts and not any(k < cut for k, _ in texts):  # small folders: at least one file
        cut = min(k for k, _ in texts) + 1
    train = [b for k, b in texts if k >= cut]
    val = [b for k, b in texts if k < cut]
    if not texts:
        raise ValueError(f"{what}: no text file found ({len(files)} files, none UTF-8 text "
                         f"without NUL bytes)")
    if not train or not val:
        raise ValueError(f"{what}: need text files for both training and validation, found "
                         f"{len(texts)} text file(s): {len(train)} for training and {len(val)} "
                         f"for validation")
    return train, val, f"{what}: {len(train)} train, {len(val)} validation files"


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, data.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def eval_batches(data: torch.Tensor, n_batches: int, batch: int, seq_len: int):
    """Fixed, evenly spaced windows of the validation data."""
    count = n_batches * batch
    starts = torch.linspace(0, data.numel() - seq_len - 1, count).long().tolist()
    windows = torch.stack([data[s:s + seq_len] for s in starts]).long()
    return windows.split(batch)
