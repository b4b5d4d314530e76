"""The reference MTP transformer and `mtp-ext train`."""
import json
import os

import pytest
import torch

import mtp_ext
from mtp_ext import reference
from mtp_ext.cli import main as cli_main
from mtp_ext.model import MTPConfig, MTPTransformer
from mtp_ext.training.train import TrainArgs, evaluate, load_corpus, load_model, train


def tiny(**kw):
    cfg = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_future=3, max_seq_len=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return MTPTransformer(MTPConfig(**cfg))


@pytest.mark.parametrize("variant", [{}, {"tie_embeddings": True}, {"per_head_unembedding": True}])
def test_fused_and_reference_loss_paths_agree(variant):
    model = tiny(**variant).double()
    x = torch.randint(0, 40, (3, 17), generator=torch.Generator().manual_seed(1))
    grads = {}
    for impl in ("fused", "reference"):
        model.zero_grad()
        out = model(x, x, loss_impl=impl).loss
        out.loss.backward()
        grads[impl] = (out, [p.grad.clone() for p in model.parameters()])
    (a, ga), (b, gb) = grads["fused"], grads["reference"]
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.head_losses, b.head_losses)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def test_head_k_uses_targets_shifted_by_k_plus_1():
    model = tiny()
    x = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(2))
    out = model(x, x).loss
    xs, cos, sin = model.trunk_forward(x)
    for k in range(model.cfg.n_future):
        h = model.head_forward(k, xs, cos, sin)
        logits = model.head_logits(k, h)[:, : 12 - k - 1]
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), x[:, k + 1:].reshape(-1))
        torch.testing.assert_close(out.head_losses[k], want, rtol=1e-5, atol=1e-6)
        assert out.head_tokens[k] == 2 * (12 - k - 1)


def test_inference_returns_last_position_logits_only():
    model = tiny()
    x = torch.randint(0, 40, (2, 9))
    out = model(x)
    assert out.loss is None and out.logits.shape == (3, 2, 40)
    xs, cos, sin = model.trunk_forward(x)
    for k in range(3):
        full = model.head_logits(k, model.head_forward(k, xs, cos, sin))
        torch.testing.assert_close(out.logits[k], full[:, -1])


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="d_model"):
        MTPConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_future"):
        MTPConfig(n_future=0)
    with pytest.raises(ValueError, match="exclude"):
        MTPConfig(tie_embeddings=True, per_head_unembedding=True)
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_impl"):
        model(torch.zeros(1, 3, dtype=torch.long), loss_impl="triton")


def small_args(corpus, out, **kw):
    a = TrainArgs(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup=5, data=str(corpus),
                  out=str(out), eval_every=1000, eval_batches=2, d_model=32, layers=1,
                  attn_heads=2, n_future=3, dtype="fp32")
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_training_lowers_every_head_loss_and_checkpoint_round_trips(corpus, tmp_path):
    logs = []
    s = train(small_args(corpus, tmp_path / "run"), log=logs.append)
    first = s["first_step"]["head_losses"]
    assert all(v < f - 0.5 for v, f in zip(s["val_losses"], first)), (first, s["val_losses"])
    model, ckpt = load_model(s["checkpoint"])
    assert ckpt["step"] == 40
    x = torch.randint(0, 256, (2, 16))
    a = model(x).logits
    b, _ = load_model(s["checkpoint"])
    torch.testing.assert_close(a, b(x).logits, rtol=0, atol=0)
    # resume continues from the saved step and optimizer state
    s2 = train(small_args(corpus, tmp_path / "run", steps=45, resume=True), log=logs.append)
    assert s2["tokens"] == 5 * 8 * 32
    assert any("resumed" in l for l in logs)


def test_reference_run_matches_fused_at_step_one(corpus, tmp_path):
    a = train(small_args(corpus, tmp_path / "f", steps=1), log=lambda s: None)
    b = train(small_args(corpus, tmp_path / "r", steps=1, loss_impl="reference"),
              log=lambda s: None)
    assert a["first_step"]["loss"] == pytest.approx(b["first_step"]["loss"], rel=1e-5)


def test_corpus_split_is_deterministic_and_skips_binary(corpus):
    tr1, va1, _ = load_corpus(str(corpus))
    tr2, va2, _ = load_corpus(str(corpus))
    assert torch.equal(tr1, tr2) and torch.equal(va1, va2)
    assert 0 not in tr1.tolist()


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli_main(["train", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps must be positive" in capsys.readouterr().err


def test_cli_train_writes_summary(corpus, tmp_path):
    out = tmp_path / "cli"
    rc = cli_main(["train", "--data", str(corpus), "--out", str(out), "--steps", "3",
                   "--batch-size", "2", "--seq-len", "16", "--d-model", "32", "--layers", "1",
                   "--attn-heads", "2", "--n-future", "2", "--eval-batches", "1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["val_losses"]) == 2 and os.path.isfile(summary["checkpoint"])


SMALL_CLI = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--d-model", "32",
             "--layers", "1", "--attn-heads", "2", "--n-future", "2", "--eval-batches", "1",
             "--dtype", "fp32"]


def test_cli_refuses_to_overwrite_a_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--out", str(out), *SMALL_CLI]
    assert cli_main(args) == 0
    first = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert cli_main(args) == 2
    assert "exists: pass --resume" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == first
    assert cli_main(args + ["--overwrite", "--seed", "1"]) == 0
    assert (out / "checkpoint.pt").read_bytes() != first


def test_cli_generate_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    for name, content in (("text.pt", b"not a checkpoint"), ("tensor.pt", None)):
        path = tmp_path / name
        if content is None:
            torch.save(torch.ones(3), path)  # a torch file, but not ours
        else:
            path.write_bytes(content)
        assert cli_main(["generate", "--checkpoint", str(path), "--prompt", "x"]) == 2
        assert "is not a checkpoint written by `mtp-ext train`" in capsys.readouterr().err


def test_corpus_under_a_site_packages_path(corpus, tmp_path):
    """Only the corpus folder's own subfolders named site-packages are skipped, not its parents."""
    import shutil
    inside = tmp_path / "venv" / "lib" / "site-packages" / "mydata"
    shutil.copytree(corpus, inside)
    (inside / "site-packages").mkdir()
    (inside / "site-packages" / "skipped.py").write_text("x = 1\n" * 50)
    tr, va, what = load_corpus(str(inside))
    tr0, va0, _ = load_corpus(str(corpus))
    assert torch.equal(tr, tr0) and torch.equal(va, va0), what


def test_corpus_without_text_says_so(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="no text file found"):
        load_corpus(str(tmp_path))


def test_bf16_autocast_training(corpus, tmp_path):
    """--dtype bf16: the forward under bf16 autocast with fp32 weights; it trains as fp32 does
    (every head's validation loss within 2% here) and checkpoints fp32 weights."""
    f32 = train(small_args(corpus, tmp_path / "f32"), log=lambda s: None)
    b16 = train(small_args(corpus, tmp_path / "b16", dtype="bf16"), log=lambda s: None)
    first = b16["first_step"]["head_losses"]
    assert all(v < f - 0.5 for v, f in zip(b16["val_losses"], first))
    for a, b in zip(f32["val_losses"], b16["val_losses"]):
        assert abs(a - b) <= 0.02 * a, (f32["val_losses"], b16["val_losses"])
    _, ckpt = load_model(b16["checkpoint"])
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    with pytest.raises(ValueError, match="--dtype must be one of"):
        train(small_args(corpus, tmp_path / "x", dtype="fp16"), log=lambda s: None)
