"""The cost model of greedy speculative decoding (mtp_ext.decoding.cost_model) and planned
decoding: acceptance statistics, expected tokens, step times, the choice, and outputs equal to
greedy decoding whatever is chosen."""
import itertools

import pytest
import torch

from mtp_ext.decoding import cost_model as C
from mtp_ext.decoding import generate as G
from mtp_ext.training import train as T

from test_generate import full_logits, tiny, trained  # noqa: F401 (the fixture)


class Fixed(C.Plan):
    """A plan whose choice per batch size is given: pick(B) -> paths (None: plain)."""

    def __init__(self, pick, n):
        super().__init__([[(0,) * (n - 1)]], C.StepTimes({1: 1.0}, {1: {2: 1.0}}), n, 1)
        self.pick = pick

    def choose(self, B):
        p = self.pick(B)
        return C.Choice("plain" if p is None else f"tree of {len(p)}", p, 1.0, 1.0)


def test_shares_count_each_prefix():
    g = torch.Generator().manual_seed(0)
    stats = C.draft_statistics([torch.randint(0, 3, (int(N), 3), generator=g) for N in (17, 9)])
    rows = [row for text in stats for row in text]
    got = C.shares(stats, top=1000)
    for p in itertools.chain.from_iterable(itertools.product(range(3), repeat=d)
                                           for d in (1, 2, 3)):
        want = sum(row[:len(p)] == p for row in rows) / len(rows)
        assert got.get(p, 0.0) == pytest.approx(want)
    order = C.ordered_paths(stats, top=1000)
    for m in range(1, len(order) + 1):  # every prefix of the order is a prefix-closed tree
        G.DraftTree(order[:m], 4)
    assert [got[p] for p in order] == sorted(got.values(), reverse=True)


def test_tokens_per_step_replays_the_steps():
    """An easy stretch (every draft right) then a hard one: the steps of the easy stretch make
    4 tokens, those of the hard one 1; not the mean over positions."""
    chain = [(0,), (0, 0), (0, 0, 0)]
    text = [(0, 0, 0)] * 40 + [(5, 5, 5)] * 10
    assert C.tokens_per_step(chain, text) == pytest.approx(50 / (10 + 10))
    assert C.tokens_per_step(chain[:1], text) == pytest.approx(50 / (20 + 10))
    assert C.tokens_per_step([(5,)], text) == pytest.approx(50 / (40 + 5))


def test_expected_tokens_is_the_slowest_of_a_batch():
    g = torch.Generator().manual_seed(1)
    stats = [[tuple(r) for r in torch.randint(0, 2, (30, 3), generator=g).tolist()]
             for _ in range(5)]
    tree = [(0,), (0, 0), (1,)]
    per_text = [C.tokens_per_step(tree, t) for t in stats]
    P = len(per_text)
    assert len(set(per_text)) > 1
    # every text as long: all tokens over all steps
    assert C.expected_tokens(tree, stats) == pytest.approx(P / sum(1 / e for e in per_text))
    for B in (2, 3):  # over every batch of B texts drawn with replacement: its slowest's steps
        steps = sum(max(1 / e for e in c) for c in itertools.product(per_text, repeat=B))
        assert C.expected_tokens(tree, stats, B) == pytest.approx(P ** B / steps)
    assert C.expected_tokens([(3,)], stats) == 1.0  # a path never seen adds nothing


def test_step_times_interpolate():
    t = C.StepTimes({1: 1.0, 4: 4.0}, {1: {2: 2.0, 6: 6.0}, 4: {2: 8.0, 6: 16.0}},
                    {1: {1: 0.5, 4: 2.0}, 4: {1: 1.0, 4: 4.0}})
    assert t.plain_time(2) == pytest.approx(2.0) and t.plain_time(9) == 4.0
    assert t.tree_time(4, 1) == pytest.approx(4.0)          # halfway between K = 2 and 6
    assert t.tree_time(12, 1) == pytest.approx(12.0)        # the line past the largest K
    assert t.tree_time(4, 4, kept=2.5) == pytest.approx(12.0 + 1.5)  # + draft(2.5) - draft(1)
    again = C.StepTimes(**t.to_dict())
    assert again.tree_time(5, 3, 3.0) == t.tree_time(5, 3, 3.0)


