"""mtp-ext command line: `mtp-ext train` trains a small byte-level MTP model on the Python
standard library's sources; `mtp-ext generate` decodes from its checkpoint (plain or
self-speculative); `mtp-ext bench` compares the loss paths side by side."""
from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

from .training.distributed import DEVICES

HELP = argparse.ArgumentDefaultsHelpFormatter  # --help shows every default


def _machine() -> str:
    """The CPU (model, and whether it has AMX and AVX512-BF16: the bf16 GEMMs differ), threads,
    GPU and torch."""
    from ._cpu_check import cpu_flags
    from .ops import cpu_capability
    cpu, flags = platform.processor() or platform.machine(), cpu_flags()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    has = lambda f: "yes" if f in flags else "no"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu} (AMX {has('amx_bf16')}, AVX512-BF16 {has('avx512_bf16')}), "
            f"{torch.get_num_threads()} threads{gpu}; torch {torch.__version__}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()} (ATen), "
            f"{cpu_capability()} (mtp_ext row kernels)")


def _commit() -> str:
    """The git commit of this source tree ("+changes" when it differs from it), or "unknown"."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" +changes" if dirty else "")


BENCH_METHOD = """\
- time: median of `--repeats` rounds after one warm-up step of each path (the fused path on
  the CPU: until it has chosen its logits layout, logged); in each round every
  path runs once, the paths interleaved, on the same inputs (this machine's speed drifts
  between minutes). The GEMM floor as written (per head: `X W^T`, `G W`, `G^T X` in the
  input dtype, the products the loss must do; in fp32, converted outside the timing, where the
  CPU ops multiply 16-bit operands in fp32 for want of the CPU's 16-bit dot products) is one of
  the paths; the best-layout floor
  (`--best-floor`, always with `--preset llm`) times each product in each operand layout
  (`mtp_ext.benchmark.PRODUCT_LAYOUTS`, contiguous copies made outside the timing) once in
  every round, after the paths, and adds the fastest of each (per layout the median over
  rounds). TFLOP/s: the floor's operations over the path's time.
- peak memory: rise of the peak resident set over one warm step, in a fresh process per path
  (on CUDA: `torch.cuda.max_memory_allocated`), so it includes the gradients that the step
  returns (dH: n x N x D, dW: V x D, in the input dtype).
- paths: fused = `mtp_ext.mtp_loss`; reference = `mtp_ext.reference.mtp_loss` (eager PyTorch,
  full logits per head); compiled = the reference under `torch.compile`; torch_chunked =
  PyTorch's `F.linear_cross_entropy` (one call per head)."""


def _vocab_rows(text: str):
    """"V:N" of --rows-for, as (V, N)."""
    try:
        V, N = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not V:N (two integers)")
    if V < 1 or N < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: V and N must be positive")
    return V, N


def bench(args) -> int:
    from . import benchmark as B
    if args.replot:  # no measuring: plots from tables saved by --out
        results = []
        for name in args.replot:
            with open(name) as f:
                results += B.parse_tables(f.read())
        B.plot(results, args.plot)
        print(f"wrote {args.plot} from {len(results)} cases")
        return 0
    heads = args.heads
    out = ["# Benchmark results", "",
           f"Written by `mtp-ext {' '.join(args.argv)}` on {datetime.date.today().isoformat()}, "
           f"commit {_commit()}.", "", f"Machine: {_machine()}.", "", BENCH_METHOD, ""]
    print("\n".join(out), flush=True)
    results = []
    rows_for = dict(args.rows_for or [])
    if args.preset == "llm":  # each LLM's unembedding, not the product of --hidden x --vocab
        shapes = [B.LLM_SHAPES[k] for k in (args.models or B.LLM_SHAPES)]
    else:
        shapes = [(None, D, V) for D in args.hidden for V in args.vocab]
    cases = [(name, B.Case(n=n, N=N, D=D, V=V, dtype=dtype, per_head=args.per_head,
                           backward=not args.forward_only, device=args.device))
             for dtype in args.dtype for name, D, V in shapes
             for N in ([rows_for[V]] if V in rows_for else args.rows) for n in heads]
    for name, case in cases:
        print(f"{case.label()}:", file=sys.stderr, flush=True)
        rows = B.compare(case, paths=args.paths, repeats=args.repeats, memory=not args.no_memory,
                         best_floor=args.best_floor,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
        results.append((case, rows))
        table = (f"{name} unembedding (D {case.D}, V {case.V})\n" if name else "")
        table += B.format_table(case, rows)
        print(table + "\n", flush=True)
        out.append(table + "\n")
        if args.out:  # after every case: a long run keeps what it measured
            with open(args.out, "w") as f:
                f.write("\n".join(out))
    if len(results) > 1 and "fused" in args.paths:
        summary = B.format_summary(results)
        print(summary, flush=True)
        out.append(summary)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(out))
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        B.plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def train(args) -> int:
    import json
    from dataclasses import fields
    from .training.train import TrainArgs, train as run
    a = TrainArgs(**{f.name: getattr(args, f.name) for f in fields(TrainArgs)})
    summary = run(a)
    if summary["rank"] == 0:
        with open(f"{a.out}/summary.json", "w") as f:
            json.dump(summary, f, indent=1)
    from .training.distributed import end_rank
    return end_rank(0)  # checkpoint and summary are written and closed: see end_rank


def _add_train(sub):
    from .training.train import TrainArgs
    d = TrainArgs()
    t = sub.add_parser("train", formatter_class=HELP,
                       help="train a byte-level MTP model (default corpus: the Python standard "
                       "library's sources)")
    t.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per step (the global batch under torchrun)")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    t.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--warmup", type=int, default=d.warmup,
                   help="linear warm-up steps, then cosine decay to 10%%")
    t.add_argument("--seed", type=int, default=d.seed, help="weights and batch sampling")
    t.add_argument("--data", default=None,
                   help="a folder of text files (None: the Python standard library's sources)")
    t.add_argument("--out", default=d.out,
                   help="output folder: checkpoint.pt, checkpoints/, summary.json")
    t.add_argument("--loss-impl", default=d.loss_impl, choices=["fused", "reference"],
                   help="the fused ops or the plain PyTorch loss")
    t.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between validation losses")
    t.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="validation batches per evaluation")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT's newest readable checkpoint (OUT/checkpoints/, else "
                   "OUT/checkpoint.pt), exactly where it stopped; none there: from step 0")
    t.add_argument("--overwrite", action="store_true",
                   help="remove OUT's checkpoints and start again (without it or --resume, an "
                   "existing checkpoint stops the run)")
    t.add_argument("--save-every", default=d.save_every, metavar="N|Mmin",
                   help="a checkpoint in OUT/checkpoints/ every N steps (e.g. 200) or M minutes "
                   "(e.g. 5min), besides the last step's (OUT/checkpoint.pt); 0: only the last. "
                   "SIGTERM or Ctrl-C: the step ends, a checkpoint is written, exit 0")
    t.add_argument("--keep", type=int, default=d.keep,
                   help="the newest K checkpoints of OUT/checkpoints/ are kept")
    t.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from a trained model (its weights, shape and tokenizer; a new "
                   "optimizer, step 0); --n-future more heads than it has: copies of its head 0")
    t.add_argument("--freeze-base", action="store_true",
                   help="heads-only training (with --init-from): the embedding, trunk, head 0, "
                   "final norm and unembedding frozen, under no_grad; heads 1..n-1 train")
    t.add_argument("--device", default=d.device, choices=DEVICES,
                   help="where the model, batches and evaluation run (auto: CUDA where torch "
                   "sees a GPU; under torchrun, each rank's LOCAL_RANK GPU, with nccl)")
    t.add_argument("--parallel", default=d.parallel, choices=["ddp", "fsdp"],
                   help="data parallelism when started by torchrun")
    t.add_argument("--d-model", type=int, default=d.d_model, help="hidden size")
    t.add_argument("--layers", type=int, default=d.layers, help="trunk layers")
    t.add_argument("--attn-heads", type=int, default=d.attn_heads, help="attention heads per layer")
    t.add_argument("--n-future", type=int, default=d.n_future, help="prediction heads n")
    t.add_argument("--head-style", default=d.head_style, choices=["parallel", "sequential"],
                   help="parallel: Gloeckle et al.'s heads, one layer each on the trunk; "
                   "sequential: DeepSeek-V3's MTP modules, depth k on depth k-1 and the "
                   "embedding of the token k ahead (with --init-from: heads 1.. made anew)")
    t.add_argument("--head-weights", type=float, nargs="+", default=d.head_weights,
                   metavar="W", help="the loss's weight of each head (n values; None: all 1). "
                   "DeepSeek-V3: 1, then 0.3 / (n - 1) for each module")
    t.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16"],
                   help="bf16: the forward under bf16 autocast, fp32 weights and optimizer; "
                   "auto: bf16 where the CPU (AVX512-BF16 or AMX) or GPU computes it natively")
    t.add_argument("--tokenizer", default=d.tokenizer, choices=["byte", "bpe"],
                   help="bytes, or a byte-level BPE trained on the training split (needs the "
                   "`tokenizers` library; cached in OUT, saved in the checkpoint)")
    t.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="the BPE's vocabulary size (--tokenizer bpe)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch threads (None: torch's default)")


