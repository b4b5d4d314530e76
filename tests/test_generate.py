"""KV cache, greedy and self-speculative decoding."""
import copy

import pytest
import torch

from mtp_ext.model import MTPConfig, MTPTransformer
from mtp_ext.train import TrainArgs, load_model, train


def tiny(seed=0, **kw):
    cfg = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=2, n_future=4, max_seq_len=96)
    cfg.update(kw)
    torch.manual_seed(seed)
    return MTPTransformer(MTPConfig(**cfg)).double().eval()


def full_logits(model, x):
    xs, cos, sin = model.trunk_forward(x)
    return torch.stack([model.head_logits(k, model.head_forward(k, xs, cos, sin))
                        for k in range(model.cfg.n_future)])


def test_kv_cache_gives_the_logits_of_a_full_forward():
    model = tiny()
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
    spec = trained.generate(prompt, 24, speculative=True)
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
    with pytest.raises(ValueError, match="greedy"):
        model.generate(p, 5, speculative=True, temperature=1.0)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(4, dtype=torch.long), 5)


def test_cli_generate(trained, tmp_path, capsys):
    from mtp_ext.cli import main as cli_main
    ckpt = tmp_path / "ckpt.pt"
    from mtp_ext.train import TrainArgs
    import mtp_ext.train as T
    model = copy.deepcopy(trained).float()  # the fixture is shared: leave it in float64
    opt = torch.optim.AdamW(model.parameters())
    T.save_checkpoint(ckpt, model, opt, 1, TrainArgs(), torch.Generator())
    assert cli_main(["generate", "--checkpoint", str(ckpt), "--prompt", "def add(",
                     "--max-new-tokens", "12", "--speculative"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def add(")
    assert "tokens/forward" in out.err and "acceptance" in out.err
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
