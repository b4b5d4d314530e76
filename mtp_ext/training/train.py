"""`mtp-ext train`: trains the reference MTP model with the fused loss, in one process or as
a rank of torchrun, checkpointing as it goes (run_dir) and stopping cleanly on SIGTERM/SIGINT.
The corpus and batches: data.py."""
from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from . import distributed as mdist
from . import tokenizer as tokenizers
from . import run_dir
from .checkpoint import read_checkpoint, write_checkpoint
from .data import eval_batches, load_corpus, load_corpus_files, sample_batch  # noqa: F401
from ..decoding.cost_model import check_stats, ordered_paths
from ..decoding.generate import DRAFT_TREE_NODES, calibrate_draft
from ..model import LOSS_IMPLS, MTPConfig, MTPTransformer
from .stop_signal import StopRequest

CHECKPOINT = run_dir.FINAL
DTYPES = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively: a CUDA device with bf16 support, or a CPU with
    AVX512-BF16 or AMX-BF16. Measured on an AMD EPYC with AVX512-BF16 (`mtp-ext train` with its
    defaults): bf16 autocast trained 2.1x faster than fp32 (82 s against 171 s) with every head's
    validation loss within 0.5% of fp32's (docs/model.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from .._cpu_check import cpu_flags
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@torch.no_grad()
def evaluate(model: MTPTransformer, batches, loss_impl: str = "fused",
             amp=contextlib.nullcontext):
    """Per-head validation loss and top-1 accuracy, weighted by each head's tokens; the forward
    under amp() (the training's autocast)."""
    model.eval()
    n = mdist.unwrap(model).cfg.n_future
    loss_sum, correct, tokens = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for x in batches:
        with amp():
            out = model(x, x, loss_impl=loss_impl, return_logits=False).loss
        t = out.head_tokens.double()
        loss_sum += out.head_losses.double() * t
        correct += out.head_accuracy.double() * t
        tokens += t
    model.train()
    return (loss_sum / tokens).tolist(), (correct / tokens).tolist()


# ---- progress ----

class Progress:
    """One status line, redrawn in place on a terminal, printed every ~10% otherwise."""

    def __init__(self, total: int, stream=None):
        stream = sys.stderr if stream is None else stream  # today's stderr, not import time's
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.last_print = -1

    def update(self, step: int, text: str):
        frac = step / max(self.total, 1)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        line = f"[{bar}] {step}/{self.total} {text}"
        if self.tty:
            self.stream.write("\r" + line[:200] + "\x1b[K")
            self.stream.flush()
        elif step == self.total or step == 1 or int(10 * frac) > self.last_print:
            self.last_print = int(10 * frac)
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")


# ---- training ----

@dataclass
class TrainArgs:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 30
    seed: int = 0
    data: Optional[str] = None
    out: str = "runs/mtp"
    loss_impl: str = "fused"
    eval_every: int = 100
    eval_batches: int = 8
    resume: bool = False
    overwrite: bool = False  # replace an existing OUT/checkpoint.pt (else: refuse, or --resume)
    d_model: int = 256
    layers: int = 4
    attn_heads: int = 4
    n_future: int = 4
    # "parallel" heads, or DeepSeek-V3's "sequential" MTP modules (mtp_ext.model.MTPModule)
    head_style: str = "parallel"
    # the loss's weight per head (None: all 1); DeepSeek-V3: 1, then lambda / (n - 1) each
    head_weights: Optional[Tuple[float, ...]] = None
    threads: Optional[int] = None
    # "bf16": the forward under bf16 autocast (fp32 weights and optimizer); "auto": bf16 where the
    # device computes bf16 natively (native_bf16), else fp32
    dtype: str = "auto"
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    tokenizer: str = "byte"  # or "bpe": a byte-level BPE of vocab_size trained on the training split
    vocab_size: int = 8192
    device: str = "auto"  # "cpu", "cuda" (this rank's GPU) or "auto": CUDA where present
    # a checkpoint every N steps ("200"), every M minutes of training ("5min"), or never ("0"),
    # besides the last step's; the newest `keep` of them are kept (mtp_ext.training.run_dir)
    save_every: str = "5min"
    keep: int = 2
    # heads-only training: the model (weights, shape, tokenizer) of a trained checkpoint, its
    # base frozen (MTPTransformer.freeze_base); heads 1..n-1 train with a new optimizer
    init_from: Optional[str] = None
    freeze_base: bool = False


