"""mtp_ext.hf.MTPForCausalLM on tiny random-weight transformers models (nothing fetched)."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from mtp_ext import hf  # noqa: E402
from mtp_ext.hf.mtp_model import _decoder_parts  # noqa: E402

from conftest import norm_err, rel_err  # noqa: E402
from test_hf import CONFIGS, V, loss_and_grads, make_batch, make_model  # noqa: E402


def make_mtp(family, n_future=3, seed=0, dtype=torch.float32):
    """Heads 1.. perturbed away from their copy of the last layer, so that each head differs."""
    mtp = hf.MTPForCausalLM.from_causal_lm(make_model(family, seed, dtype), n_future)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in mtp.heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    return mtp


def swapped_last_layer(mtp, layer, ids, mask):
    """The base model's final hidden state with `layer` in place of its last layer: what head k's
    hidden state must be, computed without the captured call."""
    layers, _ = _decoder_parts(mtp.model)
    original = layers[-1]
    layers[-1] = layer
    try:
        return mtp.model.base_model(ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        layers[-1] = original


def reference_loss(mtp, hidden, labels, num_items=None):
    """sum_k CE(softcap(lm_head(h_k)) at t, labels[t + k + 1]) with full logits, plain PyTorch."""
    cap = hf.softcap_of(mtp.model)
    total = 0
    for k, h in enumerate(hidden):
        logits = mtp.model.get_output_embeddings()(h).double()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        T = labels.shape[1]
        x, y = logits[:, :T - k - 1], labels[:, k + 1:]
        reduction = "mean" if num_items is None else "sum"
        loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), y.reshape(-1), reduction=reduction)
        total = total + (loss if num_items is None else loss / num_items)
    return total


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_heads_run_their_layer_on_the_trunk(family):
    """Head k's hidden state is the base model's output with head k as its last layer (the
    captured call: same input, mask, positions), through the shared final norm."""
    mtp = make_mtp(family).eval()
    ids, mask, labels = make_batch()
    hidden = mtp.head_hidden_states(ids, attention_mask=mask, use_cache=False)
    assert len(hidden) == 3
    want0 = mtp.model.base_model(ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert torch.equal(hidden[0], want0)
    for k, head in enumerate(mtp.heads, start=1):
        want = swapped_last_layer(mtp, head, ids, mask)
        assert rel_err(hidden[k], want) <= 1e-6, k
        assert rel_err(hidden[k], hidden[0]) > 1e-3  # the heads differ


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("items", [None, "tensor"])
def test_loss_is_the_sum_of_the_heads_cross_entropies(family, items):
    mtp = make_mtp(family).eval()
    ids, mask, labels = make_batch()
    n = None if items is None else torch.tensor(int((labels[:, 1:] != -100).sum()) + 3)
    out = mtp(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    assert out.logits is None
    hidden = mtp.head_hidden_states(ids, attention_mask=mask, use_cache=False)
    want = reference_loss(mtp, hidden, labels, n)
    assert rel_err(out.loss.detach().double(), want.detach()) <= 1e-5
    for k in range(3):  # per head: the mean over its labelled positions
        one = reference_loss(mtp, hidden[k:k + 1], F.pad(labels, (0, k), value=-100)[:, k:])
        assert out.head_losses[k].item() == pytest.approx(one.item(), rel=1e-5)
    assert out.head_tokens.tolist() == [int((labels[:, k + 1:] != -100).sum()) for k in range(3)]


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_one_head_is_the_base_model(family):
    """n_future=1: loss and every gradient are the base model's own; without labels the output
    is the base model's (head 0's logits)."""
    model = make_model(family)
    mtp = hf.MTPForCausalLM.from_causal_lm(copy.deepcopy(model), 1)
    ids, mask, labels = make_batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    want, want_g = loss_and_grads(model, **batch)
    got, got_g = loss_and_grads(mtp, **batch)
    assert rel_err(got.loss.detach(), want.loss.detach()) <= 1e-5
    assert {f"model.{k}" for k in want_g} == got_g.keys()
    for name, g in want_g.items():
        assert rel_err(got_g[f"model.{name}"], g) <= 1e-5, name
    three = make_mtp(family)
    assert torch.equal(three(input_ids=ids, attention_mask=mask).logits,
                       three.model(input_ids=ids, attention_mask=mask).logits)


def test_head_weights_and_bad_arguments():
    mtp = make_mtp("llama")
    ids, mask, labels = make_batch()
    out = mtp(input_ids=ids, labels=labels)
    weighted = hf.MTPForCausalLM(mtp.model, 3, head_weights=[1.0, 0.5, 0.25])
    weighted.heads.load_state_dict(mtp.heads.state_dict())
    got = weighted(input_ids=ids, labels=labels).loss
    want = (out.head_losses * torch.tensor([1.0, 0.5, 0.25])).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="n_future must be an int >= 1, got 0"):
        hf.MTPForCausalLM.from_causal_lm(mtp.model, 0)
    with pytest.raises(ValueError, match="head_weights has 2 entries, n_future is 3"):
        hf.MTPForCausalLM(mtp.model, 3, head_weights=[1, 1])
    with pytest.raises(ValueError, match="shift_labels is not supported"):
        mtp(input_ids=ids, shift_labels=labels)
    config = transformers.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                    ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32)
    opt = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"OPTForCausalLM \(model_type 'opt'\) is not supported"):
        hf.MTPForCausalLM.from_causal_lm(opt)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_and_load_round_trip(family, tmp_path):
    mtp = make_mtp(family, n_future=4)
    mtp.head_weights = [1.0, 0.5, 0.5, 0.5]
    mtp.save_pretrained(str(tmp_path))
    back = hf.MTPForCausalLM.from_pretrained(str(tmp_path))
    assert back.n_future == 4 and back.head_weights == mtp.head_weights
    want, got = mtp.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    ids, mask, labels = make_batch()
    a = mtp.eval()(input_ids=ids, attention_mask=mask, labels=labels).loss
    b = back.eval()(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="not an MTPForCausalLM directory"):
        hf.MTPForCausalLM.from_pretrained(str(tmp_path / "nothing"))
    (tmp_path / hf.mtp_model.META_FILE).write_text("{broken")
    with pytest.raises(ValueError, match="not a mtp_ext.json written by save_pretrained"):
        hf.MTPForCausalLM.from_pretrained(str(tmp_path))


def prompts(seed=7, B=2, P=6):
    return torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_speculative_decoding_is_greedy_decoding(family):
    """Greedy and self-speculative decoding through the heads (batch of 2, the KV caches cut
    back after each step) give the base model's own greedy output, token for token."""
    mtp = make_mtp(family).eval()
    ids = prompts()
    want = mtp.model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    plain = mtp.generate(ids, 24, speculative=False, return_dict_in_generate=True)
    spec = mtp.generate(ids, 24, speculative=True, return_dict_in_generate=True)
    assert torch.equal(plain.tokens, want)
    assert torch.equal(spec.tokens, want)
    # the sequences of a batch are decoded one at a time (the cache has one length)
    assert plain.sequence_forwards.tolist() == [24, 24] and plain.forward_passes == 48
    assert int(spec.sequence_forwards.max()) <= 24
    assert sum(spec.head_proposed) > 0


