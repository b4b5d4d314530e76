"""KV cache, greedy and self-speculative decoding."""
import copy

import pytest
import torch

from mtp_ext.model import MTPConfig, MTPTransformer
from mtp_ext.training.train import TrainArgs, load_model, train


def tiny(seed=0, **kw):
    cfg = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=2, n_future=4, max_seq_len=96)
    cfg.update(kw)
    torch.manual_seed(seed)
    return MTPTransformer(MTPConfig(**cfg)).double().eval()


def full_logits(model, x):
    xs, cos, sin = model.trunk_forward(x)
    return torch.stack([model.head_logits(k, model.head_forward(k, xs, cos, sin))
                        for k in range(model.cfg.n_future)])


@pytest.mark.parametrize("unembedding", [{}, {"per_head_unembedding": True}])
def test_kv_cache_gives_the_logits_of_a_full_forward(unembedding):
    model = tiny(**unembedding)
    x = torch.randint(0, 48, (3, 20), generator=torch.Generator().manual_seed(1))
    want = full_logits(model, x)
    caches = model.new_caches(3)
    got = torch.cat([model.forward_cached(x[:, a:b], caches)
                     for a, b in ((0, 7), (7, 8), (8, 12), (12, 20))], dim=2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for c in caches:  # rejected positions are forgotten and rewritten
        c.truncate(10)
    again = model.forward_cached(x[:, 10:20], caches)
    torch.testing.assert_close(again, want[:, :, 10:20], rtol=1e-10, atol=1e-10)


def test_stacked_draft_heads_follow_their_parameters():
    """Cached decoding runs heads 1..n-1 with stacked copies of their weights: a change of a
    parameter (an optimizer step, a load) is seen by the next forward."""
    model = tiny()
    x = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(6))
    model.forward_cached(x, model.new_caches(2))
    with torch.no_grad():
        model.heads[2].mlp.down.weight.mul_(3.0)
        model.heads[1].norm1.weight.add_(0.5)
    got = model.forward_cached(x, model.new_caches(2))
    torch.testing.assert_close(got, full_logits(model, x), rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny byte model trained on repetitive text, so that its heads draft well."""
    d = tmp_path_factory.mktemp("corpus")
    lines = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
             "class Point:\n    x = 0\n    y = 0\n"]
    for i in range(30):
        (d / f"f{i}.py").write_text("".join(lines[(i + j) % 3] for j in range(40)))
    out = tmp_path_factory.mktemp("run")
    a = TrainArgs(steps=120, batch_size=16, seq_len=64, lr=5e-3, warmup=10, data=str(d),
                  out=str(out), eval_every=1000, eval_batches=1, d_model=48, layers=1,
                  attn_heads=2, n_future=4)
    s = train(a, log=lambda m: None)
    model, _ = load_model(s["checkpoint"])
    return model.double().eval()


@pytest.mark.parametrize("which", ["untrained", "trained"])
@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_equals_greedy(which, batch, request):
    model = tiny(seed=3) if which == "untrained" else request.getfixturevalue("trained")
    V = model.cfg.vocab_size
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(32 if V == 256 else 0, min(V, 127), (batch, 5 + seed), generator=g)
        greedy = model.generate(prompt, 30)
        spec = model.generate(prompt, 30, speculative=True)
        assert torch.equal(spec.tokens, greedy.tokens)
        assert greedy.tokens.shape == (batch, prompt.shape[1] + 30)
        assert greedy.tokens_per_forward == 1.0
        assert 1.0 <= spec.tokens_per_forward <= model.cfg.n_future
        assert spec.forward_passes <= greedy.forward_passes


def test_trained_model_accepts_drafts(trained):
    prompt = torch.tensor([list(b"def add(a, b):\n    return a + b\n")])
    spec = trained.generate(prompt, 24, speculative=True, plan=False)
    assert spec.tokens_per_forward > 1.5, spec.stats()
    assert all(0.0 <= a <= 1.0 for a in spec.acceptance)


def test_stop_token_and_sampling():
    model = tiny(seed=5)
    prompt = torch.randint(0, 48, (3, 4), generator=torch.Generator().manual_seed(2))
    greedy = model.generate(prompt, 25)
    stop = int(greedy.tokens[1, 4 + 6])  # sequence 1 produces this token at step 7
    for spec in (False, True):
        out = model.generate(prompt, 25, speculative=spec, stop_token=stop)
        for b in range(3):
            row = out.tokens[b, 4:].tolist()
            if stop in row:
                i = row.index(stop)
                assert all(t == stop for t in row[i:])
                assert row[:i] == greedy.tokens[b, 4:4 + i].tolist()
    # top_k = 1 sampling is greedy; a seeded generator makes sampling repeatable
    torch.testing.assert_close(model.generate(prompt, 10, temperature=0.7, top_k=1).tokens,
                               greedy.tokens[:, :14])
    a = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)


def test_generate_errors():
    model = tiny()
    p = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(p, 200)
    with pytest.raises(ValueError, match=r"prompt_lengths must be \[B\] = \[1\] values in \[1, 4\]"):
        model.generate(p, 5, prompt_lengths=[5])
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        model.generate(p, 5, temperature=-1.0)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(4, dtype=torch.long), 5)


def test_cli_generate(trained, tmp_path, capsys):
    from mtp_ext.cli import main as cli_main
    ckpt = tmp_path / "ckpt.pt"
    from mtp_ext.training.train import TrainArgs
    import mtp_ext.training.train as T
    model = copy.deepcopy(trained).float()  # the fixture is shared: leave it in float64
    opt = torch.optim.AdamW(model.parameters())
    T.save_checkpoint(ckpt, model, opt, 1, TrainArgs(), torch.Generator())
    assert cli_main(["generate", "--checkpoint", str(ckpt), "--prompt", "def add(",
                     "--max-new-tokens", "12", "--speculative"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def add(")
    assert "tokens/forward" in out.err and "acceptance" in out.err
    assert "ms/token" in out.err and "speedup" in out.err
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["untrained", "trained", "one-at-a-time"])
def test_batch_of_different_lengths_and_stops_equals_one_at_a_time(which, request,
                                                                   monkeypatch):
    """Each sequence of a batch advances by its own accepted run (prompts of different lengths,
    a stop token), and its tokens are those of greedy decoding of that sequence alone;
    `lengths` is each sequence's prompt and generated tokens, on the batched path and on the
    one-at-a-time path of models without per-sequence positions (the HF adapter's)."""
    model = tiny(seed=3) if which == "untrained" else request.getfixturevalue("trained")
    if which == "one-at-a-time":
        monkeypatch.setattr(model, "per_row_positions", False)
    lo, hi = (32, 127) if model.cfg.vocab_size == 256 else (0, model.cfg.vocab_size)
    g = torch.Generator().manual_seed(4)
    lens = [3, 9, 6, 1]
    prompts = torch.randint(lo, hi, (4, 9), generator=g)
    alone = [model.generate(prompts[b:b + 1, :lens[b]], 30) for b in range(4)]
    stop = int(alone[2].tokens[0, lens[2] + 11])  # sequence 2 stops at its 12th token or before
    for spec in (False, True):
        out = model.generate(prompts, 30, speculative=spec, stop_token=stop, prompt_lengths=lens)
        for b in range(4):
            want = alone[b].tokens[0, lens[b]:].tolist()
            if stop in want:
                want = want[:want.index(stop) + 1]
            got = out.tokens[b, lens[b]:lens[b] + out.new_tokens].tolist()
            assert got[:len(want)] == want and all(t == stop for t in got[len(want):]), b
            assert torch.equal(out.tokens[b, :lens[b]], prompts[b, :lens[b]])
            assert int(out.sequence_tokens[b]) == len(want)
            assert int(out.lengths[b]) == lens[b] + len(want)  # tokens[b, :lengths[b]]
        assert int(out.sequence_forwards[2]) < int(out.sequence_forwards.max())  # it left early


def test_batched_speculation_keeps_each_sequences_run(trained):
    """A batch does not advance by its shortest run: tokens per forward of a batch of prompts
    is that of the same prompts one at a time."""
    text = [b"def add(a, b):\n    return a + b\n", b"for i in range(10):\n    print(i)\n",
            b"class Point:\n    x = 0\n", b"zzq"]
    lens = [len(t) for t in text]
    prompts = torch.zeros(4, max(lens), dtype=torch.long)
    for b, t in enumerate(text):
        prompts[b, :len(t)] = torch.tensor(list(t))
    batch = trained.generate(prompts, 24, speculative=True, prompt_lengths=lens, plan=False)
    alone = [trained.generate(prompts[b:b + 1, :lens[b]], 24, speculative=True, plan=False)
             for b in range(4)]
    for b in range(4):
        assert torch.equal(batch.tokens[b, lens[b]:lens[b] + 24], alone[b].tokens[0, lens[b]:])
        assert int(batch.sequence_forwards[b]) == alone[b].forward_passes
    assert batch.tokens_per_forward == pytest.approx(
        sum(o.new_tokens for o in alone) / sum(o.forward_passes for o in alone))
    assert batch.tokens_per_forward > 1.5


@torch.no_grad()
def exact_distribution(model, prompt, steps, temperature, top_k):
    """P(next `steps` tokens) of plain sampling from head 0, by enumeration: [V] * steps."""
    V = model.cfg.vocab_size
    seqs = prompt[None]
    probs = torch.ones(1, dtype=torch.float64)
    for _ in range(steps):
        logits = full_logits(model, seqs)[0, :, -1].double() / temperature  # [S, V]
        if top_k is not None:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = (probs[:, None] * logits.softmax(-1)).reshape(-1)
        seqs = torch.cat([seqs.repeat_interleave(V, 0),
                          torch.arange(V).repeat(seqs.shape[0])[:, None]], 1)
    return probs


def chi_squared_z(counts, probs, total):
    """Pearson's statistic over the cells expected >= 5 times (the rest pooled), as a z-score
    (Wilson-Hilferty): large when counts do not follow probs."""
    expected = probs * total
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    x2 = float(((obs - exp) ** 2 / exp).sum())
    k = obs.numel() - 1
    return ((x2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / (2 / (9 * k)) ** 0.5


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 5)])
def test_speculative_sampling_has_the_distribution_of_plain_sampling(temperature, top_k):
    """The joint distribution of the first three sampled tokens (8^3 cells, 12000 sequences in
    one batch) against the exact one of plain sampling: chi-squared, for speculative sampling
    (drafts accepted with min(1, p/q), residual draws) and for plain sampling itself. A wrong
    acceptance rule (e.g. keeping every draft) is off by far more."""
    model = tiny(seed=11, vocab_size=8, n_future=3, max_seq_len=12).float()
    with torch.no_grad():  # sharper, different distributions per head
        model.unembedding.mul_(1.5)
    prompt = torch.tensor([1, 5, 2, 7])
    probs = exact_distribution(model, prompt, 3, temperature, top_k)
    S = 12000
    for spec in (False, True):
        out = model.generate(prompt.repeat(S, 1), 3, speculative=spec, temperature=temperature,
                             top_k=top_k, generator=torch.Generator().manual_seed(7))
        t = out.tokens[:, 4:7]
        counts = torch.bincount(t[:, 0] * 64 + t[:, 1] * 8 + t[:, 2], minlength=512).double()
        z = chi_squared_z(counts, probs, S)
        assert z < 4.5, (spec, z)
        if spec:
            assert 0 < sum(out.head_accepted) < sum(out.head_proposed), out.stats()


# ---- tree drafting ----

TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 1, 0)]


