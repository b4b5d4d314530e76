"""Heads-only training against joint training on the same model: step time and peak memory.

    python bench/bench_heads_only.py [--steps 5] [--batch 8] [--seq-len 256]

Models: the Hugging Face example's Llama (mtp_ext.hf.finetune.small_llama: vocab 256, hidden
256, 4 layers) with MTPForCausalLM(n_future=4), and a Mellum of the same width (2 layers, 4
experts) with its own MTP layer (NativeMTPForCausalLM). Each trained jointly and with
freeze_base: AdamW on the parameters that require gradients, forward + backward + step.
- time: the median of --steps steps after a warm-up, the two modes interleaved step by step in
  one process;
- peak memory: the rise of the peak resident set over one warm step (optimizer state
  included, created in the warm-up), in a fresh process per model and mode.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def build(model_name: str, frozen: bool):
    import transformers
    from mtp_ext import hf
    from mtp_ext.hf.finetune import small_llama
    torch.manual_seed(0)
    if model_name == "llama":
        mtp = hf.MTPForCausalLM.from_causal_lm(small_llama(), n_future=4, freeze_base=frozen)
        vocab = 256
    else:
        cfg = transformers.MellumConfig(
            vocab_size=256, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2, sliding_window=128,
            layer_types=["sliding_attention", "full_attention"], num_mtp_layers=1,
            mtp_layer_types=["sliding_attention"], max_position_embeddings=1024)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        mtp = hf.NativeMTPForCausalLM.from_causal_lm(model, freeze_base=frozen)
        vocab = 256
    mtp.train()
    opt = torch.optim.AdamW([p for p in mtp.parameters() if p.requires_grad], lr=1e-4)
    return mtp, opt, vocab


def make_step(model_name, frozen, batch, seq_len):
    mtp, opt, vocab = build(model_name, frozen)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)

    def step():
        out = mtp(input_ids=ids, labels=ids)
        opt.zero_grad(set_to_none=False)
        out.loss.backward()
        opt.step()
    return step, mtp


def peak(model_name, frozen, batch, seq_len) -> int:
    from mtp_ext.benchmark import _release_free_memory, _reset_peak_rss, _rss_now_and_peak
    step, _ = make_step(model_name, frozen, batch, seq_len)
    step()  # warm: gradients and optimizer state allocated
    _release_free_memory()
    _reset_peak_rss()
    before = _rss_now_and_peak()[0]
    step()
    return _rss_now_and_peak()[1] - before


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--peak", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.peak:
        print(json.dumps(peak(a.peak[0], a.peak[1] == "frozen", a.batch, a.seq_len)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch} x "
          f"{a.seq_len} tokens")
    print("| model | mode | trainable params | step s (median) | peak MiB above resident |")
    print("|---|---|---:|---:|---:|")
    for model_name in ("llama", "mellum"):
        steps, counts = {}, {}
        for mode in ("joint", "frozen"):
            steps[mode], mtp = make_step(model_name, mode == "frozen", a.batch, a.seq_len)
            counts[mode] = sum(p.numel() for p in mtp.parameters() if p.requires_grad)
            steps[mode]()  # warm-up
        times = {m: [] for m in steps}
        for _ in range(a.steps):
            for m, step in steps.items():
                t = time.perf_counter()
                step()
                times[m].append(time.perf_counter() - t)
        steps.clear()
        for mode in ("joint", "frozen"):
            out = subprocess.run([sys.executable, __file__, "--peak", model_name, mode,
                                  "--batch", str(a.batch), "--seq-len", str(a.seq_len)],
                                 check=True, capture_output=True, text=True).stdout
            mib = json.loads(out.strip().splitlines()[-1]) / 2**20
            print(f"| {model_name} | {mode} | {counts[mode]:,} | "
                  f"{statistics.median(times[mode]):.3f} | {mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