# What a resumed run must share with the checkpoint's run: the model, the data and the batches.
# The rest (steps, learning rate, evaluation, device, dtype, threads, ...) may change on resume.
RESUME_MUST_MATCH = ("d_model", "layers", "attn_heads", "n_future", "seq_len", "batch_size",
                     "seed", "data", "tokenizer", "vocab_size", "freeze_base", "head_style")
SHAPE_ARGS = {"d_model": "d_model", "layers": "n_layers", "attn_heads": "n_heads"}
# TrainArgs field -> MTPConfig field, taken from --init-from's model


def with_heads(model: MTPTransformer, n_future: int, head_style: Optional[str] = None,
               head_weights=None) -> MTPTransformer:
    """model with n_future heads of head_style (default: the model's): its first ones where the
    style is the same (else head 0 only), any more as copies of its head 0 (the layer that
    predicts the next token; a new MTP module gets it as its block, and new input layers),
    everything else shared as it is. head_weights: the new model's (None: the model's own when
    n_future is its number of heads, else all 1)."""
    style = head_style or model.cfg.head_style
    if head_weights is None and n_future == model.cfg.n_future:
        head_weights = model.cfg.head_weights
    if n_future == model.cfg.n_future and style == model.cfg.head_style \
            and head_weights == model.cfg.head_weights:
        return model
    if model.cfg.per_head_unembedding:
        raise ValueError("--n-future: a model with a per-head unembedding keeps its heads")
    from dataclasses import replace
    grown = MTPTransformer(replace(model.cfg, n_future=n_future, head_style=style,
                                   head_weights=head_weights))
    keep = model.cfg.n_future if style == model.cfg.head_style else 1
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    for k in range(n_future):
        if k < keep:
            src, prefix = model.heads[k], f"heads.{k}."
        else:
            src, prefix = model.heads[0], f"heads.{k}." + ("block." if k and grown.sequential else "")
            state.update({f"heads.{k}.{name}": v for name, v in grown.heads[k].state_dict().items()
                          if not name.startswith("block.")} if k and grown.sequential else {})
        state.update({prefix + name: v for name, v in src.state_dict().items()})
    grown.load_state_dict(state)
    return grown


def parse_save_every(text: str) -> Tuple[str, float]:
    """--save-every: ("steps", N), ("minutes", M) or ("never", 0)."""
    t = str(text).strip().lower()
    try:
        if t.endswith("min"):
            value, unit = float(t[:-3]), "minutes"
        else:
            value, unit = int(t), "steps"
    except ValueError:
        value = -1
    if not value >= 0:
        raise ValueError(f"--save-every must be a number of steps (e.g. 200), of minutes (e.g. "
                         f"5min) or 0 (only the last step), got {text!r}")
    return ("never", 0) if value == 0 else (unit, value)


def lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_state(model, opt, step: int, args: TrainArgs, gen: torch.Generator,
                     ctx: mdist.DistContext = mdist.DistContext(), draft_tree=None,
                     tokenizer=None, progress=None, draft_stats=None) -> Optional[dict]:
    """Everything an exact resume needs: the whole model and optimizer state, gathered from
    every rank (a collective under FSDP), the step (which gives the learning rate, lr_at), the
    batch sampler's RNG, the tokenizer and the settings; on rank 0 (None elsewhere). The same
    format with or without torchrun: either can resume the other."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, opt_state = get_state_dict(model, opt, options=_state_options())
    if not ctx.is_main:
        return None
    return {"model": model_state, "config": mdist.unwrap(model).cfg.to_dict(),
            "optimizer": opt_state, "step": step, "args": vars(args), "data_rng": gen.get_state(),
            "draft_tree": draft_tree, "tokenizer": tokenizer, "progress": progress,
            "draft_stats": (None if draft_stats is None else
                            [[list(row) for row in text] for text in draft_stats])}


def save_checkpoint(path: Path, model, opt, step: int, args: TrainArgs, gen: torch.Generator,
                    ctx: mdist.DistContext = mdist.DistContext(), **extra):
    """checkpoint_state written to path by rank 0 (a collective: every rank calls it)."""
    ckpt = checkpoint_state(model, opt, step, args, gen, ctx, **extra)
    if ckpt is not None:
        write_checkpoint(path, ckpt)


def load_model(path: str, ckpt: Optional[dict] = None) -> Tuple[MTPTransformer, dict]:
    """The model of a checkpoint written by `mtp-ext train` (read with torch's safe loader:
    mtp_ext.training.checkpoint), and the checkpoint dict; ckpt: that dict, already read from path."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    try:
        model = MTPTransformer(MTPConfig.from_dict(dict(ckpt["config"])))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path!r}: its model does not load ({type(e).__name__}: "
                         f"{e})") from None
    tree = ckpt.get("draft_tree")
    if tree is not None and not (isinstance(tree, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and all(isinstance(r, int) and r >= 0 for r in p)
            for p in tree)):
        raise ValueError(f"checkpoint {path!r}: draft_tree is not a list of rank paths")
    model.draft_tree = [tuple(p) for p in tree] if tree is not None else None
    stats = ckpt.get("draft_stats")
    try:
        model.draft_stats = (None if stats is None else
                             check_stats(stats, model.cfg.n_future, "draft_stats"))
    except ValueError as e:
        raise ValueError(f"checkpoint {path!r}: {e}") from None
    return model, ckpt


def calibrate_draft_tree(model: MTPTransformer, train_data: torch.Tensor,
                         nodes: int = DRAFT_TREE_NODES, prompts: int = 16):
    """The candidate tree of greedy speculative decoding (mtp_ext.decoding.generate.DraftTree)
    and the draft statistics of its cost model (mtp_ext.decoding.cost_model: rank paths and
    their shares), measured on greedy continuations of `prompts` evenly spaced windows of the
    training split; (None, None) for a model of one head."""
    L = model.cfg.max_seq_len
    if model.cfg.n_future < 2 or L < 8 or model.sequential:  # (sequential: no drafting yet)
        return None, None
    plen = min(64, L // 4)
    windows = torch.cat(eval_batches(train_data, prompts, 1, plen)).to(model.embed.weight.device)
    stats = calibrate_draft(model, windows, new_tokens=min(64, L - plen - 1))
    return ordered_paths(stats, nodes), stats


def dist_backend() -> str:
    import torch.distributed as dist
    return dist.get_backend() if dist.is_initialized() else "none"


def check_args(a: TrainArgs):
    for name in ("steps", "batch_size", "seq_len", "eval_batches", "d_model", "layers",
                 "attn_heads", "n_future"):
        if getattr(a, name) < (0 if name == "layers" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if a.loss_impl not in LOSS_IMPLS:
        raise ValueError(f"--loss-impl must be one of {LOSS_IMPLS}, got {a.loss_impl!r}")
    if not a.lr > 0:
        raise ValueError(f"--lr must be > 0, got {a.lr}")
    if a.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {a.dtype!r}")
    if a.tokenizer not in ("byte", "bpe"):
        raise ValueError(f"--tokenizer must be 'byte' or 'bpe', got {a.tokenizer!r}")
    if a.tokenizer == "bpe" and a.vocab_size <= 256:
        raise ValueError(f"--vocab-size must be > 256 (the bytes) for --tokenizer bpe, got "
                         f"{a.vocab_size}")
    if a.parallel not in mdist.PARALLEL_MODES:
        raise ValueError(f"--parallel must be one of {mdist.PARALLEL_MODES}, got {a.parallel!r}")
    parse_save_every(a.save_every)
    if a.keep < 1:
        raise ValueError(f"--keep must be at least 1, got {a.keep}")
    if a.freeze_base and not (a.init_from or a.resume):
        raise ValueError("--freeze-base trains the heads of a trained model: pass --init-from "
                         "CHECKPOINT (or --resume a heads-only run)")
    if a.head_style not in ("parallel", "sequential"):
        raise ValueError(f"--head-style must be 'parallel' or 'sequential', got {a.head_style!r}")
    if a.head_weights is not None and len(a.head_weights) != a.n_future:
        raise ValueError(f"--head-weights needs one weight per head ({a.n_future}), got "
                         f"{list(a.head_weights)}")
    if a.freeze_base and a.n_future < 2:
        raise ValueError("--freeze-base needs --n-future >= 2: heads 1.. are what trains")


def check_resume(path: Path, ckpt: dict, a: TrainArgs):
    """ValueError naming the file and every setting in RESUME_MUST_MATCH that differs."""
    saved = ckpt.get("args")
    if not isinstance(saved, dict):
        return  # written by other code (e.g. convert-checkpoint of a bare model): config checks
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} there, {getattr(a, k)!r} here"
            for k in RESUME_MUST_MATCH if k in saved and saved[k] != getattr(a, k)]
    if diff:
        raise ValueError(f"--resume: {path} is from another configuration ({'; '.join(diff)}): "
                         f"pass the same settings to continue it, or another --out for a new "
                         f"run")


