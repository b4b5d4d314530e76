"""A killed `mtp-ext train` loses minutes, not the run: periodic checkpoints (--save-every,
--keep), written atomically, and `--resume` from the newest one that reads, ending bit for bit
where an uninterrupted run of the same seed ends. Runs are subprocesses, killed with SIGKILL
mid-step, mid-save and at a random moment; SIGTERM and SIGINT stop a run cleanly."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtp_ext.training import run_dir
from mtp_ext.training.checkpoint import read_checkpoint
from mtp_ext.cli import main as cli_main

WORKER = str(Path(__file__).with_name("kill_worker.py"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train_args(out, corpus, steps=8, *extra):
    return ["--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--warmup", "3",
            "--data", str(corpus), "--eval-every", "3", "--eval-batches", "1", "--d-model",
            "32", "--layers", "1", "--attn-heads", "2", "--n-future", "3", "--dtype", "fp32",
            "--device", "cpu", "--threads", "1", "--out", str(out), *extra]


def run(args, worker=None, ranks=None, check=True):
    cmd = [WORKER, *worker] if worker else ["-m", "mtp_ext", "train"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(ranks)] if ranks else [sys.executable])
    r = subprocess.run(launcher + cmd + args, env=ENV, capture_output=True, text=True,
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def assert_same_state(a_path, b_path, tol=0.0):
    """Parameters and AdamW state of two checkpoints: equal (tol 0) or within tol, relative."""
    a, b = read_checkpoint(a_path), read_checkpoint(b_path)
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    pairs = [(f"model.{k}", a["model"][k], b["model"][k]) for k in a["model"]]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    pairs += [(f"optimizer.{p}.{k}", sa[p][k], sb[p][k]) for p in sa for k in sa[p]]
    for name, x, y in pairs:
        if tol == 0:
            assert torch.equal(x, y), name
        else:
            err = ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30))
            assert err.item() <= tol, (name, err.item())
    assert torch.equal(a["data_rng"], b["data_rng"])


@pytest.fixture()
def whole(corpus, tmp_path):
    """The uninterrupted 8-step run (one process)."""
    run(train_args(tmp_path / "whole", corpus))
    return tmp_path / "whole" / "checkpoint.pt"


@pytest.mark.slow
@pytest.mark.parametrize("how", [("batch", "6"), ("save", "2")], ids=["mid-step", "mid-save"])
def test_killed_then_resumed_equals_an_uninterrupted_run(whole, corpus, tmp_path, how):
    """Checkpoints every 2 steps; SIGKILL as step 6 starts (checkpoints of steps 2 and 4
    complete), or in the second save (step 4's: half a temporary file, step 2 complete)."""
    out = tmp_path / "killed"
    r = run(train_args(out, corpus, 8, "--save-every", "2"), worker=how, check=False)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert not (out / "checkpoint.pt").exists()
    newest = run_dir.step_files(out)[-1][0]
    assert newest == {"batch": 4, "save": 2}[how[0]]
    assert list(out.rglob("*.tmp")) or how[0] == "batch"  # the unfinished save's leftover
    r = run(train_args(out, corpus, 8, "--save-every", "2", "--resume"))
    assert f"at step {newest}" in r.stdout, r.stdout
    assert not list(out.rglob("*.tmp"))
    assert_same_state(out / "checkpoint.pt", whole)
    assert [s for s, _ in run_dir.step_files(out)] == [6, 8]  # --keep 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_tokens"] == 8 * 4 * 32


@pytest.mark.slow
def test_killed_at_a_random_moment_then_resumed(whole, corpus, tmp_path):
    """SIGKILL from outside at a random moment of a run that saves every step: after the
    progress line of a random step, a random delay of up to one step (before, during or after
    a save): the resumed run ends where the uninterrupted one does."""
    out = tmp_path / "random"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    step, delay = rng.randint(1, 7), rng.uniform(0.0, 0.03)
    p = subprocess.Popen([sys.executable, "-m", "mtp_ext", "train",
                          *train_args(out, corpus, 8, "--save-every", "1")], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:  # one progress line per step
        if f" {step}/8 " in line:
            break
    time.sleep(delay)
    p.kill()
    p.communicate(timeout=60)
    where = f"seed {seed}: killed {delay * 1e3:.0f} ms after step {step}"
    assert p.returncode == -signal.SIGKILL, where
    assert not (out / "checkpoint.pt").exists(), where + " (the run had finished)"
    saved = [s for s, _ in run_dir.step_files(out)]
    r = run(train_args(out, corpus, 8, "--save-every", "1", "--resume"))
    expect = f"at step {saved[-1]}" if saved else "no checkpoint in"  # killed in the first save
    assert expect in r.stdout, where + r.stdout
    assert_same_state(out / "checkpoint.pt", whole), where


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_reported_and_the_previous_used(whole, corpus,
                                                                       tmp_path):
    out = tmp_path / "cut"
    run(train_args(out, corpus, 8, "--save-every", "3", "--keep", "3"))
    assert [s for s, _ in run_dir.step_files(out)] == [3, 6, 8]
    newest = run_dir.step_path(out, 8)
    newest.write_bytes(newest.read_bytes()[:5000])  # a copy that did not finish
    r = run(train_args(out, corpus, 8, "--save-every", "3", "--keep", "3", "--resume"))
    assert f"skipping {newest}: checkpoint '{newest}' is truncated (5000 bytes" in r.stdout
    assert "at step 6" in r.stdout, r.stdout
    assert_same_state(out / "checkpoint.pt", whole)
    # every file unreadable: an error naming them, no training
    for _, p in run_dir.step_files(out):
        p.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    r = run(train_args(out, corpus, 8, "--resume"), check=False)
    assert r.returncode == 2 and "no checkpoint in" in r.stderr and "truncated" in r.stderr


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_0(corpus, tmp_path):
    out = tmp_path / "term"
    p = subprocess.Popen([sys.executable, "-m", "mtp_ext", "train",
                          *train_args(out, corpus, 100000, "--save-every", "0")], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if " 1/100000 " in line:
            break
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stdout + stderr
    assert "stopped by SIGTERM after step" in stdout, stdout
    step = run_dir.step_files(out)[-1][0]
    assert read_checkpoint(run_dir.step_path(out, step))["step"] == step >= 1
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "SIGTERM"
    r = run(train_args(out, corpus, step + 2, "--resume"))
    assert f"at step {step}" in r.stdout and read_checkpoint(out / "checkpoint.pt")["step"] == step + 2


@pytest.mark.slow
def test_a_second_sigint_ends_the_run_at_once(corpus, tmp_path):
    out = tmp_path / "int"
    r = run(train_args(out, corpus, 8), worker=("sigint", "3"), check=False)
    assert r.returncode not in (0, -signal.SIGKILL) and "KeyboardInterrupt" in r.stderr, r.stderr
    assert not run_dir.existing(out)  # no checkpoint: it did not wait for the step's end


def test_resume_from_another_configuration_names_the_file_and_the_difference(corpus, tmp_path,
                                                                             capsys):
    out = tmp_path / "cfg"
    assert cli_main(["train", *train_args(out, corpus, 2)]) == 0
    capsys.readouterr()
    assert cli_main(["train", *train_args(out, corpus, 4, "--resume", "--d-model", "64",
                                          "--seed", "3")]) == 2
    err = capsys.readouterr().err
    assert (f"{run_dir.step_path(out, 2)} is from another configuration" in err
            and "--d-model 32 there, 64 here" in err and "--seed 0 there, 3 here" in err), err
    # --steps below the checkpoint's step
    assert cli_main(["train", *train_args(out, corpus, 1, "--resume")]) == 2
    assert "at step 2, past --steps 1" in capsys.readouterr().err
    # no checkpoint yet: --resume starts at step 0 (a restart loop needs no first run)
    assert cli_main(["train", *train_args(tmp_path / "new", corpus, 2, "--resume")]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