def test_step_times_in_tokens_verified_are_a_least_squares_line():
    """A noisy grid point (K = 33 timed above K = 49) does not make the bigger tree cheaper:
    the times in K are the least-squares line through the points, never falling."""
    pts = {2: 5.0, 9: 5.5, 25: 7.5, 33: 10.2, 49: 9.7}
    t = C.StepTimes({1: 2.8}, {1: pts})
    xs = list(pts)
    mx, my = sum(xs) / 5, sum(pts.values()) / 5
    b = sum((k - mx) * (pts[k] - my) for k in xs) / sum((k - mx) ** 2 for k in xs)
    for K in (2, 13, 33, 49, 60):
        assert t.tree_time(K, 1) == pytest.approx(my + b * (K - mx))
    assert t.tree_time(33, 1) < t.tree_time(49, 1)
    falling = C.StepTimes({1: 1.0}, {1: {2: 3.0, 8: 2.0}})  # slope clamped at 0: the mean
    assert t.tree_time(2, 1) < t.tree_time(3, 1) and falling.tree_time(50, 1) == pytest.approx(2.5)


def test_the_choice_follows_the_costs():
    stats = [[(0, 0, 0)] * 4 + [(0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 0, 0)] * 2]
    flat = C.StepTimes({1: 1.0}, {1: {2: 1.0, 50: 1.0}})           # a step reads weights
    plan = C.Plan(stats, flat, 4, 8)
    best = plan.choose(1)  # equal step times: the most tokens per step
    assert best.paths is not None and best.tokens == max(o.tokens for o in plan.options(1)) > 2
    costly = C.StepTimes({1: 1.0}, {1: {2: 3.0, 5: 9.0}})          # a step is bound by rows
    assert C.Plan(stats, costly, 4, 8).choose(1).name == "plain"
    # a drafting choice beats plain only by the margin
    e = C.expected_tokens([(0,)], stats)
    near = C.StepTimes({1: 1.0}, {1: {2: e / 1.04, 5: 100.0}})
    assert C.Plan(stats, near, 4, 8).choose(1).name == "plain"
    assert C.Plan(stats, near, 4, 8, margin=1.0).choose(1).name == "tree of 1"
    assert "plain" in plan.why(1) and "tok/s" in plan.why(1)


def test_step_times_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_EXT_CACHE_DIR", str(tmp_path))
    model = tiny(seed=5).float()
    paths = [(0,), (0, 0), (1,), (0, 0, 0)]
    t, secs = C.step_times(model, 2, paths, 4)
    assert secs > 0 and (tmp_path / "step_times.json").exists()
    assert set(t.plain) == {1, 2} and all(set(k) == {2, 4, 5} for k in t.tree.values())
    assert all(v > 0 for v in t.plain.values())
    model.__dict__.pop("_step_times")
    again, secs = C.step_times(model, 2, paths, 4)
    assert secs == 0.0 and again.to_dict() == t.to_dict()
    assert C.step_times(model, 2, paths, 4, refresh=True)[1] > 0


def _greedy_alone(model, prompts, lens, new):
    return [model.generate(prompts[b:b + 1, :lens[b]], new, plan=False) for b in range(len(lens))]


@pytest.mark.parametrize("schedule", ["plain", "chain", "tree of 1", "tree", "tree then plain",
                                      "plain then tree"])
