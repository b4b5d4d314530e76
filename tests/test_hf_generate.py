"""MTPForCausalLM.generate takes transformers' generate arguments and returns what transformers
returns: the same sequences as the base model's own greedy `generate` (stop tokens, padding,
left-padded batches, a GenerationConfig), nucleus sampling that reduces to greedy, and a clear
error for what it does not support."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from mtp_ext.decoding.generate import _Sampler  # noqa: E402

from test_hf import V  # noqa: E402
from test_hf_mtp import make_mtp, prompts  # noqa: E402

FAMILIES = ["llama", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_the_base_models_generate(family):
    mtp = make_mtp(family).eval()
    ids = prompts(B=2, P=6)
    want = mtp.model.generate(ids, max_new_tokens=12, do_sample=False)
    for speculative in (True, False):
        got = mtp.generate(ids, max_new_tokens=12, do_sample=False, speculative=speculative)
        assert torch.is_tensor(got) and torch.equal(got, want)
    assert torch.equal(mtp.generate(ids, 12), want)  # the short form
    config = transformers.GenerationConfig(max_new_tokens=12, do_sample=False)
    assert torch.equal(mtp.generate(ids, config), want)
    out = mtp.generate(ids, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want) and out.tokens_per_forward >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_tokens_and_padding_as_transformers(family):
    mtp = make_mtp(family).eval()
    ids = prompts(B=3, P=5, seed=3)
    free = mtp.model.generate(ids, max_new_tokens=16, do_sample=False)
    stops = [int(free[0, 5 + 3]), int(free[2, 5 + 6])]  # rows 0 and 2 stop early
    for eos in (stops[0], stops):
        want = mtp.model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos,
                                  pad_token_id=V - 1)
        got = mtp.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos,
                           pad_token_id=V - 1)
        assert torch.equal(got, want), (eos, got, want)
    assert (got == V - 1).any()  # padding happened


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch(family):
    """Prompts of different lengths, left-padded with an attention mask as transformers pads
    for generation: each row equals the base model's greedy output for that row alone."""
    mtp = make_mtp(family).eval()
    ids = prompts(B=3, P=7, seed=5)
    lens = [7, 3, 5]
    mask = torch.zeros_like(ids)
    padded = torch.full_like(ids, V - 2)
    for b, L in enumerate(lens):
        mask[b, 7 - L:] = 1
        padded[b, 7 - L:] = ids[b, :L]
    got = mtp.generate(padded, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert got.shape == (3, 17)
    for b, L in enumerate(lens):
        alone = mtp.model.generate(ids[b:b + 1, :L], max_new_tokens=10, do_sample=False)
        assert torch.equal(got[b, :7], padded[b]) and torch.equal(got[b, 7:], alone[0, L:]), b
    with pytest.raises(ValueError, match="left padding"):
        mtp.generate(padded, attention_mask=mask.flip(1), max_new_tokens=4)


def test_sampling_arguments():
    mtp = make_mtp("llama").eval()
    ids = prompts(B=2, P=6)
    greedy = mtp.generate(ids, max_new_tokens=10, do_sample=False)
    # a nucleus of one token: sampling is greedy decoding
    assert torch.equal(mtp.generate(ids, max_new_tokens=10, do_sample=True, top_p=1e-6), greedy)
    draw = lambda seed: mtp.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5,
                                     top_k=8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_nucleus_filter():
    """top_p keeps the most likely tokens until their probability reaches top_p (the token
    that crosses it included), renormalized; top_p = 1 keeps everything."""
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    p = _Sampler(1.0, None, None, top_p=0.7).probs(logits)
    torch.testing.assert_close(p[0], torch.tensor([0.0, 0.5, 0.3, 0.0]) / 0.8)
    assert int((p[1] > 0).sum()) == 3
    torch.testing.assert_close(_Sampler(1.0, None, None).probs(logits), logits.exp())


def test_unsupported_arguments_are_named():
    mtp = make_mtp("llama").eval()
    ids = prompts(B=1, P=4)
    for kwargs, name in [({"num_beams": 3}, "num_beams=3"), ({"repetition_penalty": 1.2},
                         "repetition_penalty=1.2"), ({"streamer": object()}, "streamer"),
                         ({"stop_token": 3}, "stop_token")]:
        with pytest.raises(ValueError, match=f"{name}.* not supported"):
            mtp.generate(ids, max_new_tokens=4, **kwargs)
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        mtp.generate(ids, transformers.GenerationConfig(max_new_tokens=4, do_sample=True,
                                                        num_return_sequences=2))
    with pytest.raises(ValueError, match="input_ids must be a"):
        mtp.generate(None, max_new_tokens=4)
