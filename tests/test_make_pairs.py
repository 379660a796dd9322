"""make_pairs.py: the JSONL schema, playable videos, cached latents and embeddings, the teacher cache."""
import json
import os

import torch
from safetensors.torch import load_file

import models
from conftest import PROMPTS, TINY_SAMPLING, run, run_and_kill


def test_pairs_schema_videos_and_latents(pairs):
    out, proc = pairs
    rows = models.read_jsonl(os.path.join(out, "pairs.jsonl"))
    assert [r["prompt"] for r in rows] == PROMPTS and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "prompt", "seed", "round", "sample", "winner", "loser", "text_emb"}
        assert r["round"] == 0 and r["sample"] == 0
        assert r["winner"]["model"] == "teacher" and r["loser"]["model"] == "student"
        for side in ("winner", "loser"):
            video = models.read_video(os.path.join(out, r[side]["video"]))
            assert video.shape == (4, 16, 16, 3)
            assert load_file(os.path.join(out, r[side]["latents"]))["latents"].shape == (4, 4, 8, 8)  # (C, F, h, w): the tiny VAE halves
        emb = load_file(os.path.join(out, r["text_emb"]))["text_emb"]
        assert emb.shape == (16, 8)  # (L, D) of the tiny text encoder
        w = load_file(os.path.join(out, r["winner"]["latents"]))["latents"]
        l = load_file(os.path.join(out, r["loser"]["latents"]))["latents"]
        assert not torch.allclose(w, l)  # the pruned student differs from the teacher
    info = json.load(open(os.path.join(out, "pairs.args.json")))
    assert info["teacher_videos_made"] == 4 and info["settings"]["steps"] == 3 and info["student_removed"]
    assert "4 pairs" in proc.stdout


def test_second_run_makes_no_teacher_video(pairs, vc2_dir, pruned, prompts_file, tmp_path):
    out, _ = pairs
    cache = os.path.join(out, "teacher_cache")
    stamps = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)}
    out2 = tmp_path / "again"
    proc = run("make_pairs.py", "--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--prompts", prompts_file,
               "--out-dir", out2, "--teacher-cache", cache, *TINY_SAMPLING)
    assert "0 made, 4 reused" in proc.stdout
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)} == stamps
    a = models.read_jsonl(os.path.join(out, "pairs.jsonl"))
    b = models.read_jsonl(str(out2 / "pairs.jsonl"))
    assert [r["seed"] for r in a] == [r["seed"] for r in b]  # seeds follow the prompt, not the run
    for ra, rb in zip(a, b):  # the student's videos are regenerated and identical (same seed, same noise)
        la = load_file(os.path.join(out, ra["loser"]["latents"]))["latents"]
        lb = load_file(str(out2 / rb["loser"]["latents"]))["latents"]
        assert torch.allclose(la, lb, rtol=1e-4, atol=1e-4)  # batches of 3 vs 8: float rounding


def test_student_equal_to_teacher_gives_identical_pairs(vc2_dir, prompts_file, tmp_path):
    """Same seed, same initial noise: with no --student the loser is the teacher's own video."""
    run("make_pairs.py", "--model", "vc2", "--teacher", vc2_dir, "--prompts", prompts_file, "--out-dir", tmp_path,
        "--eta", "1.0", *TINY_SAMPLING)
    for r in models.read_jsonl(str(tmp_path / "pairs.jsonl")):
        w = load_file(str(tmp_path / r["winner"]["latents"]))["latents"]
        l = load_file(str(tmp_path / r["loser"]["latents"]))["latents"]
        assert torch.allclose(w, l, rtol=1e-4, atol=1e-4)


def test_missing_prompt_file_is_a_one_line_error(vc2_dir, tmp_path):
    proc = run("make_pairs.py", "--model", "vc2", "--teacher", vc2_dir, "--prompts", tmp_path / "none.txt",
               "--out-dir", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "none.txt: no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_samples_per_prompt_and_rounds_get_fresh_seeds(vc2_dir, pruned, prompts_file, tmp_path):
    """K pairs a prompt, each from its own seed; another round gives every prompt new seeds (and new
    teacher videos), so a round never trains on the previous round's winners."""
    import make_pairs

    rows = {}
    for r in (1, 2):
        make_pairs.main(make_pairs.get_parser().parse_args([
            "--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--prompts", prompts_file, "--out-dir",
            str(tmp_path / f"r{r}"), "--teacher-cache", str(tmp_path / "cache"), "--samples-per-prompt", "2",
            "--round", str(r), *TINY_SAMPLING]))
        rows[r] = models.read_jsonl(str(tmp_path / f"r{r}" / "pairs.jsonl"))
    for r in (1, 2):
        assert len(rows[r]) == 2 * len(PROMPTS) and len({x["id"] for x in rows[r]}) == len(rows[r])
        assert sorted((x["prompt"], x["sample"]) for x in rows[r]) == sorted((p, k) for p in PROMPTS for k in (0, 1))
        assert all(x["round"] == r for x in rows[r])
    seeds = [x["seed"] for r in (1, 2) for x in rows[r]]
    assert len(set(seeds)) == len(seeds)  # every pair of every round starts from its own noise
    assert len(os.listdir(tmp_path / "cache")) == 2 * len(seeds)  # a teacher video (mp4 + latents) each
    w = [load_file(str(tmp_path / "r1" / x["winner"]["latents"]))["latents"] for x in rows[1][:2]]
    assert not torch.allclose(w[0], w[1])  # the same prompt's two samples differ


def test_killed_run_resumes_to_the_uninterrupted_pairs(pairs, vc2_dir, pruned, prompts_file, tmp_path, capsys):
    """SIGKILL after the first batch, rerun (in this process: cheaper): the rerun skips the finished batch and
    ends with the pairs of an uninterrupted run of the same command (the `pairs` fixture): a byte-identical
    JSONL, equal tensors, byte-identical videos."""
    import make_pairs

    ref, _ = pairs
    out = tmp_path / "pairs"
    argv = ["--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--prompts", prompts_file, "--out-dir", out,
            "--batch-size", "3", *TINY_SAMPLING]  # the fixture's command: batches [0, 1, 2] and [3]
    run_and_kill("make_pairs.py", *argv, when=(out / "latents" / "000002_student.safetensors").exists)
    assert not (out / "pairs.jsonl").exists()
    models.quiet_libraries()
    make_pairs.main(make_pairs.get_parser().parse_args(list(map(str, argv))))
    stdout = capsys.readouterr().out
    assert "resuming: 3 of 4 pairs already done" in stdout and "1 made, 3 reused" in stdout
    assert (out / "pairs.jsonl").read_bytes() == open(os.path.join(ref, "pairs.jsonl"), "rb").read()
    for r in models.read_jsonl(str(out / "pairs.jsonl")):
        for path in (r["winner"]["latents"], r["loser"]["latents"], r["text_emb"]):
            a, b = load_file(os.path.join(ref, path)), load_file(str(out / path))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for path in (r["winner"]["video"], r["loser"]["video"]):
            assert (out / path).read_bytes() == open(os.path.join(ref, path), "rb").read()
    a, b = (json.load(open(os.path.join(d, "pairs.args.json"))) for d in (ref, out))
    for info in (a, b):  # the run's own: where it wrote, and which teacher videos it sampled itself
        info["args"].pop("out_dir"), info.pop("teacher_videos_made"), info.pop("teacher_videos_reused")
    assert a == b
