"""`python -m mtp_ext.hf.finetune`: a small Llama (built from a config in code, random weights,
nothing downloaded) made an MTP model with MTPForCausalLM.from_causal_lm and trained with Hugging
Face's Trainer on the project's corpus (`mtp-ext train`'s: the Python standard library's sources,
bytes as tokens). Prints each head's validation loss before and after, and the speculative
decoding of a prompt; --out saves the model (MTPForCausalLM.save_pretrained).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from typing import List, Optional

import torch
import transformers

from ..training.data import eval_batches, load_corpus
from .mtp_model import MTPForCausalLM


class _Windows(torch.utils.data.Dataset):
    """`count` random windows of seq_len bytes (fixed by the seed): input_ids and labels."""

    def __init__(self, data: torch.Tensor, count: int, seq_len: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.data, self.seq_len = data, seq_len
        self.starts = torch.randint(0, data.numel() - seq_len, (count,), generator=gen).tolist()

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        x = self.data[self.starts[i]:self.starts[i] + self.seq_len].long()
        return {"input_ids": x, "labels": x}


@torch.no_grad()
def head_losses(mtp: MTPForCausalLM, batches) -> List[float]:
    """Each head's validation loss, weighted by its labelled positions."""
    was_training = mtp.training
    mtp.eval()
    loss_sum = torch.zeros(mtp.n_future, dtype=torch.float64)
    tokens = torch.zeros(mtp.n_future, dtype=torch.float64)
    for x in batches:
        out = mtp(input_ids=x, labels=x)
        loss_sum += out.head_losses.double() * out.head_tokens
        tokens += out.head_tokens
    mtp.train(was_training)
    return (loss_sum / tokens).tolist()


def small_llama(vocab_size: int = 256, hidden: int = 256, layers: int = 4, heads: int = 4,
                max_len: int = 1024) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden,
                                      intermediate_size=hidden * 8 // 3 // 64 * 64 or hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=heads, max_position_embeddings=max_len,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def run(n_future: int = 4, steps: int = 300, batch: int = 8, seq_len: int = 256,
        hidden: int = 256, layers: int = 4, lr: float = 3e-3, seed: int = 0, bf16: bool = False,
        checkpointing: bool = False, freeze_base: bool = False,
        val_batches: int = 8, out: Optional[str] = None, data: Optional[str] = None,
        prompt: str = "    def __init__(self", new_tokens: int = 64, log=print) -> dict:
    torch.manual_seed(seed)
    train_data, val_data, what = load_corpus(data)
    log(f"corpus: {what}")
    mtp = MTPForCausalLM.from_causal_lm(small_llama(hidden=hidden, layers=layers), n_future,
                                        freeze_base=freeze_base)
    val = eval_batches(val_data, val_batches, batch, seq_len)
    before = head_losses(mtp, val)
    scratch = tempfile.TemporaryDirectory()  # Trainer's output_dir when nothing is saved
    args = transformers.TrainingArguments(
        output_dir=out or scratch.name, max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=min(30, steps // 10),
        adam_beta2=0.95, weight_decay=0.1, logging_steps=max(1, steps // 10),
        save_strategy="no", report_to=[], bf16=bf16, activation_checkpointing=checkpointing, use_cpu=not torch.cuda.is_available(), seed=seed, dataloader_num_workers=0,
        disable_tqdm=True)
    dataset = _Windows(train_data, steps * batch, seq_len, seed)
    trainer = transformers.Trainer(model=mtp, args=args, train_dataset=dataset)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    scratch.cleanup()
    after = head_losses(mtp, val)
    for k, (b, a) in enumerate(zip(before, after)):
        log(f"head {k} (token t+{k + 1}): validation loss {b:.3f} -> {a:.3f}")
    ids = torch.tensor([list(prompt.encode())], device=mtp.device)
    gen = mtp.generate(ids, max_new_tokens=new_tokens, return_dict_in_generate=True)
    text = bytes(gen.tokens[0, ids.shape[1]:].tolist()).decode("utf-8", "replace")
    log(f"trained {steps} steps in {seconds:.1f} s; speculative decoding of {prompt!r}: "
        f"{gen.tokens_per_forward:.2f} tokens per forward, {text!r}")
    if out:
        mtp.save_pretrained(out)
        log(f"saved to {out} (MTPForCausalLM.from_pretrained)")
    return {"before": before, "after": after, "seconds": seconds,
            "tokens_per_forward": gen.tokens_per_forward, "model": mtp}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mtp_ext.hf.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-future", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="Trainer's bf16 mixed precision")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--freeze-base", action="store_true",
                   help="heads-only: the base model frozen, heads 1..n-1 train")
    p.add_argument("--data", help="a folder of text files (default: the standard library)")
    p.add_argument("--out", help="save the trained model here")
    a = p.parse_args(argv)
    run(n_future=a.n_future, steps=a.steps, batch=a.batch, seq_len=a.seq_len, hidden=a.hidden,
        layers=a.layers, lr=a.lr, seed=a.seed, bf16=a.bf16, checkpointing=a.checkpointing,
        freeze_base=a.freeze_base, data=a.data, out=a.out)


if __name__ == "__main__":
    main()
