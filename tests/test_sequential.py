"""DeepSeek-V3-style sequential MTP modules (MTPConfig(head_style="sequential")): the loss and
every gradient against a float64 full-logit computation written separately (whole-length
modules on zero-padded shifted tokens, F.cross_entropy per depth), what each depth may see
(depth k at position i reads tokens up to i + k, no further), the chained drafts of the
last-position logits, growing a parallel model into one with MTP modules, and `mtp-ext train
--head-style sequential` end to end, heads-only included."""
import pytest
import torch
import torch.nn.functional as F

from mtp_ext.model import MTPConfig, MTPModule, MTPTransformer
from mtp_ext.training.checkpoint import read_checkpoint
from mtp_ext.training.train import TrainArgs, load_model, train, with_heads

V = 48


def tiny(n=3, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_future=n, max_seq_len=40,
               head_style="sequential")
    cfg.update(kw)
    return MTPTransformer(MTPConfig(**cfg)).double()


def full_logit_loss(model, ids, labels, weights):
    """sum_k w_k CE_k in float64 with full logits: module k on the whole length, its token input
    ids shifted by k and zero-padded (causal attention keeps the padding out of the positions
    that have a label)."""
    B, T = ids.shape
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.embed(ids)
    for blk in model.trunk:
        x = blk(x, cos, sin)
    h = model.heads[0](x, cos, sin)
    total, per = 0.0, []
    for k in range(model.cfg.n_future):
        if k:
            ahead = torch.cat([ids[:, k:], ids.new_zeros(B, k)], dim=1)
            h = model.heads[k](h, model.embed(ahead), cos, sin)
        logits = model.norm(h) @ model.unembedding.T                    # [B, T, V]
        target = torch.full_like(labels, -100)
        target[:, :T - k - 1] = labels[:, k + 1:]
        ce = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=-100)
        per.append(ce)
        total = total + weights[k] * ce
    return total, per


@pytest.mark.parametrize("weights", [None, (1.0, 0.15, 0.15)])
@pytest.mark.parametrize("loss_impl", ["fused", "reference"])
def test_loss_and_gradients_equal_a_full_logit_reference(loss_impl, weights):
    model = tiny(head_weights=weights)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 21), generator=g)
    labels = ids.clone()
    labels[0, 5] = labels[2, 17] = -100                       # ignored targets
    out = model(ids, labels, loss_impl=loss_impl).loss
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    ref, per = full_logit_loss(model, ids, labels, weights or (1.0,) * 3)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(out.head_losses.double(), torch.stack(per).detach(), rtol=1e-6)  # float32 stats
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name
    assert all(b.abs().sum() > 0 for b in ref_grads)          # every parameter takes part


def test_depth_k_reads_tokens_up_to_i_plus_k():
    model = tiny(n=4)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    T, j = ids.shape[1], 9                                    # change token j only

    def hidden(x):
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        h, _, _ = model.trunk_forward(x)
        return model.sequential_forward(x, model.heads[0](h, cos, sin), cos, sin)
    other = ids.clone()
    other[:, j] = (other[:, j] + 1) % V
    for k, (a, b) in enumerate(zip(hidden(ids), hidden(other)), start=1):
        moved = (a - b).abs().amax(dim=(0, 2)) > 0            # positions whose hidden changed
        sees = torch.arange(T) + k >= j                       # position i reads tokens <= i + k
        valid = torch.arange(T) < T - k
        assert torch.equal(moved[valid], sees[valid]), k
        assert not moved[~valid].any() and (a[:, ~valid] == 0).all()


def test_last_position_logits_chain_the_greedy_drafts():
    model = tiny(n=4)
    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits                            # [n, B, V]
        ext = ids
        for k in range(3):                                    # the drafts, one depth at a time
            ext = torch.cat([ext, logits[k].argmax(-1, keepdim=True)], dim=1)
        T = ids.shape[1]
        cos, sin = model.rope_cos[:ext.shape[1]], model.rope_sin[:ext.shape[1]]
        h, _, _ = model.trunk_forward(ext)
        hs = model.sequential_forward(ext, model.heads[0](h, cos, sin), cos, sin)
        for k in range(1, 4):
            want = model.head_logits(k, hs[k - 1][:, T - 1])
            assert torch.allclose(logits[k], want, rtol=1e-10, atol=1e-12), k


def test_config_errors_and_decoding():
    with pytest.raises(ValueError, match="head_style must be one of"):
        MTPConfig(head_style="tree")
    with pytest.raises(ValueError, match=r"head_weights must be 3 finite non-negative"):
        MTPConfig(n_future=3, head_weights=(1.0, 0.1))
    with pytest.raises(ValueError, match="share one output head"):
        MTPConfig(head_style="sequential", per_head_unembedding=True)
    model = tiny()
    assert all(isinstance(h, MTPModule) for h in model.heads[1:])
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="sequential MTP modules draft one chain"):
        model.generate(ids, 4, speculative=True, tree=[(0,), (0, 0)])
    out = model.generate(ids, 4).tokens                       # plain: head 0
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[0].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def periodic_model(n=4, steps=300):
    """A small sequential model trained on sequences that repeat a random 5-token pattern:
    its modules draft well, so speculative steps keep runs of drafts."""
    model = tiny(n=n).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        pattern = torch.randint(0, V, (16, 5), generator=g)
        x = pattern.repeat(1, 7)[:, torch.randint(0, 5, (1,), generator=g).item():][:, :30]
        model(x, x).loss.loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return periodic_model()


