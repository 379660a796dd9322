"""redpo.py in long runs: a killed run resumes to the weights of an uninterrupted one; non-finite inputs and
losses stop with one line and leave no spoiled file."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
import redpo
from conftest import ROOT


def train_args(vc2_dir, pruned, pairs_file, out, *extra):
    return ["--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--pairs", pairs_file, "--out", str(out),
            "--batch-size", "2", "--lr", "1e-3", "--warmup", "3", "--log-every", "3", "--uncond-prob", "0.3", *extra]


def log_rows(out):
    """The training log without its timing fields."""
    rows = [json.loads(ln) for ln in open(os.path.splitext(out)[0] + ".log.jsonl")]
    return [{k: v for k, v in r.items() if not any(s in k for s in ("time", "second", "per_s"))} for r in rows]


def test_killed_run_resumes_to_the_uninterrupted_weights(vc2_dir, pruned, pairs, tmp_path, capsys):
    """SIGKILL a real process after a training state was saved; the same command (here in this process)
    resumes from it and ends with exactly the weights and the log of a run never stopped, and removes the state."""
    pairs_file = os.path.join(pairs[0], "pairs.jsonl")
    out, state = tmp_path / "killed.safetensors", tmp_path / "killed.state.pt"
    argv = train_args(vc2_dir, pruned, pairs_file, out, "--max-steps", "6", "--save-every", "2")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "redpo.py"), *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = 0
    while proc.poll() is None and saved < 2:
        time.sleep(0.05)
        if state.exists():
            saved = torch.load(state, weights_only=True)["step"]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not out.exists()  # killed mid-run ...
    saved = torch.load(state, weights_only=True)["step"]
    assert 2 <= saved < 6  # ... after a training state was saved

    refused = r"killed\.state\.pt: a training state made with --lr=0\.001, not 0\.002"
    with pytest.raises(models.UserError, match=refused):  # another run's state, refused before loading a model
        redpo.main(redpo.get_parser().parse_args(argv + ["--lr", "2e-3"]))

    old = torch.load(state, weights_only=True)  # as a state saved before --lr-schedule existed: it had the default
    del old["config"]["lr_schedule"]
    torch.save(old, state)
    with pytest.raises(models.UserError, match=r"killed\.state\.pt: a training state made with --lr-schedule='constant'"):
        redpo.main(redpo.get_parser().parse_args(argv + ["--lr-schedule", "cosine"]))
    capsys.readouterr()
    redpo.main(redpo.get_parser().parse_args(argv))
    assert f"redpo: resuming from step {saved} of 6" in capsys.readouterr().out and not state.exists()
    straight = tmp_path / "straight.safetensors"
    redpo.main(redpo.get_parser().parse_args(train_args(vc2_dir, pruned, pairs_file, straight, "--max-steps", "6",
                                                        "--save-every", "2")))
    a, b = load_file(str(out)), load_file(str(straight))
    before = load_file(pruned)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], before[k]) for k in a)  # and it trained
    assert log_rows(out) == log_rows(straight) and [r["step"] for r in log_rows(out)] == list(range(1, 7))
    assert not (tmp_path / "straight.state.pt").exists()


def test_non_finite_latents_are_refused_at_load(vc2_dir, pairs, tmp_path, monkeypatch, capsys):
    shutil.copytree(pairs[0], tmp_path / "pairs")
    pairs_file = str(tmp_path / "pairs" / "pairs.jsonl")
    row = json.loads(open(pairs_file).readlines()[2])
    latents = str(tmp_path / "pairs" / row["loser"]["latents"])
    poisoned = load_file(latents)
    poisoned["latents"].view(-1)[5] = float("nan")
    save_file(poisoned, latents)
    out = tmp_path / "o.safetensors"
    monkeypatch.setattr(sys, "argv", ["redpo.py", "--model", "vc2", "--teacher", vc2_dir, "--pairs", pairs_file,
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        models.cli(redpo.main, redpo.get_parser())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"{pairs_file}:3: {row['loser']['latents']} holds non-finite values" in err and not out.exists()


def test_non_finite_loss_stops_before_the_step_and_keeps_the_last_state(vc2_dir, pruned, pairs, tmp_path,
                                                                         monkeypatch):
    calls, real = [], redpo.redpo_loss

    def nan_at_step_3(*a, **k):
        calls.append(1)
        loss, stats = real(*a, **k)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr(redpo, "redpo_loss", nan_at_step_3)
    out, state = tmp_path / "s.safetensors", tmp_path / "s.state.pt"
    args = redpo.get_parser().parse_args(train_args(vc2_dir, pruned, os.path.join(pairs[0], "pairs.jsonl"), out,
                                                    "--max-steps", "4", "--save-every", "2"))
    with pytest.raises(models.UserError) as e:
        redpo.main(args)
    assert str(e.value) == (f"step 3: non-finite loss (nan) before the optimizer step; "
                            f"the last good training state is {state}")
    assert not out.exists() and torch.load(state, weights_only=True)["step"] == 2
    assert all(torch.isfinite(v).all() for v in torch.load(state, weights_only=True)["student"].values())
