"""mtp_ext.hf with tiny random-weight transformers models (built from configs: nothing fetched)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from mtp_ext import hf  # noqa: E402

from conftest import norm_err, rel_err  # noqa: E402

V = 503  # not a multiple of 8
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=16, query_pre_attn_scalar=16,
                                                final_logit_softcapping=5.0,
                                                attn_logit_softcapping=50.0, sliding_window=8),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                            n_positions=64),
}


def make_model(family, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())
    # larger output weights than the init's 0.02: a softmax far from uniform, softcap engaged
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.3)
    return model.to(dtype).eval()  # no dropout (GPT-2 has some): the two paths see one model


def make_batch(seed=1, B=3, T=20):
    """Right padding on row 1 (mask 0, labels -100, as the collators do) and ignored labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, T - 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 3:7] = -100
    return ids, mask, labels


def loss_and_grads(model, **batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                 if p.grad is not None}


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("items", [None, "int", "tensor"])
def test_same_loss_and_gradients_as_the_model(family, items):
    model = make_model(family)
    fused = hf.use_fused_loss(copy.deepcopy(model))
    ids, mask, labels = make_batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if items is not None:  # what Trainer passes under gradient accumulation
        n = int((labels[:, 1:] != -100).sum()) + 5
        batch["num_items_in_batch"] = n if items == "int" else torch.tensor(n)
    want, want_g = loss_and_grads(model, **batch)
    got, got_g = loss_and_grads(fused, **batch)
    assert got.logits is None and want.logits is not None
    assert rel_err(got.loss.detach(), want.loss.detach()) <= 1e-5
    assert want_g.keys() == got_g.keys()
    for name, g in want_g.items():
        assert rel_err(got_g[name], g) <= 1e-5, name


def test_shift_labels_and_tuple_output():
    model = make_model("llama")
    fused = hf.use_fused_loss(copy.deepcopy(model))
    ids, mask, labels = make_batch()
    shifted = labels  # not the default shift: the loss must take these as given
    want = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted).loss
    got = fused(input_ids=ids, attention_mask=mask, shift_labels=shifted, return_dict=False)
    assert isinstance(got, tuple) and rel_err(got[0].detach(), want.detach()) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_bf16_within_twice_the_models_own_error(family):
    """In bf16 the fused loss's error against the fp32 model is at most twice the bf16 model's
    own (norm-wise, over the loss and every gradient)."""
    ids, mask, labels = make_batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_g = loss_and_grads(make_model(family), **batch)
    model = make_model(family, dtype=torch.bfloat16)
    fused = hf.use_fused_loss(copy.deepcopy(model))
    own, own_g = loss_and_grads(model, **batch)
    got, got_g = loss_and_grads(fused, **batch)
    half_ulp = torch.finfo(torch.bfloat16).eps / 2
    assert norm_err(got.loss.detach(), ref.loss.detach()) <= \
        2 * norm_err(own.loss.detach(), ref.loss.detach()) + half_ulp
    for name, g in ref_g.items():
        assert norm_err(got_g[name], g) <= 2 * norm_err(own_g[name], g) + 1e-3, name


def test_inference_unchanged_and_undo():
    model = make_model("gemma2")
    ids, mask, labels = make_batch()
    want = model(input_ids=ids, attention_mask=mask).logits
    hf.use_fused_loss(model)
    hf.use_fused_loss(model)  # twice is once
    assert hf.is_fused(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
    assert model(input_ids=ids, labels=labels).logits is None
    hf.remove_fused_loss(model)
    assert not hf.is_fused(model) and "forward" not in model.__dict__
    assert model(input_ids=ids, labels=labels).logits is not None
    out = model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_unsupported_architecture_is_named():
    config = transformers.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                    ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"OPTForCausalLM \(model_type 'opt'\) is not supported"):
        hf.use_fused_loss(model)
    base = transformers.AutoModel.from_config(CONFIGS["llama"]())
    with pytest.raises(ValueError, match="LlamaModel has no output embedding"):
        hf.use_fused_loss(base)


@pytest.mark.slow
def test_compile_and_gradient_checkpointing():
    model = make_model("llama")
    fused = hf.use_fused_loss(copy.deepcopy(model))
    fused.gradient_checkpointing_enable()
    fused.train()
    model.train()
    ids, mask, labels = make_batch()
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    compiled = torch.compile(fused)
    got = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    got.backward()
    assert rel_err(got.detach(), want.detach()) <= 1e-5
    assert all(p.grad is not None for p in fused.parameters())


def test_trainer_gives_the_models_losses(tmp_path):
    """A few Trainer steps with gradient accumulation (num_items_in_batch): the same losses as
    the unpatched model, to rounding."""
    pytest.importorskip("accelerate")
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, V, (int(torch.randint(8, 20, (1,), generator=g)),), generator=g)
            for _ in range(16)]
    data = [{"input_ids": r.tolist()} for r in rows]
    pad = V - 1

    def collate(items):
        T = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), T), pad)
        mask = torch.zeros(len(items), T, dtype=torch.long)
        for i, x in enumerate(items):
            ids[i, :len(x["input_ids"])] = torch.tensor(x["input_ids"])
            mask[i, :len(x["input_ids"])] = 1
        return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    def run(model, name):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4,
            gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
            report_to=[], use_cpu=True, seed=0, save_strategy="no", dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       data_collator=collate)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    model = make_model("llama")
    want = run(copy.deepcopy(model), "plain")
    got = run(hf.use_fused_loss(copy.deepcopy(model)), "fused")
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4)


PEAK_SCRIPT = r"""
import json, sys, torch, transformers
import mtp_ext.hf
from mtp_ext.benchmark import _release_free_memory, _reset_peak_rss, _rss_now_and_peak
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=1024)
model = transformers.LlamaForCausalLM(cfg)
if sys.argv[1] == "fused":
    mtp_ext.hf.use_fused_loss(model)
ids = torch.randint(0, 128256, (4, 1024))  # 4096 tokens
def step():
    model.zero_grad(set_to_none=False)
    model(input_ids=ids, labels=ids).loss.backward()
step()  # warm: gradients allocated, libraries loaded
_release_free_memory()
_reset_peak_rss()
before = _rss_now_and_peak()[0]
step()
print(json.dumps(_rss_now_and_peak()[1] - before))
"""


@pytest.mark.slow
def test_peak_memory_of_a_llama3_vocabulary_step():
    """A training step at the Llama-3 vocabulary (128256) with 4096 tokens: the fused loss's peak
    (fresh process each) is lower than the model's own by at least the fp32 logits' size."""
    peaks = {}
    for mode in ("plain", "fused"):
        r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode], capture_output=True,
                           text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    logits_bytes = 4096 * 128256 * 4
    print(f"peak above the resident set: plain {peaks['plain'] / 2**20:.0f} MiB, "
          f"fused {peaks['fused'] / 2**20:.0f} MiB")
    assert peaks["plain"] - peaks["fused"] >= logits_bytes, peaks