def test_planned_decoding_equals_greedy(trained, schedule):  # noqa: F811
    """Whatever is chosen per batch size, and as the choice changes when sequences leave
    (prompts of different lengths, a stop token), the tokens are those of greedy decoding."""
    model, n = trained, trained.cfg.n_future
    order = C.ordered_paths(model.draft_stats)
    chain = tuple((0,) * d for d in range(1, n))
    tree = tuple(order[:6])
    pick = {"plain": lambda B: None, "chain": lambda B: chain, "tree of 1": lambda B: order[:1],
            "tree": lambda B: tree, "tree then plain": lambda B: tree if B > 2 else None,
            "plain then tree": lambda B: None if B > 2 else tree}[schedule]
    g = torch.Generator().manual_seed(7)
    lens = [5, 9, 7, 3]
    prompts = torch.randint(32, 127, (4, 9), generator=g)
    prompts[:, :5] = torch.tensor(list(b"def a"))
    alone = _greedy_alone(model, prompts, lens, 24)
    stop = int(alone[2].tokens[0, lens[2] + 6])  # sequence 2 stops by its 7th token
    stopped = [a.tokens[0, lens[b]:].tolist() for b, a in enumerate(alone)]
    stopped = [w[:w.index(stop) + 1] if stop in w else w for w in stopped]
    for batch in (1, 4):
        out = model.generate(prompts[:batch], 24, speculative=True, stop_token=stop,
                             prompt_lengths=lens[:batch], plan=Fixed(pick, n))
        for b in range(batch):
            got = out.tokens[b, lens[b]:lens[b] + out.new_tokens].tolist()
            assert got[:len(stopped[b])] == stopped[b], (schedule, batch, b)
        assert sum(k for _, _, k in out.plan.runs) == out.forward_passes - 1
        assert [B for B, _, _ in out.plan.runs] == sorted((B for B, _, _ in out.plan.runs),
                                                          reverse=True)
    if schedule == "plain then tree":  # the change happened after sequences left
        assert [name for _, name, _ in out.plan.runs][0] == "plain"
        assert out.plan.runs[-1][1] == f"tree of {len(tree)}"


def test_plain_for_good_where_no_sequence_can_leave_early(trained, monkeypatch):  # noqa: F811
    """Plain steps at a batch size whose smaller sizes would draft, but without a stop token
    and with every sequence at the same count: they all end together, so the prefill and the
    steps run head 0 alone (no trunk outputs kept for a catch-up that cannot come, no draft
    logits for drafts that cannot come) and give greedy's tokens."""
    model, n = trained, trained.cfg.n_future
    order = C.ordered_paths(model.draft_stats)
    kept = []
    trunk_step = G._trunk_step
    monkeypatch.setattr(G, "_trunk_step", lambda s: kept.append(1) or trunk_step(s))
    g = torch.Generator().manual_seed(8)
    lens = [5, 9, 7]
    prompts = torch.randint(32, 127, (3, 9), generator=g)
    alone = _greedy_alone(model, prompts, lens, 16)
    heads = []
    forward_cached = model.forward_cached
    monkeypatch.setattr(model, "forward_cached",
                        lambda ids, caches, h=None, **kw: heads.append(h) or
                        forward_cached(ids, caches, h, **kw))
    out = model.generate(prompts, 16, speculative=True, prompt_lengths=lens,
                         plan=Fixed(lambda B: None if B > 1 else tuple(order[:6]), n))
    for b in range(3):
        assert out.tokens[b, lens[b]:lens[b] + 16].tolist() == alone[b].tokens[0, lens[b]:].tolist()
    assert [(B, name) for B, name, _ in out.plan.runs] == [(3, "plain")] and not kept
    assert heads == [1] * out.forward_passes  # the prefill too: no draft head runs at all
    monkeypatch.setattr(model, "forward_cached", forward_cached)
    stop = int(alone[0].tokens[0, lens[0] + 3])  # a stop token: sequences may leave, trunk kept
    model.generate(prompts, 16, speculative=True, prompt_lengths=lens, stop_token=stop,
                   plan=Fixed(lambda B: None if B > 1 else tuple(order[:6]), n))
    assert kept


