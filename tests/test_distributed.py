"""Two gloo ranks on the CPU: the vocab-parallel loss against the single-process fused loss,
and the reference model under DDP and FSDP against a single-process step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_ranks
from mtp_ext.training import run_dir
import dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

from conftest import IGNORE, make_inputs, rel_err

F32, F64 = torch.float32, torch.float64
CASES = [
    dict(seed=1, n=1, V=64, dtype=F64, per_head=False, bias=False, uneven=False, opts={}),
    dict(seed=2, n=3, V=101, dtype=F64, per_head=False, bias=True, uneven=True,
         opts=dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)),
    dict(seed=3, n=2, V=96, dtype=F64, per_head=True, bias=True, uneven=False,
         opts=dict(reduction="none", label_smoothing=0.2)),
    dict(seed=4, n=3, V=257, dtype=F32, per_head=False, bias=False, uneven=True,
         opts=dict(reduction="sum", head_weights=[1.0, 0.5, 0.25], z_loss=1e-4)),
    dict(seed=5, n=2, V=130, dtype=F32, per_head=True, bias=False, uneven=True,
         opts=dict(chunk_size=7, softcap=10.0, label_smoothing=0.05)),
]


def test_vocab_parallel_matches_single_process():
    run_ranks(dist_workers.vocab_parallel_matches_fused, CASES)


def test_vocab_parallel_errors_raise_on_every_rank():
    run_ranks(dist_workers.vocab_parallel_errors)


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
@pytest.mark.parametrize("lo,hi", [(0, 40), (40, 97), (13, 14)])
def test_shard_statistics_op(dtype, lo, hi):
    """One process: the per-row statistics of a shard against float64 torch on that slice."""
    N, D, V, cap = 50, 24, 97, 3.0
    h, w, b, y = make_inputs(N, D, V, dtype, seed=lo + hi, bias=True)
    stats, argmax = torch.ops.mtp_ext.fused_ce_stats(
        h[None], w[lo:hi], b[lo:hi], y[None], IGNORE, cap, lo, V, 0)
    z = h.double() @ w[lo:hi].double().T + b[lo:hi].double()
    if dtype == torch.bfloat16:  # the workspace holds the logits rounded to the input dtype
        z = (h @ w[lo:hi].T).double() + b[lo:hi].double()
    z = cap * torch.tanh(z / cap)
    m = z.max(-1).values
    valid = y != IGNORE
    own = valid & (y >= lo) & (y < hi)
    z_y = torch.where(own, z.gather(1, (y - lo).clamp(0, hi - lo - 1)[:, None])[:, 0], 0.0)
    want = torch.stack([m, torch.exp(z - m[:, None]).sum(-1), z.sum(-1), z_y], -1)
    want[~valid] = 0
    tol = 1e-5 if dtype != torch.float64 else 1e-12
    assert rel_err(stats[0], want) < tol
    assert torch.equal(argmax[0][valid], z.argmax(-1)[valid] + lo)
    assert bool((argmax[0][~valid] == -1).all())
    with pytest.raises(IndexError, match="outside"):  # checked against the global vocabulary
        torch.ops.mtp_ext.fused_ce_stats(h[None], w[lo:hi], b[lo:hi], torch.full((1, N), V),
                                         IGNORE, cap, lo, V, 0)


@pytest.mark.parametrize("mode,per_head", [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_data_parallel_step_matches_single_process(mode, per_head):
    run_ranks(dist_workers.data_parallel_matches_single_process, mode, per_head)


def _train_cmd(out, corpus, steps, extra=()):
    return ["train", "--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--warmup",
            "2", "--data", str(corpus), "--eval-every", "1000", "--eval-batches", "2",
            "--d-model", "32", "--layers", "1", "--attn-heads", "2", "--n-future", "3",
            "--dtype", "fp32", "--device", "cpu", "--out", str(out), *extra]


def _run(args, ranks=None, script=None, check=True):
    """`python -m mtp_ext ARGS` (or `python SCRIPT ARGS`), under torchrun with `ranks`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(ranks)] if ranks else [sys.executable])
    r = subprocess.run(launcher + ([script] if script else ["-m", "mtp_ext"]) + args, env=env,
                       capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout if check else r


def _max_rel_err(a, b):
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("mode,kill", [("ddp", ("save", "2")), ("fsdp", ("batch", "5"))])
def test_torchrun_training_matches_single_process_and_resumes_exactly(mode, kill, corpus,
                                                                      tmp_path):
    """`torchrun --nproc_per_node 2 -m mtp_ext train --parallel MODE`, 6 steps, against one
    process on the same global batches: the checkpoints agree to float rounding, rank 0 alone
    logs and writes. The same 2-rank run with rank 0 killed (SIGKILL in step 4's save for DDP,
    as step 5 starts for FSDP), then resumed, ends equal to the uninterrupted one to 1e-6."""
    single, par, killed = tmp_path / "single", tmp_path / mode, tmp_path / f"{mode}-killed"
    _run(_train_cmd(single, corpus, 6, ["--threads", "1"]))
    saving = ["--parallel", mode, "--save-every", "2"]
    logs = _run(_train_cmd(par, corpus, 6, saving), ranks=2)
    assert logs.count("checkpoint:") == 1 and "x 2 ranks" in logs, logs
    r = _run([*kill, *_train_cmd(killed, corpus, 6, saving)[1:]], ranks=2,
             script=str(Path(__file__).with_name("kill_worker.py")), check=False)
    assert r.returncode != 0 and not (killed / "checkpoint.pt").exists(), r.stdout + r.stderr
    logs = _run(_train_cmd(killed, corpus, 6, saving + ["--resume"]), ranks=2)
    resumed_at = {"save": 2, "batch": 4}[kill[0]]
    assert f"resumed from {run_dir.step_path(killed, resumed_at)} at step {resumed_at}" in logs
    want, got = torch.load(single / "checkpoint.pt"), torch.load(par / "checkpoint.pt")
    again = torch.load(killed / "checkpoint.pt")
    assert got["step"] == again["step"] == 6
    assert got["model"].keys() == want["model"].keys() == again["model"].keys()
    assert _max_rel_err(got["model"], want["model"]) < 1e-4
    assert _max_rel_err(again["model"], got["model"]) <= 1e-6
    for p, s in got["optimizer"]["state"].items():
        assert _max_rel_err(again["optimizer"]["state"][p], s) <= 1e-6, p
    summary = json.loads((par / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == mode


GROUP_FREED_SCRIPT = """
import os, sys, torch
from mtp_ext.training import distributed as mdist
from mtp_ext.model import MTPConfig, MTPTransformer
torch.set_num_threads(1)
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
ctx = mdist.init_from_env("cpu")
model = mdist.wrap(MTPTransformer(MTPConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2,
                                            n_future=2, max_seq_len=8)), sys.argv[1])
x = torch.randint(0, 64, (2, 8))
model(x, x).loss.loss.backward()
during = threads()
del model
mdist.shutdown(ctx)
with open(os.path.join(sys.argv[2], f"rank{ctx.rank}.txt"), "w") as f:  # not stdout: ranks interleave
    f.write(f"{before} {during} {threads()}")
"""


@pytest.mark.slow
def test_ddp_shutdown_frees_the_process_group(tmp_path):
    """The cause of the abort at exit (mtp_ext.training.distributed): after shutdown, no gloo worker
    thread is left for the interpreter's finalization to meet (it fails without the early import
    of torch.distributed.nn in mdist.init_process_group)."""
    script = tmp_path / "group_freed.py"
    script.write_text(GROUP_FREED_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(script), "ddp", str(tmp_path)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    counts = [tuple(int(w) for w in (tmp_path / f"rank{k}.txt").read_text().split())
              for k in range(2)]
    for before, during, after in counts:
        assert during > before and after == before, counts


EXIT_REPEATS = int(os.environ.get("MTP_EXT_EXIT_REPEATS", "2"))


@pytest.mark.slow
@pytest.mark.parametrize("repeat", range(EXIT_REPEATS))
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_exit_is_clean(mode, repeat, corpus, tmp_path):
    """A finished `torchrun ... mtp-ext train` exits 0 with its checkpoint in place, every time.
    CI runs it MTP_EXT_EXIT_REPEATS times per mode (default 2); set it higher to hunt a rare abort."""
    out = tmp_path / "out"
    logs = _run(_train_cmd(out, corpus, 2, ["--parallel", mode]), ranks=2)
    assert "checkpoint:" in logs
    ckpt = torch.load(out / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["model"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