def experiment(args) -> int:
    from .experiments.runner import main as run
    given = [v for v in (args.steps, args.layers, args.seeds) if v is not None]
    if min([args.test_count, *given, *(args.heads or []), *(args.sizes or []),
            *(args.train_m or [])]) < 1:
        raise ValueError("--steps, --seeds, --test-count, --heads, --sizes, --layers and "
                         "--train-m must be positive")
    if args.train_m and args.task != "polynomial":
        raise ValueError(f"--train-m is for the polynomial task, not {args.task!r}")
    return run(args)


def generate(args) -> int:
    from .training import tokenizer as tokenizers
    from .decoding.generate import chain
    from .training.distributed import pick_device
    from .training.train import calibrate_draft_tree, load_corpus_files, load_model
    device = pick_device(args.device)
    model, ckpt = load_model(args.checkpoint)
    model.to(device)
    tok = tokenizers.from_dict(ckpt.get("tokenizer"))
    if tok.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"checkpoint {args.checkpoint!r}: tokenizer of {tok.vocab_size} tokens "
                         f"for a model of vocabulary {model.cfg.vocab_size}")
    prompt = torch.tensor([tok.encode(args.prompt)], device=device)
    if prompt.numel() == 0:
        raise ValueError("--prompt must not be empty")
    greedy_spec = (args.speculative and args.temperature <= 0 and model.cfg.n_future > 1
                   and not model.sequential)  # sequential MTP modules draft one chain
    if greedy_spec and args.chain:
        model.draft_tree = chain(model.cfg.n_future).paths
    elif greedy_spec and model.draft_stats is None:  # a checkpoint from before the cost model
        files = load_corpus_files(ckpt["args"].get("data"))[0]
        model.draft_tree, model.draft_stats = calibrate_draft_tree(model, tok.encode_corpus(files))
        print(f"[draft statistics calibrated on the training split]", file=sys.stderr)

    def run(speculative, new_tokens):
        return model.generate(prompt, new_tokens, speculative=speculative,
                              stop_token=args.stop_byte, temperature=args.temperature,
                              top_k=args.top_k, plan=False if args.chain else None,
                              generator=torch.Generator(device).manual_seed(args.seed))

    modes = (True, False) if args.speculative else (False,)
    for mode in modes:  # warm: the first calls pay one-time costs
        run(mode, min(4, args.max_new_tokens))
    out = run(args.speculative, args.max_new_tokens)
    text = tok.decode(out.tokens[0].tolist())
    print(text)
    st = out.stats()
    ms = lambda o: 1e3 * o.wall_seconds / max(1, o.new_tokens)
    mode = "plain"
    if args.speculative:
        mode = ("speculative, the chain" if greedy_spec and args.chain
                else f"speculative, planned: {out.plan.summary()}" if out.plan is not None
                else f"speculative, tree of {len(model.draft_tree)} candidates" if greedy_spec
                else "speculative sampling" if args.temperature > 0
                else "speculative, the MTP modules' chain")
    line = (f"\n[{mode}] {st['new_tokens']} tokens, "
            f"{st['forward_passes']} forward passes, {st['tokens_per_forward']:.2f} tokens/forward, "
            f"{st['wall_seconds']:.3f} s ({ms(out):.2f} ms/token)")
    if args.speculative:  # against plain decoding of the same prompt
        acc = " ".join(f"h{k + 1}:{a:.2f}" for k, a in enumerate(st["head_acceptance"]))
        plain = run(False, args.max_new_tokens)
        line += (f", acceptance {acc}; plain decoding {ms(plain):.2f} ms/token, speedup "
                 f"{plain.wall_seconds / max(out.wall_seconds, 1e-9):.2f}x")
    if out.plan is not None:  # what the cost model picked, and why
        line += (f"\n[picked per batch size from measured step times and calibrated acceptance: "
                 + "; ".join(out.plan.why.values())
                 + f"; expected {out.plan.expected_tokens_per_second:.0f} tokens/s, measured "
                 f"{out.tokens_per_second:.0f}]")
    print(line, file=sys.stderr)
    return 0