def train(a: TrainArgs, log=print) -> dict:
    """Trains in this process, or as one rank of a torchrun job (WORLD_SIZE > 1): every rank
    draws the same global batch and trains on its share with DDP or FSDP; rank 0 logs and
    writes the checkpoint."""
    check_args(a)
    ctx = mdist.init_from_env(a.device)
    try:
        return _train(a, log if ctx.is_main else (lambda *_: None), ctx)
    finally:
        mdist.shutdown(ctx)


def _open_run(a: TrainArgs, ctx: mdist.DistContext, log) -> Optional[Tuple[Path, dict]]:
    """OUT's checkpoint to resume from (run_dir.newest, checked against the settings), None for
    a new run. Without --resume or --overwrite, existing checkpoints stop the run; --overwrite
    removes them (rank 0)."""
    out = Path(a.out)
    if a.resume:
        if ctx.is_main:
            run_dir.remove_partial(out)
        found = run_dir.newest(out, log)
        if found is None:
            log(f"--resume: no checkpoint in {out}, starting at step 0")
        else:
            check_resume(*found, a)
            if found[1].get("step", 0) > a.steps:
                raise ValueError(f"--resume: {found[0]} is at step {found[1]['step']}, past "
                                 f"--steps {a.steps}: pass --steps {found[1]['step']} or more")
        return found
    if run_dir.existing(out):
        if not a.overwrite:
            raise ValueError(f"{run_dir.existing(out)[0]} exists: pass --resume to continue that "
                             f"run or --overwrite to replace it")
        if ctx.is_main:
            run_dir.clear(out)
    return None


