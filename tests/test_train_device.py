"""`mtp-ext train`, `mtp-ext generate` and bench_decode on the process's device (--device):
the model, every batch and the evaluation there, checkpoints loadable on the CPU; on a machine
without CUDA, --device cuda is a clear error. The cuda cases run where a GPU is present."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA, needs_cuda
from mtp_ext.cli import main as cli_main
from mtp_ext.model import MTPTransformer
from mtp_ext.training.train import TrainArgs, load_model, train

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
SMALL = ["--steps", "3", "--batch-size", "2", "--seq-len", "48", "--d-model", "32", "--layers",
         "1", "--attn-heads", "2", "--n-future", "2", "--eval-batches", "1", "--eval-every", "2"]


@pytest.mark.parametrize("device", DEVICES)
def test_training_runs_on_the_chosen_device(device, corpus, tmp_path, monkeypatch):
    seen = []
    forward = MTPTransformer.forward

    def spy(self, x, *args, **kw):  # where the batch and the parameters are, at every forward
        seen.append((x.device.type, self.embed.weight.device.type, self.training))
        return forward(self, x, *args, **kw)

    monkeypatch.setattr(MTPTransformer, "forward", spy)
    a = TrainArgs(steps=3, batch_size=2, seq_len=48, d_model=32, layers=1, attn_heads=2,
                  n_future=2, eval_every=2, eval_batches=1, data=str(corpus),
                  out=str(tmp_path / "run"), device=device)
    s = train(a, log=lambda *_: None)
    assert s["device"].startswith(device)
    assert {t for _, _, t in seen} == {True, False}  # training and evaluation steps
    assert all(x == device and w == device for x, w, _ in seen), seen
    model, ckpt = load_model(s["checkpoint"])  # on the CPU, whatever trained it
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    prompt = torch.tensor([list(b"def ")])
    want = model.generate(prompt, 6).tokens
    got = model.to(device).generate(prompt.to(device), 6, speculative=True).tokens
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_cli_generate_and_bench_decode_on_the_device(device, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--data", str(corpus), "--out", str(out), "--device", device,
                     *SMALL]) == 0
    assert json.loads((out / "summary.json").read_text())["device"].startswith(device)
    capsys.readouterr()
    args = ["--checkpoint", str(out / "checkpoint.pt"), "--prompt", "def ",
            "--max-new-tokens", "6"]
    assert cli_main(["generate", *args, "--device", "cpu"]) == 0
    want = capsys.readouterr().out
    assert cli_main(["generate", *args, "--device", device, "--speculative"]) == 0
    assert capsys.readouterr().out == want


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_one_rank_torchrun_on_the_device(device, corpus, tmp_path):
    """torchrun with one rank: nccl on CUDA, gloo on the CPU."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "1", "-m", "mtp_ext", "train", "--data", str(corpus), "--out", str(out), "--device",
           device, *SMALL]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith(device) and summary["steps"] == 3


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
def test_device_cuda_without_a_gpu_is_a_clear_error(corpus, tmp_path, capsys):
    assert cli_main(["train", "--data", str(corpus), "--out", str(tmp_path / "r"), "--device",
                     "cuda", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: torch.cuda.is_available() is False" in err, err
    assert not (tmp_path / "r").exists()
    assert cli_main(["generate", "--checkpoint", "x.pt", "--prompt", "x", "--device",
                     "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--device must be one of"):
        train(TrainArgs(device="tpu"))