def prompts(seed, B=5, P=12):
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, V, (B, 5), generator=g)
    ids = pattern.repeat(1, 4)[:, :P]
    lens = torch.randint(4, P + 1, (B,), generator=g)
    ids[0, 6:] = torch.randint(0, V, (P - 6,), generator=g)  # one sequence breaks the pattern
    return ids, lens


@pytest.mark.parametrize("untrained", [False, True])
def test_speculative_greedy_equals_plain_greedy(trained, untrained):
    model = tiny(n=4).float() if untrained else trained
    ids, lens = prompts(8)
    stop = int(ids[1, 2])                                     # a token that recurs: a stop
    for kw in ({}, {"stop_token": stop}):
        plain = model.generate(ids, 16, prompt_lengths=lens, **kw)
        spec = model.generate(ids, 16, prompt_lengths=lens, speculative=True, **kw)
        assert torch.equal(spec.tokens, plain.tokens) and torch.equal(spec.lengths, plain.lengths)
        for b in range(ids.shape[0]):                          # each alone, too
            one = model.generate(ids[b:b + 1, :int(lens[b])], 16, speculative=True, **kw)
            L = int(plain.lengths[b])
            assert torch.equal(one.tokens[0, :L], plain.tokens[b, :L])
        assert all(a <= p for a, p in zip(spec.head_accepted, spec.head_proposed))
        assert len(spec.head_proposed) == 3
        if not untrained and not kw:                          # the modules' drafts pay
            assert spec.tokens_per_forward > 2.0 and min(spec.acceptance) > 0.5
            assert spec.forward_passes < plain.forward_passes


def test_each_steps_drafts_equal_the_uncached_chain(trained):
    """After the prefill and after every step, each sequence's drafts are those of the model
    run without caches on its decided tokens (module k reading module k-1's greedy draft):
    the cache entries that read drafts were recomputed."""
    from mtp_ext.decoding import generate as gen
    model = trained
    ids, lens = prompts(9)
    s = gen._Decoding(model, ids, 24, 4, None, gen._Sampler(0.0, None, None))
    with torch.no_grad():
        gen._sequential_prefill(s, ids, lens)
        for step in range(6):
            for a, b in enumerate(s.rows.tolist()):
                made = int(s.made[b])
                seq = torch.cat([ids[b, :int(lens[b])], s.gen[b, :made]])[None]
                assert int(seq[0, -1]) == int(s.nxt[a])
                want = model(seq[:, :-1]).logits[1:, 0].argmax(-1)   # [n-1]
                assert torch.equal(s.drafts[a], want), (step, b)
            gen._sequential_step(s)


def test_speculative_sampling_runs_and_keeps_the_lengths(trained):
    ids, lens = prompts(10)
    out = trained.generate(ids, 12, prompt_lengths=lens, speculative=True, temperature=0.8,
                           top_k=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.lengths, lens + 12) and out.tokens_per_forward > 1.0
    assert int(out.tokens.max()) < V and int(out.tokens.min()) >= 0


def test_a_parallel_model_grows_mtp_modules():
    torch.manual_seed(0)
    base = MTPTransformer(MTPConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, n_future=1,
                                    max_seq_len=40))
    grown = with_heads(base, 3, "sequential", (1.0, 0.1, 0.1))
    assert grown.sequential and grown.cfg.head_weights == (1.0, 0.1, 0.1)
    b0, g = base.heads[0].state_dict(), grown.state_dict()
    for name, v in b0.items():
        assert torch.equal(g[f"heads.0.{name}"], v)
        assert torch.equal(g[f"heads.2.block.{name}"], v)   # a new module's block: head 0
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(base(ids).logits[0], grown(ids).logits[0])
    assert with_heads(grown, 3) is grown


def test_train_sequential_end_to_end_and_heads_only(corpus, tmp_path):
    small = dict(batch_size=4, seq_len=32, d_model=32, layers=1, attn_heads=2, warmup=2,
                 eval_every=1000, eval_batches=1, dtype="fp32", data=str(corpus), threads=1)
    quiet = lambda *_: None
    run = train(TrainArgs(steps=4, n_future=3, head_style="sequential",
                          head_weights=(1.0, 0.15, 0.15), out=str(tmp_path / "seq"), **small),
                log=quiet)
    model, _ = load_model(run["checkpoint"])
    assert model.sequential and model.cfg.head_weights == (1.0, 0.15, 0.15)
    assert len(run["val_losses"]) == 3 and model.draft_tree is None
    with pytest.raises(ValueError, match="--head-style 'sequential' there, 'parallel' here"):
        train(TrainArgs(steps=6, n_future=3, resume=True, out=str(tmp_path / "seq"), **small),
              log=quiet)
    with pytest.raises(ValueError, match=r"--head-weights needs one weight per head \(3\)"):
        train(TrainArgs(n_future=3, head_weights=(1.0,), out=str(tmp_path / "x"), **small))
    # heads-only: modules grown on a trained one-head model, the base unchanged bit for bit
    base = train(TrainArgs(steps=4, n_future=1, out=str(tmp_path / "base"), **small), log=quiet)
    heads = train(TrainArgs(steps=4, n_future=3, head_style="sequential", freeze_base=True,
                            init_from=base["checkpoint"], out=str(tmp_path / "heads"), **small),
                  log=quiet)
    before, after = read_checkpoint(base["checkpoint"]), read_checkpoint(heads["checkpoint"])
    for k, v in before["model"].items():
        assert torch.equal(after["model"][k], v), k
    trained = sum(v.numel() for k, v in after["model"].items() if k.startswith(("heads.1.", "heads.2.")))
    assert sum(s["exp_avg"].numel() for s in after["optimizer"]["state"].values()) == trained