def _train(a: TrainArgs, log, ctx: mdist.DistContext) -> dict:
    if a.batch_size % ctx.world:
        raise ValueError(f"--batch-size {a.batch_size} must be divisible by the {ctx.world} ranks")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    found = _open_run(a, ctx, log)
    init = None
    if a.init_from and not found:
        init = load_model(a.init_from)
        for arg, field in SHAPE_ARGS.items():  # the run's settings say what it trains
            setattr(a, arg, getattr(init[0].cfg, field))
        if a.seq_len > init[0].cfg.max_seq_len:
            raise ValueError(f"--seq-len {a.seq_len} exceeds the max_seq_len "
                             f"{init[0].cfg.max_seq_len} of --init-from {a.init_from}")
    train_files, val_files, what = load_corpus_files(a.data)
    if found or init:
        tok = tokenizers.from_dict((found or init)[1].get("tokenizer"))
    else:
        tok = tokenizers.for_training(a.tokenizer, a.vocab_size, train_files, out, log)
    train_data, val_data = tok.encode_corpus(train_files), tok.encode_corpus(val_files)
    if min(train_data.numel(), val_data.numel()) <= a.seq_len + 1:
        raise ValueError(f"corpus too small for --seq-len {a.seq_len}: {train_data.numel()} "
                         f"train and {val_data.numel()} validation tokens")
    gen = torch.Generator().manual_seed(a.seed)
    start, done_before = 0, {}
    if found:
        model, ckpt = load_model(str(found[0]), found[1])
    elif init:
        model = with_heads(init[0], a.n_future, a.head_style, a.head_weights)
        log(f"model from --init-from {a.init_from} (step {init[1].get('step')}, "
            f"{init[0].cfg.n_future} {init[0].cfg.head_style} heads; here {a.n_future} "
            f"{a.head_style}, any new one a copy of head 0): a new run at step 0")
    else:
        cfg = MTPConfig(vocab_size=tok.vocab_size, d_model=a.d_model, n_layers=a.layers,
                        n_heads=a.attn_heads, n_future=a.n_future, max_seq_len=a.seq_len,
                        head_style=a.head_style, head_weights=a.head_weights)
        model = MTPTransformer(cfg)  # the same seed on every rank: the same initial weights
    dev = ctx.device
    if a.freeze_base:
        model.freeze_base()
    core = model = model.to(dev)
    if ctx.enabled:
        model = mdist.wrap(model, a.parallel)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay)
    if found:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=_state_options())
        gen.set_state(ckpt["data_rng"])
        start, done_before = ckpt["step"], dict(ckpt.get("progress") or {})
        log(f"resumed from {found[0]} at step {start}")
    dtype = a.dtype if a.dtype != "auto" else ("bf16" if native_bf16(ctx.device) else "fp32")
    amp = lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    n = core.cfg.n_future
    save_kind, save_every = parse_save_every(a.save_every)
    log(f"data: {what}; {tokenizers.describe(tok)}: {train_data.numel() / 1e6:.2f}M train, "
        f"{val_data.numel() / 1e6:.2f}M validation tokens")
    log(f"model: {core.num_parameters() / 1e6:.2f}M parameters, {core.cfg.n_layers} trunk "
        f"layers + {n} heads, d_model {core.cfg.d_model}; loss: {a.loss_impl}; "
        f"{dtype}{' (auto)' if a.dtype == 'auto' else ''}; "
        + (f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
           else f"cpu, {torch.get_num_threads()} threads")
        + (f" x {ctx.world} ranks ({a.parallel}, {dist_backend()})" if ctx.enabled else ""))
    if a.freeze_base:
        log(f"heads-only: the base frozen, heads 1..{n - 1} train "
            f"({sum(p.numel() for p in core.parameters() if p.requires_grad) / 1e6:.2f}M "
            f"parameters)")
    val = [b.to(dev) for b in eval_batches(val_data, a.eval_batches, a.batch_size, a.seq_len)]
    history, first_losses = list(done_before.get("history", [])), done_before.get("first_step")
    tokens_before, seconds_before = done_before.get("tokens", 0), done_before.get("train_seconds", 0.0)
    saves = []  # seconds per checkpoint written by this process
    progress = Progress(a.steps) if ctx.is_main else None
    t0 = last_save = time.perf_counter()
    tokens = 0
    eval_seconds = 0.0  # mid-run evaluations: left out of the history's training seconds

    def trained_seconds() -> float:
        return round(seconds_before + time.perf_counter() - t0 - eval_seconds - sum(saves), 2)

    def save(step: int, tree=None, stats=None) -> Path:
        nonlocal last_save
        t = time.perf_counter()
        state = {"tokens": tokens_before + tokens, "history": history, "first_step": first_losses,
                 "train_seconds": seconds_before + t - t0}
        ckpt = checkpoint_state(model, opt, step, a, gen, ctx, draft_tree=tree,
                                tokenizer=tok.to_dict(), progress=state, draft_stats=stats)
        if ckpt is not None:
            run_dir.save_step(out, step, ckpt, a.keep)
        last_save = time.perf_counter()
        saves.append(last_save - t)
        return run_dir.step_path(out, step)

    with StopRequest() as stop:
        for step in range(start, a.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, a)
            x = sample_batch(train_data, a.batch_size, a.seq_len, gen)  # the global batch
            xl = mdist.local_batch(x, ctx).to(dev, non_blocking=True)
            with amp():
                out_ = model(xl, xl, loss_impl=a.loss_impl).loss
            out_.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += x.numel()
            due = (save_kind == "steps" and (step + 1) % save_every == 0) or (
                save_kind == "minutes" and ctx.is_main
                and time.perf_counter() - last_save >= 60 * save_every)
            # the step's losses and every rank's stop request and save decision: one collective
            flags = torch.tensor([float(stop.requested), float(due)], device=dev)
            synced = mdist.mean_over_ranks(torch.cat([out_.head_losses.detach().double(),
                                                      flags.double()]), ctx)
            heads, stop_now, save_now = synced[:n].tolist(), synced[n] > 0, synced[n + 1] > 0
            if first_losses is None:
                loss_value = mdist.mean_over_ranks(out_.loss, ctx).item()  # once: a collective
                first_losses = {"step": step + 1, "loss": loss_value, "head_losses": heads}
            rate = tokens / (time.perf_counter() - t0)
            if progress:
                progress.update(step + 1, f"| {rate / 1e3:.1f}k tok/s | loss "
                                + " ".join(f"h{k}:{v:.3f}" for k, v in enumerate(heads)))
            if (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
                seconds, t_eval = trained_seconds(), time.perf_counter()
                vl, _ = evaluate(model, val, a.loss_impl, amp)
                history.append({"step": step + 1, "val_losses": vl, "train_seconds": seconds})
                eval_seconds += time.perf_counter() - t_eval
            if step + 1 == a.steps:
                break  # the last step's checkpoint comes below, with the draft tree
            if stop_now:
                path = save(step + 1)
                if progress:
                    progress.close()
                log(f"stopped by {stop.signal_name or 'another rank'} after step {step + 1}: "
                    f"checkpoint {path} ({saves[-1]:.2f} s); --resume continues the run")
                return {"steps": step + 1, "stopped_by": stop.signal_name or "another rank",
                        "checkpoint": str(path), "tokens": tokens_before + tokens,
                        "checkpoint_seconds": saves, "rank": ctx.rank, "world_size": ctx.world}
            if save_now:
                save(step + 1)
        if progress:
            progress.close()
        train_time = time.perf_counter() - t0
        seconds = trained_seconds()
        val_losses, val_acc = evaluate(model, val, a.loss_impl, amp)
        history.append({"step": a.steps, "val_losses": val_losses, "train_seconds": seconds})
        # tree decoding's candidate tree, from the trained heads (one process: FSDP shards them)
        t1 = time.perf_counter()
        tree, stats = (None, None) if ctx.enabled else calibrate_draft_tree(model, train_data)
        if tree:
            log(f"draft tree for speculative decoding: {len(tree)} candidates, calibrated on the "
                f"training split in {time.perf_counter() - t1:.1f} s")
        step_file = save(a.steps, tree, stats)
        ckpt_path = run_dir.publish_final(out, step_file) if ctx.is_main else out / run_dir.FINAL
    summary = {
        "steps": a.steps, "tokens": tokens, "train_seconds": train_time,
        "tokens_per_second": tokens / max(train_time, 1e-9),
        "total_tokens": tokens_before + tokens, "total_train_seconds": seconds_before + train_time,
        "checkpoint_seconds": saves,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_step": first_losses, "val_losses": val_losses, "val_accuracy": val_acc,
        "history": history, "checkpoint": str(ckpt_path), "rank": ctx.rank,
        "world_size": ctx.world, "parallel": a.parallel if ctx.enabled else None, "dtype": dtype,
        "device": str(dev),
    }
    log(f"done: {a.steps} steps, {tokens / 1e6:.2f}M tokens in {train_time:.0f} s "
        f"({summary['tokens_per_second'] / 1e3:.1f}k tok/s), peak RSS "
        f"{summary['peak_rss_mib']:.0f} MiB; {len(saves)} checkpoint(s), "
        f"{sum(saves):.2f} s in all")
    if first_losses:
        log(f"first step ({first_losses['step']}): loss {first_losses['loss']:.4f}, the sum of "
            f"the {n} heads' losses")
    log("validation  " + "  ".join(f"head {k}: loss {l:.3f} acc {c:.3f}"
                                  for k, (l, c) in enumerate(zip(val_losses, val_acc))))
    log(f"checkpoint: {ckpt_path}")
    return summary
