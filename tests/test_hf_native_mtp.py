"""mtp_ext.hf.NativeMTPForCausalLM: transformers models' own MTP layers (MtpModel) trained with
the fused loss, on tiny random configs built offline (DeepSeek-V3, GLM-4.5 and Mellum; nothing fetched)."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.modeling_layers", reason="transformers without MtpModel")
from transformers.modeling_layers import MtpModel  # noqa: E402

from mtp_ext import hf  # noqa: E402

from conftest import rel_err  # noqa: E402

V = 97


def deepseek_v3(num_mtp_layers=1):
    # 61 layers: DeepSeek-V3's checkpoints keep the MTP layer at model.layers.61, and
    # transformers finds it only there (DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected)
    return transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=61, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8,
        qk_nope_head_dim=8, n_group=1, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=61, max_position_embeddings=128, num_mtp_layers=num_mtp_layers)


def mellum():
    # MoE layers, a sliding-window MTP layer (window 8 < the test's sequences), mtp.layers.0.*
    return transformers.MellumConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=16,
        num_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], num_mtp_layers=1,
        mtp_layer_types=["sliding_attention"], max_position_embeddings=128)


def glm4_moe():
    # 46 layers: GLM-4.5-Air's, whose MTP layer transformers finds at model.layers.46
    return transformers.Glm4MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=46, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=46,
        use_qk_norm=True, max_position_embeddings=128, num_mtp_layers=1)


CONFIGS = {"deepseek_v3": deepseek_v3, "mellum": mellum, "glm4_moe": glm4_moe,
           "deepseek_v3-2": lambda: deepseek_v3(num_mtp_layers=2)}


def make(family, seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())
    nm = hf.NativeMTPForCausalLM.from_causal_lm(model, **kwargs)
    with torch.no_grad():  # a softmax far from uniform, MTP layers away from their init
        model.get_output_embeddings().weight.normal_(0, 0.3)
        g = torch.Generator().manual_seed(seed + 1)
        for p in nm.mtp.layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    if dtype == torch.float64:  # the grouped-GEMM experts take no float64
        model.set_experts_implementation("eager")
        nm.mtp.set_experts_implementation("eager")
    return nm.to(dtype).eval()


def batch(seed=1, B=2, T=14):
    """Right padding on row 1 (mask 0, labels -100) and ignored labels on row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, T - 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3:6] = -100
    return ids, mask, labels


class _TeacherForcing:
    """A logits processor for MtpModel.forward: records each depth's logits and makes the
    depth draft the true next token, so that the next depth reads it as in training."""

    def __init__(self, ids, start):
        self.ids, self.start, self.logits = ids, start, []

    def __call__(self, full_ids, scores):
        self.logits.append(scores)
        t = full_ids.shape[1]  # the position of the token this depth drafts
        forced = torch.full_like(scores, -float("inf"))
        if t < self.ids.shape[1]:
            forced.scatter_(1, self.ids[:, t:t + 1], 0.0)
        else:
            forced[:, 0] = 0.0  # past the sequence: nothing reads it
        return forced


def reference_loss(nm, ids, mask, labels, mtp_weight=0.3):
    """The loss computed with transformers' own code and full logits: the main model's logits
    and, for every prefix of the sequence, MtpModel.forward as generate(use_mtp=True) calls it
    (depth k at prefix length P drafts token P + k + 1), with the true tokens forced as the
    drafts; F.cross_entropy per depth, DeepSeek-V3's L_main + lambda / D sum_k L_k."""
    model, mtp = nm.model, nm.mtp
    B, T = ids.shape
    n = nm.num_mtp_layers
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    terms = [F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())]
    last = out.hidden_states[-1]
    pos = torch.arange(T).expand(B, T)
    depth_logits = [[] for _ in range(n)]
    for P in range(1, T - 1):  # main model ran tokens 0..P-1; token P is known
        proc = _TeacherForcing(ids, P + 1)
        mtp(input_ids=ids[:, 1:P + 1], last_hidden_states=last[:, :P], attention_mask=None,
            position_ids=pos[:, 1:P + 1], mtp_cache=None, logits_processor=proc,
            full_input_ids=ids[:, :P + 1])
        for k in range(n):
            if P + 1 + k < T:
                depth_logits[k].append((proc.logits[k], labels[:, P + 1 + k]))
    for k in range(n):
        z = torch.cat([z for z, _ in depth_logits[k]])
        y = torch.cat([y for _, y in depth_logits[k]])
        terms.append(F.cross_entropy(z, y))
    return terms[0] + mtp_weight / n * sum(terms[1:]), torch.stack(terms).detach()


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_loss_and_gradients_equal_transformers_full_logits(family):
    """float64: the fused loss, each depth's loss and every gradient (base and MTP layers) equal
    the full-logit computation through transformers' own drafting code."""
    nm = make(family, dtype=torch.float64)
    ids, mask, labels = batch()
    got = nm(ids, attention_mask=mask, labels=labels)
    assert got.head_losses.shape == (1 + nm.num_mtp_layers,)
    nm.zero_grad()
    got.loss.backward()
    got_g = grads(nm)
    want, want_terms = reference_loss(nm, ids, mask, labels)
    nm.zero_grad()
    want.backward()
    want_g = grads(nm)
    # transformers' RMSNorm computes in float32 whatever the input (hidden.to(torch.float32)):
    # the two computations round alike to ~1e-7, not to float64's 1e-16; an off-by-one in
    # positions, tokens or labels is an O(1) difference
    assert rel_err(got.loss.detach(), want.detach()) <= 1e-6
    assert rel_err(got.head_losses.double(), want_terms) <= 1e-6
    assert got_g.keys() == want_g.keys() and len(got_g) == len(list(nm.parameters()))
    worst = max(rel_err(got_g[name], g) for name, g in want_g.items())
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "mellum"])
def test_new_layers_are_initialized(family):
    """transformers' MtpModel(model, n) leaves the MoE experts' weights as torch.empty gave
    them; from_causal_lm initializes them as the family does: finite and the same for a seed
    (garbage would differ between two constructions, whatever the allocator hands back)."""
    states = []
    for _ in range(3):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())
        garbage = torch.full((1 << 16,), float("nan"))  # freed: the allocator may reuse it
        del garbage
        states.append(hf.NativeMTPForCausalLM.from_causal_lm(model).mtp.layers.state_dict())
    experts = [k for k in states[0] if "experts" in k]
    assert experts
    for k, v in states[0].items():
        assert torch.isfinite(v).all(), k
        assert all(torch.equal(v, s[k]) for s in states[1:]), k
    std = states[0][experts[0]].float().std().item()
    assert 0.01 < std < 0.04  # initializer_range 0.02


