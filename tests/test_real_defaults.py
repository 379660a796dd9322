"""Real families from the documented command: `python online_loop.py --model vc2 --rounds 4` takes the paper's
reward (VideoScore), the teacher and the scorer from ./ckpt and the prompts from prompts/; a missing folder is a
one-line error saying how to make it; tools/make_prompts.py writes the shipped prompt files."""
import os
import subprocess
import sys

import pytest

import models
import online_loop
import tiny
from conftest import ROOT
from test_videoscore import make_tiny_videoscore

# only what makes the run small: tiny videos, 1 ReDPO step, cheap importance, every pair kept (random tiny
# models make random winners), 2 curated prompts, small probe / eval files; nothing about teacher or scorer
SMALL = ["--steps", "2", "--frames", "4", "--height", "16", "--width", "16", "--train-steps", "1",
         "--train-batch-size", "2", "--importance", "output", "--probe-seeds", "1", "--no-filter",
         "--max-pair-prompts", "2", "--num-probe", "2", "--probe-prompts", "probe.txt", "--eval-prompts", "eval.txt"]
PROBE = ["a red fox running quickly in a snowy forest", "a white sailboat drifting slowly on a calm lake at dawn"]
EVAL = ["a yellow school bus driving fast along a mountain road, tracking shot"]


def loop(cwd, *args):
    """online_loop.py as a process in `cwd` (conftest.run runs in the repository)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "online_loop.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def main_error(cwd, monkeypatch, *args):
    """The one-line UserError online_loop's main raises for `args`, run in `cwd` (no process)."""
    monkeypatch.chdir(cwd)
    with pytest.raises(models.UserError) as e:
        online_loop.main(online_loop.get_parser().parse_args(list(args)))
    assert "\n" not in str(e.value) and not (cwd / "runs").exists()  # nothing started
    return str(e.value)


