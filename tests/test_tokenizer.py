"""Tokenizers of `mtp-ext train`: bytes, and a byte-level BPE trained on the training split."""
import pytest
import torch

from mtp_ext import tokenizer as tokenizers
from mtp_ext.cli import main as cli_main
from mtp_ext.train import TrainArgs, load_corpus, load_corpus_files, load_model, train

pytest.importorskip("tokenizers")


def test_bpe_round_trip_merges_and_cache(corpus, tmp_path):
    files = load_corpus_files(str(corpus))[0]
    logs = []
    tok = tokenizers.for_training("bpe", 300, files, tmp_path, logs.append)
    assert tok.vocab_size == 300 and "trained" in logs[-1]
    for text in ("def f(self, x):\n    return x  # é ✓ 日本\n", "\t\r\n", "zzz qqq"):
        assert tok.decode(tok.encode(text)) == text  # any text: every byte is a token
    ids = tok.encode_corpus(files)
    assert int(ids.max()) < 300 and int(ids.min()) >= 0
    assert ids.numel() < sum(len(f) for f in files) / 2  # merges learnt from the repetitive text
    again = tokenizers.for_training("bpe", 300, files, tmp_path, logs.append)
    assert "cached" in logs[-1]
    rebuilt = tokenizers.from_dict(tok.to_dict())
    assert torch.equal(again.encode_corpus(files), ids)
    assert torch.equal(rebuilt.encode_corpus(files), ids)
    other = tokenizers.for_training("bpe", 280, files, tmp_path, logs.append)  # its own cache
    assert other.vocab_size == 280 and "trained" in logs[-1]
    byte = tokenizers.for_training("byte", 0, files, tmp_path)
    assert torch.equal(byte.encode_corpus(files), load_corpus(str(corpus))[0])
    assert byte.decode(byte.encode("é x")) == "é x"


def test_train_and_generate_with_bpe(corpus, tmp_path, capsys):
    a = TrainArgs(steps=30, batch_size=8, seq_len=32, lr=3e-3, warmup=5, data=str(corpus),
                  out=str(tmp_path / "run"), eval_every=1000, eval_batches=2, d_model=32,
                  layers=1, attn_heads=2, n_future=3, dtype="fp32", tokenizer="bpe",
                  vocab_size=320)
    s = train(a, log=lambda m: None)
    model, ckpt = load_model(s["checkpoint"])
    tok = tokenizers.from_dict(ckpt["tokenizer"])
    assert tok.kind == "bpe" and model.cfg.vocab_size == tok.vocab_size == 320
    assert s["val_losses"][0] < 5.0  # below uniform over 320 tokens (5.77)
    assert cli_main(["generate", "--checkpoint", s["checkpoint"], "--prompt", "def ",
                     "--max-new-tokens", "8", "--speculative"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def ") and "8 tokens" in out.err
    want = tok.decode(model.generate(torch.tensor([tok.encode("def ")]), 8).tokens[0].tolist())
    assert out.out == want + "\n"


def test_tokenizer_errors(corpus, tmp_path, capsys):
    assert cli_main(["train", "--tokenizer", "bpe", "--vocab-size", "256", "--data", str(corpus),
                     "--out", str(tmp_path)]) == 2
    assert "--vocab-size must be > 256" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        tokenizers.from_dict({"kind": "wordpiece"})
