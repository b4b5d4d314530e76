"""Tokenizers of `mtp-ext train` and `mtp-ext generate`: bytes (a vocabulary of 256), or a
byte-level BPE trained on the training split with the `tokenizers` library (the `bpe` extra:
`pip install tokenizers`; transformers brings it too), for vocabularies of LLM size where the
fused loss matters. A checkpoint stores its tokenizer (`to_dict`); `from_dict` rebuilds it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import List, Sequence

import torch


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_corpus(self, parts: List[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8)

    def to_dict(self) -> dict:
        return {"kind": self.kind}


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("--tokenizer bpe needs the `tokenizers` library: pip install "
                          "tokenizers (or mtp_ext's `bpe` extra)") from e
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2's pre-tokenization): every byte is a token, so any text encodes;
    merges learnt from the training split up to vocab_size tokens."""
    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.newline = tok.encode("\n").ids

    @classmethod
    def train(cls, parts: List[bytes], vocab_size: int) -> "BPETokenizer":
        tk = _tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((p.decode("utf-8") for p in parts), trainer=trainer,
                                length=len(parts))
        return cls(tok)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def encode_corpus(self, parts: List[bytes], batch: int = 64) -> torch.Tensor:
        """The parts (files) encoded in parallel and joined by a newline, as one id tensor."""
        nl = torch.tensor(self.newline, dtype=torch.int32)
        out: List[torch.Tensor] = []
        for i in range(0, len(parts), batch):  # a few files at a time: encodings are large
            for enc in self.tok.encode_batch([p.decode("utf-8") for p in parts[i:i + batch]]):
                out.extend([nl, torch.tensor(enc.ids, dtype=torch.int32)])
        return torch.cat(out[1:]) if out else torch.zeros(0, dtype=torch.int32)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "json": self.tok.to_str()}


def from_dict(d) -> "ByteTokenizer | BPETokenizer":
    """The tokenizer a checkpoint stored (none: bytes, as checkpoints before BPE)."""
    if not d or d.get("kind") == "byte":
        return ByteTokenizer()
    if d.get("kind") == "bpe":
        return BPETokenizer(_tokenizers().Tokenizer.from_str(d["json"]))
    raise ValueError(f"unknown tokenizer kind {d.get('kind')!r} in the checkpoint")


def for_training(kind: str, vocab_size: int, train_parts: List[bytes], out: Path, log=print):
    """The tokenizer of a run: bytes, or a BPE of vocab_size trained on train_parts and cached
    in `out` (tokenizer-bpe-<vocab>-<digest of the training split>.json)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"--tokenizer must be 'byte' or 'bpe', got {kind!r}")
    digest = hashlib.sha256()
    for p in train_parts:
        digest.update(hashlib.sha256(p).digest())
    path = Path(out) / f"tokenizer-bpe-{vocab_size}-{digest.hexdigest()[:12]}.json"
    if path.exists():  # JSON, parsed by the tokenizers library: data, never code
        try:
            tok = BPETokenizer(_tokenizers().Tokenizer.from_file(str(path)))
        except Exception as e:
            raise ValueError(f"the cached tokenizer {path} does not load ({e}): delete it to "
                             f"train the tokenizer again") from None
        log(f"tokenizer: byte-level BPE of {tok.vocab_size} tokens, cached in {path}")
        return tok
    import time
    t = time.perf_counter()
    tok = BPETokenizer.train(train_parts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks of a torchrun job train the same one
    tok.tok.save(str(tmp))
    os.replace(tmp, path)
    log(f"tokenizer: byte-level BPE of {tok.vocab_size} tokens trained on the training split in "
        f"{time.perf_counter() - t:.1f} s, cached in {path}")
    return tok


def describe(tok) -> str:
    return "bytes" if tok.kind == "byte" else f"byte-level BPE, {tok.vocab_size} tokens"