def test_vc2_runs_from_the_documented_command(tmp_path):
    tiny.make_vc2(str(tmp_path / "ckpt" / "vc2"), layers_per_block=1)  # 1 layer a block: fewer layers to rank
    make_tiny_videoscore(str(tmp_path / "ckpt" / "VideoScore"))
    (tmp_path / "probe.txt").write_text("\n".join(PROBE) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(EVAL) + "\n")
    proc = loop(tmp_path, "--model", "vc2", "--rounds", "4", *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "V.I.P. finished" in proc.stdout and "| round-4 | student |" in proc.stdout

    work = tmp_path / "runs" / "vip"  # the default work dir, relative to the current directory
    results = models.read_json(str(work / "results.json"))
    assert results["args"]["scorer"] == "" and results["args"]["teacher"] == ""  # nothing passed ...
    resolved = results["resolved"]  # ... the family's defaults used
    assert (resolved["scorer"], resolved["scorer_path"], resolved["teacher"]) == ("videoscore", "ckpt/VideoScore",
                                                                                 "ckpt/vc2")
    assert resolved["prompt_pool"] == os.path.join(ROOT, "prompts", "pool.txt")
    rows = results["rows"]
    assert [(r["round"], r["model"]) for r in rows] == [("round-0", "teacher")] + [
        (f"round-{k}", m) for k in range(1, 5) for m in ("pruned", "student")]
    params = [r["params"] for r in rows if r["model"] == "student"]
    assert params == sorted(params, reverse=True) and params[-1] <= 0.64 * rows[0]["params"]  # paper's 63.8 %
    assert all(r["pairs_made"] == r["pairs_kept"] == 2 for r in rows if r["model"] == "student")
    assert "scorer videoscore" in (work / "results.md").read_text()

    for k in range(1, 5):  # every stage got the conventional folders, made absolute
        rd = work / f"round-{k}"
        report = models.read_json(str(rd / "eval" / "report.json"))
        assert report["scorer"]["name"] == "videoscore"
        assert report["scorer"]["path"] == str(tmp_path / "ckpt" / "VideoScore")
        assert models.read_json(str(rd / "pairs" / "filtered.json"))["args"]["scorer"] == "videoscore"
        meta = models.read_student_meta(str(rd / "student.safetensors"))
        assert meta["teacher"] == str(tmp_path / "ckpt" / "vc2")
        assert '"save_every": 100' in meta["args"]  # real runs keep a ReDPO training state to resume from
        assert all(p in models.read_prompts(os.path.join(ROOT, "prompts", "pool.txt"))
                   for p in models.read_prompts(str(rd / "prompts.txt")))  # curated from the shipped pool


def test_missing_folders_are_one_line_errors(tmp_path, monkeypatch):
    proc = loop(tmp_path, "--model", "vc2", "--rounds", "4")  # nothing in ckpt/
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("error: ckpt/vc2: not found")
    assert "python tools/convert_vc2.py --ckpt ckpt/VideoCrafter2/model.ckpt --out ckpt/vc2" in line
    assert "VideoCrafter/VideoCrafter2" in line and "ckpt/VideoScore: not found" in line
    assert not (tmp_path / "runs").exists()

    only_scorer = tmp_path / "only_scorer"  # the teacher is there, VideoScore is not
    tiny.make_vc2(str(only_scorer / "ckpt" / "vc2"))
    msg = main_error(only_scorer, monkeypatch, "--model", "vc2")
    assert msg.startswith("ckpt/VideoScore: not found") and "TIGER-Lab/VideoScore" in msg and "vc2" not in msg
    msg = main_error(only_scorer, monkeypatch, "--model", "vc2", "--scorer-path", "elsewhere/VS")
    assert msg == "elsewhere/VS: not found; pass --scorer-path"
    (only_scorer / "ckpt" / "VideoScore").mkdir()  # a folder without its files: the missing file is named
    assert "ckpt/VideoScore: missing config.json" in main_error(only_scorer, monkeypatch, "--model", "vc2")

    only_teacher = tmp_path / "only_teacher"  # VideoScore is there, the teacher is not
    (only_teacher / "ckpt").mkdir(parents=True)
    make_tiny_videoscore(str(only_teacher / "ckpt" / "VideoScore"))
    msg = main_error(only_teacher, monkeypatch, "--model", "vc2")
    assert msg.startswith("ckpt/vc2: not found") and "convert_vc2.py" in msg and "VideoScore" not in msg
    msg = main_error(only_teacher, monkeypatch, "--model", "vc2", "--teacher", "t")
    assert msg.startswith("t: not found; pass --teacher")

    msg = main_error(only_teacher, monkeypatch, "--model", "animatediff")
    assert "ckpt/sd15: not found" in msg and "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg
    assert "ckpt/animatediff-v1-5-2: not found" in msg and "guoyww/animatediff-motion-adapter-v1-5-2" in msg
    # another scorer needs no VideoScore; the toy keeps its own teacher and judge
    msg = main_error(tmp_path, monkeypatch, "--model", "vc2", "--scorer", "toy")
    assert msg.startswith("ckpt/vc2: not found") and "VideoScore" not in msg


# ----------------------------------------------------------------------------- tools/make_prompts.py
def make_prompts(out, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_prompts.py"), "--out-dir", out, *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return {name: open(os.path.join(out, f"{name}.txt")).read() for name in ("pool", "probe", "eval")}


def test_make_prompts_writes_the_shipped_files(tmp_path):
    first = make_prompts(str(tmp_path / "a"))
    assert make_prompts(str(tmp_path / "b")) == first  # deterministic
    assert first == {n: open(os.path.join(ROOT, "prompts", f"{n}.txt")).read() for n in first}  # the shipped ones
    files = {n: models.read_prompts(os.path.join(ROOT, "prompts", f"{n}.txt")) for n in first}
    assert {n: len(p) for n, p in files.items()} == {"pool": 2000, "probe": 32, "eval": 64}
    every = [p for ps in files.values() for p in ps]
    assert all(5 <= len(p.split()) <= 25 for p in every)
    assert len({p.lower() for p in every}) == len(every)  # unique within and across files
    scenes = {n: {p.split(",")[0] for p in ps} for n, ps in files.items()}  # subject, action, place
    assert not (scenes["pool"] & scenes["probe"] or scenes["pool"] & scenes["eval"] or scenes["probe"] & scenes["eval"])
    other = make_prompts(str(tmp_path / "c"), "--seed", "1", "--pool", "100", "--probe", "4", "--eval", "8")
    assert other["probe"] != first["probe"] and len(models.read_prompts(str(tmp_path / "c" / "pool.txt"))) == 100