def test_tree_forward_gives_the_logits_of_each_path():
    """forward_tree: every node's head-0 logits are those of a full forward of the prompt and
    the node's path of tokens (tree mask, RoPE positions by depth); after commit_path of a
    path, draft_forward's logits are the draft heads' of the full forward, and so is the next
    step's verification."""
    from mtp_ext.decoding.generate import DraftTree
    model = tiny(seed=2)
    tree = DraftTree(TREE, 4)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 48, (2, 7), generator=g)
    lens = torch.tensor([7, 5])
    caches = model.new_caches(2)
    model.forward_cached(prompts, caches, positions=torch.zeros(2, dtype=torch.long))
    toks = torch.randint(0, 48, (2, len(TREE) + 1), generator=g)
    head0, x = model.forward_tree(toks, caches, lens, tree.depth, tree.visible)
    paths = [()] + tree.paths
    for b in range(2):
        for i, p in enumerate(paths):
            nodes = [0] + [paths.index(p[:d]) for d in range(1, len(p) + 1)]
            seq = torch.cat([prompts[b, :lens[b]], toks[b, nodes]])[None]
            torch.testing.assert_close(head0[b, i], full_logits(model, seq)[0, 0, -1],
                                       rtol=1e-10, atol=1e-10)
    kept = torch.tensor([[0, 2, 6], [0, 1, 4]])  # sequence 0: path (1, 0); 1: path (0, 0)
    model.commit_path(caches, lens, kept)
    drafts = model.draft_forward(x[torch.arange(2)[:, None], kept], caches, lens)
    nxt = torch.randint(0, 48, (2, 1), generator=g)
    after = model.forward_cached(nxt, caches, 1, positions=lens + 3)[0, :, 0]
    for b in range(2):
        seq = torch.cat([prompts[b, :lens[b]], toks[b, kept[b]]])[None]
        want = full_logits(model, seq)[1:, 0, -3:]
        torch.testing.assert_close(drafts[:, b], want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(after[b], full_logits(model, torch.cat([seq, nxt[b:b + 1]], 1))[0, 0, -1],
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_tree_decoding_equals_greedy(which, request):
    """A tree of candidates per step: the tokens of greedy decoding, per sequence, in batches of
    prompts of different lengths with a stop token; more tokens per forward than the chain on
    the trained model, and candidates other than a head's top one accepted."""
    model = tiny(seed=3) if which == "untrained" else request.getfixturevalue("trained")
    lo, hi = (32, 127) if model.cfg.vocab_size == 256 else (0, model.cfg.vocab_size)
    g = torch.Generator().manual_seed(5)
    lens = [4, 9, 1]
    prompts = torch.randint(lo, hi, (3, 9), generator=g)
    alone = [model.generate(prompts[b:b + 1, :lens[b]], 30) for b in range(3)]
    stop = int(alone[0].tokens[0, lens[0] + 9])
    wide = [(r,) for r in range(12)] + [(0, 0), (0, 0, 0)]
    # siblings' children with the same token: (r, 0) for every r
    deep = [(r,) for r in range(8)] + [(r, 0) for r in range(8)] + [(r, 0, 0) for r in range(4)]
    for tree in (TREE, wide, deep):
        out = model.generate(prompts, 30, speculative=True, stop_token=stop,
                             prompt_lengths=lens, tree=tree)
        for b in range(3):
            want = alone[b].tokens[0, lens[b]:].tolist()
            if stop in want:
                want = want[:want.index(stop) + 1]
            got = out.tokens[b, lens[b]:lens[b] + out.new_tokens].tolist()
            assert got[:len(want)] == want and all(t == stop for t in got[len(want):]), (tree, b)
        one = model.generate(prompts[1:2], 30, speculative=True, tree=tree)
        assert torch.equal(one.tokens, alone[1].tokens)
    if which == "trained":
        chain = model.generate(prompts[1:2], 30, speculative=True, tree=[(0,), (0, 0), (0, 0, 0)])
        out = model.generate(prompts[1:2], 30, speculative=True, tree=wide)
        assert out.head_accepted[0] > chain.head_accepted[0] or out.forward_passes < chain.forward_passes
    else:  # an untrained model's top drafts are rarely right: the wide first level helps
        chain = model.generate(prompts, 30, speculative=True, tree=[(0,)])
        out = model.generate(prompts, 30, speculative=True, tree=wide)
        assert out.head_accepted[0] > chain.head_accepted[0]


def test_tree_acceptance_follows_the_kept_node():
    """DraftTree.accept keeps a child of the node kept so far: where siblings' children carry
    the same token, the child of the kept sibling, and it stops where no child matches."""
    from mtp_ext.decoding.generate import DraftTree
    tree = DraftTree([(0,), (1,), (0, 0), (1, 0), (1, 0, 0)], 4)
    assert [p for p in tree.paths] == [(0,), (1,), (0, 0), (1, 0), (1, 0, 0)]
    #                    root (0,) (1,) (0,0) (1,0) (1,0,0)
    toks = torch.tensor([[5,   7,   8,   9,    9,    4],
                         [5,   7,   8,   9,    9,    4],
                         [5,   7,   8,   9,    9,    4]])
    best = torch.tensor([[8,   1,   9,   1,    4,    2],    # root -> (1,) -> (1,0) -> (1,0,0)
                         [7,   9,   1,   4,    1,    1],    # root -> (0,) -> (0,0), then none
                         [3,   9,   9,   4,    4,    4]])   # nothing kept
    path, run, reached, kept = tree.accept(toks, best)
    assert run.tolist() == [3, 2, 0]
    assert path.tolist() == [[0, 2, 4, 5], [0, 1, 3, 3], [0, 0, 0, 0]]
    assert reached.tolist() == [3, 2, 2] and kept.tolist() == [2, 2, 1]


def test_draft_tree_errors():
    from mtp_ext.decoding.generate import DraftTree
    model = tiny()
    p = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"path \(0, 1\) lacks its prefix \(0,\)"):
        DraftTree([(1,), (0, 1)], 4)
    with pytest.raises(ValueError, match=r"path \(0, 0, 0, 0\) must have 1..3 ranks"):
        DraftTree([(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)], 4)
    with pytest.raises(ValueError, match="temperature 0.5"):
        model.generate(p, 5, speculative=True, temperature=0.5, tree=TREE)
    with pytest.raises(ValueError, match="speculative=True"):
        model.generate(p, 5, tree=TREE)
    with pytest.raises(ValueError, match="max_seq_len"):  # the tree's slots count
        model.generate(p, 96 - 4 - 6, speculative=True, tree=TREE)
    # the model's own tree gives way to the chain where it does not fit
    model.draft_tree = TREE
    near = model.generate(p, 96 - 4 - 6, speculative=True)
    assert torch.equal(near.tokens, model.generate(p, 96 - 4 - 6).tokens)


def test_calibrated_tree(trained):
    """calibrate_tree: the most frequent rank paths (at most `nodes`), prefixes included; the
    top drafts first on a model that drafts well; decoding with it gives greedy's tokens."""
    from mtp_ext.decoding.generate import calibrate_tree
    model = tiny(seed=3)
    prompts = torch.randint(0, 48, (3, 6), generator=torch.Generator().manual_seed(9))
    paths = calibrate_tree(model, prompts, nodes=10, new_tokens=40)
    assert len(paths) == 10 and len(set(paths)) == 10
    assert all(p[:-1] in paths for p in paths if len(p) > 1)
    assert torch.equal(model.generate(prompts, 30, speculative=True, tree=paths).tokens,
                       model.generate(prompts, 30).tokens)
    text = torch.tensor([list(b"def add(a, b):\n"), list(b"for i in range(")])
    paths = calibrate_tree(trained, text, nodes=10, new_tokens=30)
    assert paths[:3] == [(0,), (0, 0), (0, 0, 0)]
    assert torch.equal(trained.generate(text, 30, speculative=True, tree=paths).tokens,
                       trained.generate(text, 30).tokens)


def test_decoding_reads_no_uninitialized_memory(monkeypatch):
    """Attention of a batch reads cache slots past a shorter sequence's length, under a mask; a
    masked slot of garbage (nan) would still poison it (0 x nan). With every torch.empty full of
    nan, a batch of different lengths decodes as before."""
    model = tiny(seed=3)
    prompts = torch.randint(0, 48, (3, 9), generator=torch.Generator().manual_seed(5))
    lens = [4, 9, 1]
    want = [model.generate(prompts, 20, speculative=spec, prompt_lengths=lens).tokens
            for spec in (False, True)]
    empty, empty_like = torch.empty, torch.empty_like
    nan = lambda t: t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
    for spec, w in zip((False, True), want):
        assert torch.equal(model.generate(prompts, 20, speculative=spec, prompt_lengths=lens).tokens, w)


def test_packed_linears_and_bf16_drafts():
    """Cached decoding of an fp32 model on oneDNN's prepacked weights gives ATen's logits to
    fp32 rounding, and the packed product is the one that runs (counted); a changed weight is
    packed again. bf16 draft heads leave the output of greedy decoding unchanged."""
    from torch.profiler import profile
    from mtp_ext import switches
    from mtp_ext.decoding import packed_linear
    if not packed_linear.available():
        pytest.skip("torch without oneDNN")
    model = tiny(seed=4).float()
    model.draft_dtype = torch.float32
    x = torch.randint(0, 48, (2, 11), generator=torch.Generator().manual_seed(8))
    with profile() as prof, torch.no_grad():
        got = model.forward_cached(x, model.new_caches(2))
    calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert calls == 2 * 4 + 4 + 1  # 2 trunk layers and head 0 (4 each), all heads' logits
    want = full_logits(model, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with profile() as prof, torch.no_grad(), switches.forced(packed_decoding="off"):
        plain = model.forward_cached(x, model.new_caches(2))  # ATen's F.linear
    assert not any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages())
    torch.testing.assert_close(plain, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.trunk[0].mlp.down.weight.mul_(-2.0)
        again = model.forward_cached(x, model.new_caches(2))[0]
    torch.testing.assert_close(again, full_logits(model, x)[0], rtol=1e-4, atol=1e-4)
    model.draft_dtype = torch.bfloat16
    with torch.no_grad():
        drafts = model.forward_cached(x, model.new_caches(2))[1:]
    torch.testing.assert_close(drafts, full_logits(model, x)[1:], rtol=0.05, atol=0.05)
    prompt = x[:1, :5]
    greedy = model.generate(prompt, 40)
    for dt in (torch.bfloat16, torch.float32):
        model.draft_dtype = dt
        assert model.new_caches(1)[-1].k.dtype == dt
        for tree in (None, TREE):
            assert torch.equal(model.generate(prompt, 40, speculative=True, tree=tree).tokens,
                               greedy.tokens)