def test_draft_heads_catch_up_after_plain_steps():
    """After plain steps (which run the trunk and head 0 alone), the draft heads run on the
    trunk's outputs they missed: their logits and caches are those of a full forward."""
    model = tiny(seed=2)
    n = model.cfg.n_future
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 48, (2, 6), generator=g)
    s = G._Decoding(model, ids, 20, n, None, G._Sampler(0.0, None, None))
    with torch.no_grad():
        G._prefill(s, ids, torch.tensor([6, 4]))
        s.last = s.last[1:]
        for _ in range(3):
            G._trunk_step(s)
        plan = Fixed(lambda B: ((0,), (0, 0), (0, 0, 0)), n)
        steps = G._PlannedSteps(plan, n, ids.device, G.PlanRecord())
        s.last = model.draft_forward(s.trunk, s.caches, s.pos - s.trunk.shape[1])[:, :, -1]
        s.trunk = None
        made = s.gen[:, :3]
        for b, L in enumerate((6, 4)):
            seq = torch.cat([ids[b, :L], made[b]])[None]
            want = full_logits(model, seq)[1:, 0, -1]
            torch.testing.assert_close(s.last[:, b], want, rtol=1e-10, atol=1e-10)
        steps(s)  # a tree step on the caught-up caches: its drafts are the full forward's
        assert s.trunk is None


def test_expected_tokens_predict_decoding(trained):  # noqa: F811
    """The calibrated expectation of tokens per step against what decoding the calibration
    prompts makes, with the tree forced."""
    model = trained
    prompts = torch.tensor([list(b"def add(a, b):\n"), list(b"for i in range(")])
    stats = G.calibrate_draft(model, prompts, new_tokens=40)
    for m in (1, 4):
        paths = tuple(C.ordered_paths(stats)[:m])
        made = steps = 0
        for p in prompts:
            out = model.generate(p[None], 40, speculative=True, plan=Fixed(lambda B: paths, 4))
            made, steps = made + out.new_tokens - 1, steps + out.forward_passes - 1
        assert made / steps == pytest.approx(C.expected_tokens(paths, stats), rel=0.1)


def test_draft_stats_round_trip_a_checkpoint(trained, tmp_path):  # noqa: F811
    import copy
    model = copy.deepcopy(trained).float()
    opt = torch.optim.AdamW(model.parameters())
    T.save_checkpoint(tmp_path / "c.pt", model, opt, 1, T.TrainArgs(), torch.Generator(),
                      draft_stats=trained.draft_stats)
    loaded, _ = T.load_model(str(tmp_path / "c.pt"))
    assert loaded.draft_stats == trained.draft_stats
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    ckpt["draft_stats"] = [[[0, -1, 0]]]
    with pytest.raises(ValueError, match="draft_stats"):
        T.load_model("bad.pt", ckpt)


def test_plan_errors(trained):  # noqa: F811
    p = torch.tensor([list(b"def ")])
    with pytest.raises(ValueError, match="plan must be"):
        trained.generate(p, 4, speculative=True, plan="auto")
    with pytest.raises(ValueError, match="plan: planned decoding"):
        trained.generate(p, 4, speculative=True, temperature=1.0, plan=True)
    with pytest.raises(ValueError, match="plan: planned decoding"):
        trained.generate(p, 4, plan=True)
    with pytest.raises(ValueError, match="draft_stats"):
        tiny().generate(torch.tensor([[1, 2]]), 4, speculative=True, plan=True)
    with pytest.raises(ValueError, match="draft_stats must"):
        C.check_stats([[(0, 1)]], 4)
    out = trained.generate(p, 8, speculative=True)  # planned by default: the record says so
    assert out.plan is not None and out.plan.why and out.plan.expected_tokens_per_second > 0


def test_step_times_of_a_short_context(tmp_path, monkeypatch):
    """A model whose max_seq_len holds a few steps only: timing starts new prompts as it needs."""
    monkeypatch.setenv("MTP_EXT_CACHE_DIR", str(tmp_path))
    model = tiny(seed=6, max_seq_len=24).float()
    t, _ = C.step_times(model, 1, [(0,), (0, 0), (0, 0, 0), (1,)], C.timing_room(model))
    assert set(t.tree[1]) == {2, 4, 5} and all(v > 0 for v in t.tree[1].values())
