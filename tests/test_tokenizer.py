"""Tokenizers of `mtp-ext train`: bytes, and a byte-level BPE trained on the training split."""
import pytest
import torch

from mtp_ext.training import tokenizer as tokenizers
from mtp_ext.cli import main as cli_main
from mtp_ext.training.train import TrainArgs, load_corpus, load_corpus_files, load_model, train

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


def _bench(name):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_scripts_on_a_bpe_checkpoint(corpus, tmp_path, capsys):
    """bench/bench_grad_filter.py and bench/bench_decode.py run on a BPE checkpoint: the
    filter's own gradient error falls with its threshold; decoding modes agree."""
    a = TrainArgs(steps=20, batch_size=8, seq_len=48, lr=3e-3, warmup=5, data=str(corpus),
                  out=str(tmp_path / "run"), eval_every=1000, eval_batches=2, d_model=32,
                  layers=1, attn_heads=2, n_future=3, dtype="fp32", tokenizer="bpe",
                  vocab_size=320)
    ckpt = train(a, log=lambda m: None)["checkpoint"]
    dump = tmp_path / "hidden.pt"
    assert _bench("bench_grad_filter").main(["--checkpoint", ckpt, "--windows", "4", "--seq",
                                             "48", "--repeats", "1", "--dump", str(dump)]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| 0 | 2^")]
    errors = [float(r.split("|")[7].split("/")[0]) for r in rows]
    assert len(errors) == 4 and errors == sorted(errors, reverse=True) and errors[-1] < errors[0]
    saved = torch.load(dump)
    assert saved["hidden"].shape[:2] == saved["labels"].shape == (3, 4 * (48 - 3))
    assert _bench("bench_decode").main(["--checkpoint", ckpt, "--prompts", "2", "--prompt-len",
                                        "8", "--new", "8", "--batch", "2"]) == 0
    assert "outputs identical per sequence: True" in capsys.readouterr().out