def _add_generate(sub):
    g = sub.add_parser("generate", formatter_class=HELP,
                       help="generate text from a `mtp-ext train` checkpoint")
    g.add_argument("--checkpoint", default="runs/mtp/checkpoint.pt",
                   help="written by `mtp-ext train`")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens to generate (bytes, or the checkpoint's BPE tokens)")
    g.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding with the extra heads (greedy, or "
                   "speculative sampling with --temperature)")
    g.add_argument("--chain", action="store_true",
                   help="greedy speculative decoding with each head's top draft only, not what "
                   "the cost model picks (a tree of the checkpoint's candidates, the chain or "
                   "plain steps, per batch size)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    g.add_argument("--stop-byte", type=int, default=None,
                   help="stop at this token id (a byte value for byte-level checkpoints)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to decode (auto: CUDA where torch sees a GPU)")


def convert_checkpoint(args) -> int:
    from .training.checkpoint import convert_checkpoint as convert
    dropped, dst = convert(args.src, args.dst, args.allow)
    print(f"{dst}: {args.src} in plain types, readable by the safe loader"
          + (f" (dropped entries: {', '.join(dropped)})" if dropped else ""))
    return 0


def _add_convert(sub):
    c = sub.add_parser("convert-checkpoint", formatter_class=HELP,
                       help="rewrite a checkpoint you trust that the safe loader refuses")
    c.add_argument("src", metavar="IN", help="the checkpoint (kept as it is)")
    c.add_argument("dst", metavar="OUT", help="where to write it in plain types")
    c.add_argument("--allow", nargs="+", required=True, metavar="NAME",
                   help="the globals to accept while reading IN, as the refusal named them "
                   "(e.g. pathlib.PosixPath); an allowed name runs on load: trust the file")


def main(argv=None) -> int:
    from .benchmark import LLM_SHAPES
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="mtp-ext", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    _add_generate(sub)
    _add_convert(sub)
    x = sub.add_parser("experiment", formatter_class=HELP,
                       help="MTP against next-token training on an algorithmic task (docs/"
                       "experiments.md)")
    x.add_argument("task", choices=["polynomial", "induction", "bytes"],
                   help="polynomial: arithmetic over F7[X]/(X^5); induction: copying the second "
                   "token of a repeated two-token name (both as in Gloeckle et al. 2024, sec. 4); "
                   "bytes: `mtp-ext train` with n = 1 and 4, head 0's validation loss curves")
    x.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (None: the task's, 1000 / 600 / 300)")
    x.add_argument("--seeds", type=int, default=None,
                   help="seeds 0..S-1 per configuration (None: the task's, 3 / 3 / 1)")
    x.add_argument("--heads", type=int, nargs="+", default=None,
                   help="values of n (None: the task's, 1 2 4 / 1 2 / 1 4)")
    x.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="model sizes as d_model (None: the task's, 128 / 64 128)")
    x.add_argument("--layers", type=int, default=None, help="trunk layers (None: the task's, 2)")
    x.add_argument("--no-equal-compute", action="store_true",
                   help="skip n = 1 trained for the FLOPs of the largest n")
    x.add_argument("--recipe", default="cosine", choices=["cosine", "constant"],
                   help="cosine: AdamW (0.9, 0.95), wd 0.1, warmup and cosine decay, clipping; "
                   "constant: AdamW's defaults at a constant learning rate (each recipe has its "
                   "own section)")
    x.add_argument("--test-count", type=int, default=500,
                   help="held-out prompts (polynomial: per difficulty) or sequences (induction)")
    x.add_argument("--train-m", type=int, nargs="+", default=None,
                   help="polynomial: the difficulties trained on, uniformly (None: 1 2 3 4 5); "
                   "another set has its own section and plot")
    x.add_argument("--out", default=None, help="write the report's section into this markdown "
                   "file (docs/experiments.md), its plot and run records into experiments/ "
                   "beside it")
    x.add_argument("--runs", default=None, help="the run records (JSON lines; None: "
                   "experiments/TASK-runs.jsonl beside --out): runs found there are not run again")
    b = sub.add_parser("bench", formatter_class=HELP,
                       help="time and peak memory of the loss paths, side by side")
    b.add_argument("--preset", choices=["llm"], default=None,
                   help="llm: the unembeddings of Qwen2.5 0.5B, Llama 3.2 1B, Gemma 2 2B and "
                   "Llama 3 8B instead of --hidden x --vocab, with n 1 and 4, bf16 and fp32 and "
                   "the best-layout floor unless given")
    b.add_argument("--models", nargs="+", default=None, choices=list(LLM_SHAPES),
                   help="--preset llm: only these unembeddings")
    b.add_argument("--heads", type=int, nargs="+", default=None,
                   help="numbers of heads n (default 1 2 4; --preset llm: 1 4)")
    b.add_argument("--rows", type=int, nargs="+", default=[4096],
                   help="rows per head N (batch x sequence)")
    b.add_argument("--hidden", type=int, nargs="+", default=[1024], help="hidden sizes D")
    b.add_argument("--vocab", type=int, nargs="+", default=[32768], help="vocabulary sizes V")
    b.add_argument("--rows-for", type=_vocab_rows, nargs="+", metavar="V:N",
                   help="rows per head for a vocabulary instead of --rows, e.g. 128256:1024")
    b.add_argument("--dtype", nargs="+", default=None,
                   choices=["fp32", "bf16", "fp16"],
                   help="input dtypes (default fp32 bf16; --preset llm: bf16 fp32)")
    b.add_argument("--paths", nargs="+", default=None,
                   help="(None: all) subset of: fused reference compiled torch_chunked gemm_floor")
    b.add_argument("--per-head", action="store_true", help="one unembedding per head")
    b.add_argument("--forward-only", action="store_true", help="time the forward alone")
    b.add_argument("--repeats", type=int, default=3,
                   help="timed rounds, each path once per round (median)")
    b.add_argument("--best-floor", action="store_true",
                   help="also time each product in each operand layout: the best-layout floor")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--out", help="also write the tables to this markdown file")
    b.add_argument("--plot", help="write time and peak memory against n, V and N to this PNG "
                   "(needs matplotlib)")
    b.add_argument("--replot", nargs="+", metavar="FILE.md",
                   help="measure nothing: draw --plot from tables saved with --out")
    args = ap.parse_args(argv)
    args.argv = argv
    commands = {"train": train, "generate": generate, "convert-checkpoint": convert_checkpoint,
                "experiment": experiment}
    if args.cmd in commands:
        try:
            return commands[args.cmd](args)
        except (ValueError, FileNotFoundError) as e:  # bad flags or data: a message, not a trace
            print(f"mtp-ext {args.cmd}: error: {e}", file=sys.stderr)
            return 2
    if args.cmd == "bench":
        from . import benchmark as B
        args.paths = tuple(args.paths or B.PATHS)
        bad = [p for p in args.paths if p not in B.PATHS]
        if bad:
            ap.error(f"unknown path(s) {bad}; choose from {B.PATHS}")
        if args.replot and not args.plot:
            ap.error("--replot needs --plot FILE.png")
        if args.models and args.preset != "llm":
            ap.error("--models needs --preset llm")
        llm = args.preset == "llm"
        args.best_floor = args.best_floor or llm
        args.heads = args.heads or ([1, 4] if llm else [1, 2, 4])
        args.dtype = args.dtype or (["bf16", "fp32"] if llm else ["fp32", "bf16"])
        if min(args.heads + args.rows + args.hidden + args.vocab) < 1:
            ap.error("--heads, --rows, --hidden and --vocab must be positive")
        return bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
