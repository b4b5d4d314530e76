"""Checkpoints are read with torch's safe loader: a file that would run code on load is refused by
every command that takes one, and the marker its payload would create never appears; what the
project writes loads, decodes and resumes as before. The other files read from a user: --data
folders (links out, huge files) and the BPE cache."""
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtp_ext.training.checkpoint import UnsafeCheckpointError, read_checkpoint, write_checkpoint
from mtp_ext.cli import main as cli_main
from mtp_ext.training.train import TrainArgs, load_corpus, load_model, train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_decode  # noqa: E402


class Evil:
    """Unpickling it runs a shell command (pickle stores os.system and its argument)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class OldConfig:  # what a checkpoint of other code might hold: a dataclass and a path
    name: str
    where: Path


def small_args(corpus, out, **kw):
    a = TrainArgs(steps=8, batch_size=2, seq_len=48, d_model=32, layers=1, attn_heads=2,
                  n_future=2, warmup=4, eval_every=100, eval_batches=1, dtype="fp32",
                  data=str(corpus), out=str(out))
    for k, v in kw.items():
        setattr(a, k, v)
    return a


@pytest.fixture()
def trained(corpus, tmp_path):
    s = train(small_args(corpus, tmp_path / "run"), log=lambda *_: None)
    return Path(s["checkpoint"])


def crafted(trained, tmp_path, where):
    """(the real checkpoint with an Evil object in `where`, the marker file it would create)."""
    marker = tmp_path / f"PWNED-{where}"
    ckpt = torch.load(trained, weights_only=True)
    if where == "config":
        ckpt = {"model": {}, "config": Evil(marker)}  # the file
    else:  # nested inside the optimizer state of an otherwise real checkpoint
        next(iter(ckpt["optimizer"]["state"].values()))["exp_avg_extra"] = [1, {"x": Evil(marker)}]
    path = tmp_path / f"evil-{where}.pt"
    torch.save(ckpt, path)
    return path, marker


@pytest.mark.parametrize("where", ["config", "optimizer"])
def test_every_command_refuses_a_checkpoint_that_runs_code(trained, corpus, tmp_path, capsys,
                                                          where):
    path, marker = crafted(trained, tmp_path, where)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_model(str(path))
    msg = str(e.value)
    assert str(path) in msg and "posix.system" in msg and "delete the file" in msg, msg
    # mtp-ext generate
    assert cli_main(["generate", "--checkpoint", str(path), "--prompt", "x"]) == 2
    assert "posix.system" in capsys.readouterr().err
    # mtp-ext train --resume: the file in OUT
    out = tmp_path / "resume"
    out.mkdir()
    os.replace(path, out / "checkpoint.pt")
    assert cli_main(["train", "--data", str(corpus), "--out", str(out), "--resume",
                     "--steps", "9", "--seq-len", "16", "--d-model", "32", "--layers", "1",
                     "--attn-heads", "2", "--n-future", "2"]) == 2
    assert "posix.system" in capsys.readouterr().err
    # bench/bench_decode.py
    with pytest.raises(SystemExit) as e:
        bench_decode.main(["--checkpoint", str(out / "checkpoint.pt")])
    assert e.value.code == 2 and "posix.system" in capsys.readouterr().err
    assert not marker.exists()


def test_the_crafted_file_would_run_its_command(trained, tmp_path):
    """The test above can fail: the unsafe loader does create the marker."""
    path, marker = crafted(trained, tmp_path, "config")
    torch.load(path, weights_only=False)  # what the project never does
    assert marker.exists()


@pytest.mark.slow
def test_a_checkpoint_of_this_code_loads_decodes_and_resumes_exactly(corpus, tmp_path, capsys):
    whole = train(small_args(corpus, tmp_path / "whole"), log=lambda *_: None)
    # 4 steps (all in warm-up, so the learning rates do not depend on the total), then resumed
    train(small_args(corpus, tmp_path / "split", steps=4), log=lambda *_: None)
    split = train(small_args(corpus, tmp_path / "split", resume=True), log=lambda *_: None)
    a, b = read_checkpoint(whole["checkpoint"]), read_checkpoint(split["checkpoint"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in s)
    model, ckpt = load_model(whole["checkpoint"])
    assert ckpt["step"] == 8 and model.draft_tree and isinstance(model.draft_tree[0], tuple)
    prompt = torch.tensor([list(b"def ")])
    want = model.generate(prompt, 8).tokens
    assert torch.equal(model.generate(prompt, 8, speculative=True).tokens, want)
    assert cli_main(["generate", "--checkpoint", whole["checkpoint"], "--prompt", "def ",
                     "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == bytes(want[0].tolist()).decode(
        "utf-8", errors="replace")


def test_convert_a_trusted_checkpoint_with_the_named_globals(trained, tmp_path, capsys):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["args"]["data"] = Path(ckpt["args"]["data"])  # what other code might have written
    ckpt["extra"] = OldConfig("x", Path("/y"))
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(old)
    assert "pathlib.PosixPath" in str(e.value)
    new = tmp_path / "new.pt"
    names = ["pathlib.PosixPath", f"{__name__}.OldConfig"]
    assert cli_main(["convert-checkpoint", str(old), str(new), "--allow", *names]) == 0
    assert "dropped entries: extra" in capsys.readouterr().out
    converted = read_checkpoint(new)
    assert converted["args"]["data"] == str(ckpt["args"]["data"]) and "extra" not in converted
    a, _ = load_model(str(trained))
    b, _ = load_model(str(new))
    x = torch.randint(0, 256, (2, 10))
    assert torch.equal(a(x).logits, b(x).logits)
    # allowing too little is refused again, naming what is still missing
    assert cli_main(["convert-checkpoint", str(old), str(new), "--allow", names[0]]) == 2
    assert "OldConfig" in capsys.readouterr().err
    assert cli_main(["convert-checkpoint", str(old), str(new), "--allow", "no.such.Name"]) == 2
    assert "--allow 'no.such.Name'" in capsys.readouterr().err


def test_write_refuses_what_the_safe_loader_would(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]: a .*Evil"):
        write_checkpoint(tmp_path / "c.pt", {"model": {}, "config": Evil(tmp_path / "m")})
    assert not (tmp_path / "c.pt").exists()
    write_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(2)},
                                         "config": {"p": Path("a")}})
    assert read_checkpoint(tmp_path / "c.pt")["config"] == {"p": "a"}


def test_a_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut.pt' is truncated \(1000 bytes"):
        load_model(str(cut))
    cut.write_bytes(b"no zip archive" * 100)  # not torch.save's format at all
    with pytest.raises(ValueError, match="is not a checkpoint written by `mtp-ext train`"):
        load_model(str(cut))


def test_data_folder_links_out_of_it_are_refused(corpus, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not for training\n" * 10)
    (corpus / "inside.txt").symlink_to(corpus / "f0.py")  # a link inside the folder: read
    load_corpus(str(corpus))
    (corpus / "link.txt").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the data folder"):
        load_corpus(str(corpus))


def test_data_files_over_the_size_limit_are_refused(corpus, monkeypatch):
    from mtp_ext.training import data
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ValueError, match="GiB a data file may have"):
        load_corpus(str(corpus))


def test_a_corrupt_bpe_cache_is_a_clear_error(corpus, tmp_path):
    pytest.importorskip("tokenizers")
    from mtp_ext.training import tokenizer as tokenizers
    parts = [p.read_bytes() for p in sorted(corpus.glob("*.py"))]
    tokenizers.for_training("bpe", 300, parts, tmp_path, log=lambda *_: None)
    (cache,) = tmp_path.glob("tokenizer-bpe-300-*.json")
    cache.write_text("{not json")
    with pytest.raises(ValueError, match=f"{cache.name}.*delete it"):
        tokenizers.for_training("bpe", 300, parts, tmp_path, log=lambda *_: None)