def test_num_items_in_batch_and_mtp_weight():
    """Trainer's gradient-accumulation form: each term's sum / num_items_in_batch."""
    nm = make("deepseek_v3-2", dtype=torch.float64, mtp_weight=0.5)
    ids, mask, labels = batch()
    mean = nm(ids, attention_mask=mask, labels=labels)
    n_items = 17
    summed = nm(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(n_items))
    w = torch.tensor([1.0, 0.25, 0.25], dtype=torch.float64)
    sums = mean.head_losses.double() * mean.head_tokens.double()
    # head_losses are float32
    assert rel_err(summed.loss.detach() * n_items, (w * sums).sum()) <= 1e-6
    assert rel_err(mean.loss.detach(), (w * mean.head_losses.double()).sum()) <= 1e-6


def _cyclic(seed, B, T, period=7):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, period, (B, 1), generator=g)
    return (start + torch.arange(T)) % period + 3


def _train(nm, steps, lr=1e-2, seed=0):
    params = [p for p in nm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    nm.train()
    for s in range(steps):
        ids = _cyclic(seed + s, 8, 16)
        out = nm(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    nm.eval()
    return out


class _Forwards:
    def __init__(self, model):
        self.count = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.count += 1


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "mellum"])
def test_trained_layers_load_and_draft_in_transformers_generate(family, tmp_path):
    """Trained with the fused loss and saved: transformers' from_pretrained +
    generate(use_mtp=True) loads these MTP weights (compared by value), decodes plain greedy's
    tokens and accepts drafts (fewer forwards of the main model than new tokens)."""
    nm = make(family)
    before = copy.deepcopy(nm.mtp.state_dict())
    out = _train(nm, 40)
    assert out.head_losses[1] < 0.5  # depth 0 learned the cycle
    trained = nm.mtp.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    nm.save_pretrained(str(tmp_path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    for k, v in MtpModel.from_pretrained(loaded).state_dict().items():
        assert torch.equal(v, trained[k]), k
    prompt = _cyclic(99, 1, 5)
    plain = loaded.generate(prompt, max_new_tokens=12, do_sample=False)
    counter = _Forwards(loaded)
    drafted = loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_mtp=True)
    assert torch.equal(drafted, plain)
    assert counter.count < 12
    # and ours loads it back
    again = hf.NativeMTPForCausalLM.from_pretrained(str(tmp_path))
    for k, v in again.mtp.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_frozen_base_trains_only_the_mtp_layers():
    nm = make("mellum", freeze_base=True)
    base = copy.deepcopy(nm.model.state_dict())
    mtp_before = {k: v.clone() for k, v in nm.mtp.layers.state_dict().items()}
    ids = _cyclic(3, 4, 12)
    out = nm(ids, labels=ids)
    assert out.loss.requires_grad
    out.loss.backward()
    assert all(p.grad is None for p in nm.model.parameters())
    assert all(p.grad is not None for p in nm.mtp.layers.parameters())
    _train(nm, 3)
    for k, v in nm.model.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert any(not torch.equal(v, mtp_before[k]) for k, v in nm.mtp.layers.state_dict().items())


def test_trainer(tmp_path):
    """A few Trainer steps with gradient accumulation: the MTP layers train, and the result
    saves into a checkpoint that transformers loads with its MTP layers."""
    pytest.importorskip("accelerate")
    nm = make("mellum")
    before = {k: v.clone() for k, v in nm.mtp.layers.state_dict().items()}
    data = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in _cyclic(7, 16, 12)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, save_strategy="no", dataloader_num_workers=0)
    trainer = transformers.Trainer(model=nm, args=args, train_dataset=data,
                                   data_collator=transformers.default_data_collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, before[k]) for k, v in nm.mtp.layers.state_dict().items())
    nm.save_pretrained(str(tmp_path / "saved"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    for k, v in MtpModel.from_pretrained(loaded).state_dict().items():
        assert torch.equal(v, nm.mtp.state_dict()[k]), k


def test_errors(tmp_path):
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="num_mtp_layers"):
        hf.NativeMTPForCausalLM.from_causal_lm(llama)
    with pytest.raises(ValueError, match="mtp_weight"):
        make("mellum", mtp_weight=-1.0)
    nm = make("mellum")
    ids = _cyclic(1, 2, 10)
    left = torch.ones_like(ids)
    left[0, :3] = 0
    with pytest.raises(ValueError, match="left padding"):
        nm(ids, attention_mask=left, labels=ids)
    two = make("deepseek_v3-2")  # trains, but transformers finds only model.layers.61
    with pytest.raises(ValueError, match=r"model\.layers\.62"):
        two.save_pretrained(str(tmp_path))
