"""Heads-only training (the base frozen, heads 1..n-1 trained) for the reference model, for
Hugging Face models (MTPForCausalLM) and in `mtp-ext train --init-from C --freeze-base`: the
heads' gradients are those of full training, the base gets none and keeps no activations (the
bytes autograd saves do not grow with its depth), and training leaves it unchanged."""
import copy

import pytest
import torch

from mtp_ext.model import MTPConfig, MTPTransformer
from mtp_ext.training.checkpoint import read_checkpoint
from mtp_ext.training.train import TrainArgs, load_model, train


def saved_bytes(fn):
    """fn()'s result, and the bytes of the tensors autograd saved for backward while it ran."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def tiny(layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, d_model=32, n_layers=layers, n_heads=2, n_future=3, max_seq_len=32)
    cfg.update(kw)
    return MTPTransformer(MTPConfig(**cfg)).double()


def test_reference_model_heads_only_gradients_and_memory():
    full = tiny()
    frozen = copy.deepcopy(full).freeze_base()
    x = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(1))
    a = full(x, x).loss
    b, saved = saved_bytes(lambda: frozen(x, x).loss)
    assert torch.equal(a.head_losses, b.head_losses)  # the same model, the same losses
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(frozen.named_parameters(), full.parameters()):
        base = not name.startswith("heads.") or name.startswith("heads.0.")
        if base or name == "unembed":
            assert p.grad is None and not p.requires_grad, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
    # the frozen base keeps nothing for backward: four times the trunk, the same bytes
    deep = tiny(layers=8).freeze_base()
    _, deep_saved = saved_bytes(lambda: deep(x, x).loss)
    _, full_saved = saved_bytes(lambda: full(x, x).loss)
    assert deep_saved == saved < full_saved
    with pytest.raises(ValueError, match="per-head unembedding"):
        tiny(per_head_unembedding=True).freeze_base()


def test_mtp_ext_train_heads_only_on_a_trained_model(corpus, tmp_path):
    small = dict(batch_size=4, seq_len=32, d_model=32, layers=1, attn_heads=2, warmup=2,
                 eval_every=1000, eval_batches=1, dtype="fp32", data=str(corpus), threads=1)
    base = train(TrainArgs(steps=6, n_future=1, out=str(tmp_path / "base"), **small),
                 log=lambda *_: None)
    logs = []
    a = TrainArgs(steps=6, n_future=3, out=str(tmp_path / "heads"), init_from=base["checkpoint"],
                  freeze_base=True, **small)
    heads = train(a, log=logs.append)
    assert any("heads-only" in line for line in logs) and any("copy of head 0" in line
                                                              for line in logs)
    before, after = read_checkpoint(base["checkpoint"]), read_checkpoint(heads["checkpoint"])
    for k, v in before["model"].items():  # the base, unchanged, bit for bit
        if not k.startswith("heads.") or k.startswith("heads.0."):
            assert torch.equal(after["model"][k], v), k
    for k in range(1, 3):  # the new heads started as head 0 and trained
        name = f"heads.{k}.mlp.down.weight"
        assert not torch.equal(after["model"][name], before["model"]["heads.0.mlp.down.weight"])
    assert heads["val_losses"][0] == pytest.approx(base["val_losses"][0], abs=1e-6)
    model, _ = load_model(heads["checkpoint"])
    assert model.cfg.n_future == 3
    # AdamW holds state for the heads alone
    n_trainable = sum(p.numel() for n, p in model.named_parameters()
                      if n.startswith(("heads.1.", "heads.2.")))
    assert sum(s["exp_avg"].numel() for s in after["optimizer"]["state"].values()) == n_trainable
    with pytest.raises(ValueError, match="--freeze-base trains the heads of a trained model"):
        train(TrainArgs(freeze_base=True, out=str(tmp_path / "x"), **small))


transformers = pytest.importorskip("transformers")


def test_hf_heads_only_gradients_memory_and_trainer():
    from test_hf import SMALL, V
    from mtp_ext.hf import MTPForCausalLM

    def mtp(layers, frozen):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{**SMALL, "num_hidden_layers": layers})).double().eval()
        return MTPForCausalLM.from_causal_lm(model, 3, freeze_base=frozen)

    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    full, frozen = mtp(2, False), mtp(2, True)
    a = full(input_ids=x, labels=x)
    b, saved = saved_bytes(lambda: frozen(input_ids=x, labels=x))
    torch.testing.assert_close(a.head_losses, b.head_losses, rtol=1e-12, atol=0)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(frozen.named_parameters(), full.parameters()):
        if name.startswith("model."):
            assert p.grad is None and not p.requires_grad, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    _, deep_saved = saved_bytes(lambda: mtp(6, True)(input_ids=x, labels=x))
    _, full_saved = saved_bytes(lambda: full(input_ids=x, labels=x))
    assert deep_saved == saved < full_saved


def test_hf_heads_only_under_trainer(tmp_path):
    pytest.importorskip("accelerate")
    from mtp_ext.hf import finetune
    r = finetune.run(n_future=3, steps=12, batch=4, seq_len=32, hidden=64, layers=2,
                     val_batches=2, new_tokens=4, freeze_base=True, log=lambda *a: None)
    mtp = r["model"]
    torch.manual_seed(0)  # the base as finetune.run built it (the same seed)
    fresh = finetune.small_llama(hidden=64, layers=2)
    for (name, p), q in zip(mtp.model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.detach().cpu(), q), name
    assert r["after"][0] == pytest.approx(r["before"][0], abs=1e-6)  # head 0 is the base's
    assert all(a < b for a, b in zip(r["after"][1:], r["before"][1:])), r