def test_speculative_decoding_accepts_and_rejects():
    """Across the families both happen (random tiny models repeat tokens, which copies of the
    last layer draft right), so both branches of the acceptance are exercised above."""
    accepted = proposed = 0
    for family in CONFIGS:
        out = make_mtp(family).eval().generate(prompts(), 24, return_dict_in_generate=True)
        accepted += sum(out.head_accepted)
        proposed += sum(out.head_proposed)
    assert 0 < accepted < proposed


@pytest.mark.slow
def test_compile_checkpointing_and_autocast():
    mtp = make_mtp("llama")
    ids, mask, labels = make_batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    want, want_g = loss_and_grads(mtp, **batch)
    mtp.train()  # no dropout in these configs: train mode changes nothing but checkpointing
    mtp.activation_checkpointing_enable()
    assert all(h.gradient_checkpointing for h in mtp.heads)
    mtp.zero_grad()
    got = torch.compile(mtp)(**batch)
    got.loss.backward()
    got_g = {n: p.grad.double() for n, p in mtp.named_parameters() if p.grad is not None}
    assert got_g.keys() == want_g.keys()
    assert rel_err(got.loss.detach(), want.loss.detach()) <= 1e-5
    for name, g in want_g.items():
        assert rel_err(got_g[name], g) <= 1e-4, name
    mtp.activation_checkpointing_disable()
    assert not any(h.gradient_checkpointing for h in mtp.heads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp, amp_g = loss_and_grads(mtp, **batch)
    assert norm_err(amp.loss.detach(), want.loss.detach()) <= 2e-2
    assert norm_err(amp_g["heads.0.mlp.down_proj.weight"],
                    want_g["heads.0.mlp.down_proj.weight"]) <= 5e-2


@pytest.mark.parametrize("options", [{}, {"bf16": True, "checkpointing": True}])
def test_trainer_fine_tune_lowers_every_heads_validation_loss(options):
    """The example (python -m mtp_ext.hf.finetune), small: a random Llama made an MTP model and
    trained with Trainer on the corpus (fp32; bf16 autocast with activation checkpointing);
    every head's validation loss goes down."""
    pytest.importorskip("accelerate")
    from mtp_ext.hf import finetune
    r = finetune.run(n_future=3, steps=30, batch=4, seq_len=64, hidden=64, layers=2,
                     val_batches=2, new_tokens=8, log=lambda *a: None, **options)
    if options.get("checkpointing"):
        assert all(h.gradient_checkpointing for h in r["model"].heads)
    assert len(r["before"]) == len(r["after"]) == 3
    for k, (b, a) in enumerate(zip(r["before"], r["after"])):
        assert a < b - 0.5, (k, b, a)
