"""online_loop.py: the whole chain for 2 rounds on tiny models, resuming, the schedule, and errors."""
import dataclasses
import json
import os
import shutil

import pytest

import models
import online_loop
from conftest import run

TOY_PROMPTS = ["a red square moving left quickly", "a blue circle moving up slowly",
               "a green triangle moving right quickly", "a yellow square moving down slowly"]


def loop_args(model, teacher_args, work, prompts):
    # the toy judge scores any video against toy prompts; 3 DDIM steps of 4 frames at 16x16; random tiny
    # models make random winners, so --no-filter keeps every pair and every round trains
    return ["--model", model, *teacher_args, "--work-dir", work, "--prompt-pool", prompts, "--probe-prompts", prompts,
            "--eval-prompts", prompts, "--rounds", "2", "--final-ratio", "0.6", "--train-steps", "2",
            "--train-batch-size", "2", "--num-probe", "2", "--steps", "3", "--frames", "4", "--height", "16",
            "--width", "16", "--probe-steps", "2", "--importance", "output", "--no-filter", "--scorer", "toy",
            "--lr", "1e-3"]


@pytest.fixture(scope="module")
def toy_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("loop") / "prompts.txt"
    path.write_text("\n".join(TOY_PROMPTS) + "\n")
    return str(path)


def test_two_rounds_on_tiny_vc2_and_resume(vc2_dir, toy_prompts, tmp_path):
    work = str(tmp_path / "work")
    args = loop_args("vc2", ["--teacher", vc2_dir], work, toy_prompts)
    i = args.index("--train-steps")
    args[i + 1:i + 2] = ["1", "2"]  # one per round
    out = run("online_loop.py", *args).stdout
    assert "| round-0 | teacher |" in out and "| round-2 | student |" in out
    rows = models.read_json(os.path.join(work, "results.json"))["rows"]
    students = [r for r in rows if r["model"] == "student"]
    teacher = next(r for r in rows if r["model"] == "teacher")
    assert [r["round"] for r in students] == ["round-1", "round-2"]
    assert teacher["params"] > students[0]["params"] > students[1]["params"]  # shrinks each round
    assert students[1]["params"] <= 0.6 * teacher["params"] and students[1]["flops"] < teacher["flops"]
    assert all(r["pairs_made"] == r["pairs_kept"] == len(TOY_PROMPTS) for r in students)  # --no-filter
    for k in (1, 2):  # every step's file is there and has its schema
        rd = os.path.join(work, f"round-{k}")
        meta = models.read_student_meta(os.path.join(rd, "student.safetensors"))
        assert meta["round"] == str(k) and meta["stage"] == "redpo"
        assert len(open(os.path.join(rd, "student.log.jsonl")).readlines()) == k  # --train-steps 1 2: round k's
        assert models.read_student_meta(os.path.join(rd, "pruned.safetensors"))["stage"] == "prune"
        models.read_jsonl(os.path.join(rd, "pairs", "pairs.jsonl"), required=("winner.latents", "loser.video"))
        models.read_jsonl(os.path.join(rd, "pairs", "filtered.jsonl"), required=("scores.winner", "S.loser", "targets"))
        assert models.read_prompts(os.path.join(rd, "prompts.txt"))
        assert {m["label"] for m in models.read_json(os.path.join(rd, "eval", "report.json"))["models"]} == {"pruned", "student"}
    # round 2 prunes round 1's trained student: its removed layers include round 1's
    r1 = models.read_student_meta(os.path.join(work, "round-1", "pruned.safetensors"))["removed"]
    assert set(r1) < set(models.read_student_meta(os.path.join(work, "round-2", "pruned.safetensors"))["removed"])
    teacher_cache = sorted(os.listdir(os.path.join(work, "teacher_cache")))

    # interrupted mid-round 2: its pairs and later files are gone; a rerun redoes only those
    stamps = {f: os.stat(os.path.join(work, "round-1", f)).st_mtime_ns for f in ("pruned.safetensors", "student.safetensors")}
    for part in ("pairs", "eval"):
        shutil.rmtree(os.path.join(work, "round-2", part))
    os.remove(os.path.join(work, "round-2", "student.safetensors"))
    os.remove(os.path.join(work, "results.json"))
    out = run("online_loop.py", *args).stdout
    for step in ("evaluate teacher", "prune", "probe evaluation", "curate prompts"):
        assert f"[skip] {step}" in out
    assert out.count("[run ] make pairs") == 1 and out.count("[run ] redpo") == 1 and out.count("[run ] evaluate:") == 1
    assert {f: os.stat(os.path.join(work, "round-1", f)).st_mtime_ns for f in stamps} == stamps
    assert sorted(os.listdir(os.path.join(work, "teacher_cache"))) == teacher_cache  # nothing new for the teacher
    assert os.path.exists(os.path.join(work, "results.json"))

    proc = run("online_loop.py", *args[:-2], "--lr", "5e-4", check=False)  # other arguments, same work dir
    assert proc.returncode == 2 and "--lr=" in proc.stderr and "Traceback" not in proc.stderr


def test_one_shot_and_animatediff(animatediff_dirs, toy_prompts, tmp_path):
    work = str(tmp_path / "work")
    sd, adapter = animatediff_dirs
    out = run("online_loop.py", *loop_args("animatediff", ["--teacher", sd, "--motion-adapter", adapter], work,
                                           toy_prompts), "--no-online", "--loss", "sft", "--train-steps", "1", "2").stdout
    assert "| oneshot | student |" in out and "round-1" not in out
    assert "redpo: wrote" in open(os.path.join(work, "oneshot", "logs", "redpo.log")).read()  # the stage's output
    rows = models.read_json(os.path.join(work, "results.json"))["rows"]
    assert rows[-1]["params"] <= 0.6 * rows[0]["params"]
    log = [json.loads(ln) for ln in open(os.path.join(work, "oneshot", "student.log.jsonl"))]
    assert len(log) == 2  # one-shot trains the last round's --train-steps (at the final size, as the online loop)
    trained = json.loads(models.read_student_meta(os.path.join(work, "oneshot", "student.safetensors"))["args"])
    assert trained["loss"] == "sft" and trained["sft_cfg"] == 0.0  # real families: the paper's conditional SFT
    assert trained["lr"] == 1e-3
    pruned = json.loads(models.read_student_meta(os.path.join(work, "oneshot", "pruned.safetensors"))["args"])
    assert pruned["keep_temporal_convs"] == 0  # real families: the paper's pruning, no kept layers


def test_masks_from_another_run_give_the_same_architecture(vc2_dir, toy_prompts, tmp_path):
    """--masks-from: every round removes exactly the other run's layers (no importance measured), so
    runs that compare losses share one architecture; the one-shot arm takes the other's oneshot mask."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("online_loop.py", *loop_args("vc2", ["--teacher", vc2_dir], a, toy_prompts), "--eval-rounds", "last")
    out = run("online_loop.py", *loop_args("vc2", ["--teacher", vc2_dir], b, toy_prompts), "--loss", "sft",
              "--masks-from", a, "--eval-rounds", "none").stdout
    for k in (1, 2):
        ma = models.read_student_meta(os.path.join(a, f"round-{k}", "pruned.safetensors"))
        mb = models.read_student_meta(os.path.join(b, f"round-{k}", "pruned.safetensors"))
        assert ma["removed"] == mb["removed"] and json.loads(mb["args"])["layers_from"].startswith(a)
        assert json.loads(mb["importance"]) == []  # nothing measured
    assert os.path.exists(os.path.join(a, "round-2", "eval", "report.json"))
    assert not os.path.exists(os.path.join(a, "round-1", "eval")) and not os.path.exists(os.path.join(b, "round-0"))
    assert "V.I.P. finished" in out
    proc = run("online_loop.py", *loop_args("vc2", ["--teacher", vc2_dir], str(tmp_path / "c"), toy_prompts),
               "--masks-from", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_isolate_runs_a_step_as_its_own_process_and_logs_it(tmp_path, capsys):
    marker, log = str(tmp_path / "arch.txt"), str(tmp_path / "logs" / "prune.log")
    argv = ["prune.py", "--model", "toy", "--architecture-only"]
    assert online_loop.run_step("count", marker, argv, log, isolate=True)
    lines, out = open(log).read().splitlines(), capsys.readouterr().out
    assert any("candidate" in ln for ln in lines) and all("       " + ln in out for ln in lines)  # echoed, indented
    open(marker, "w").close()
    assert not online_loop.run_step("count", marker, argv, log, isolate=True)  # its file exists: skipped
    with pytest.raises(models.UserError, match="exit code 2; its log is"):
        online_loop.run_step("bad", str(tmp_path / "none"), ["prune.py", "--model", "toy"], log, isolate=True)


def test_budgets_reach_the_final_ratio():
    toy, ad = models.get_family("toy"), models.get_family("animatediff")
    for schedule in ("linear", "geometric"):
        b = models.round_budgets(ad, (), 3, 0.325, schedule)
        assert len(b) == 3 and b[-1] == pytest.approx(0.325) and b[0] > b[1] > b[2]
    cut = 1 - ad.final_ratio
    assert models.round_budgets(ad) == pytest.approx([1 - cut / 3, 1 - cut * 2 / 3, ad.final_ratio])  # the paper's 3, linear
    assert models.round_budgets(toy) == [0.7, 0.6]  # the toy's own (toy/RESULTS.md row 55)
    assert models.round_budgets(toy, schedule="linear") == pytest.approx([0.8, 0.6])  # the schedule as before it
    assert models.round_budgets(toy, rounds=3) == pytest.approx([1 - 0.4 / 3, 1 - 0.8 / 3, 0.6])
    assert models.round_budgets(toy, (0.9, 0.5, 0.4)) == [0.9, 0.5, 0.4] == models.round_budgets(ad, [0.9, 0.5, 0.4])


def test_learning_rate_per_round():
    lr = lambda family, k, values=(): online_loop.per_round(list(values) or [models.get_family(family).lr], k)  # noqa: E731
    assert [lr("toy", k) for k in (1, 2, 3)] == [1e-4] * 3  # the family's default in every round
    assert [lr("vc2", k) for k in (1, 2)] == [6e-6, 6e-6] and lr("animatediff", 3) == 1e-5
    assert [lr("toy", k, [3e-5, 1e-4]) for k in (1, 2, 3)] == [3e-5, 1e-4, 1e-4]  # the last one repeats
    assert [lr("toy", k, [2e-5]) for k in (1, 2)] == [2e-5, 2e-5]
    assert [lr("vc2", k, [1e-6, 2e-6, 3e-6]) for k in (1, 2, 3, 4)] == [1e-6, 2e-6, 3e-6, 3e-6]


def test_a_work_dir_recorded_before_a_flag_existed_resumes_with_its_default(tmp_path):
    record = tmp_path / "loop.args.json"
    args = online_loop.get_parser().parse_args([])
    online_loop.check_work_dir(args, str(record))
    old = json.loads(record.read_text())
    assert old["sft_on"] == []  # the family's
    del old["sft_on"]  # a work dir made before --sft-on existed
    record.write_text(json.dumps(old))
    online_loop.check_work_dir(args, str(record))  # resumes: it was run with the default
    both = online_loop.get_parser().parse_args(["--sft-on", "both"])
    with pytest.raises(models.UserError, match=r"made with --sft-on=\[\], not \['both'\]"):
        online_loop.check_work_dir(both, str(record))
    with pytest.raises(models.UserError, match=r"made with --seed=0, not 1"):
        online_loop.check_work_dir(online_loop.get_parser().parse_args(["--seed", "1"]), str(record))


def test_a_work_dir_recorded_with_schedule_linear_resumes_where_that_is_the_default(tmp_path):
    """Before the toy had budgets of its own, the default --schedule was recorded as "linear": for a family without
    budgets that is today's "" and resumes; for the toy it was another round 1 and is refused."""
    record = tmp_path / "loop.args.json"
    for model, ok in (("animatediff", True), ("vc2", True), ("toy", False)):
        args = online_loop.get_parser().parse_args(["--model", model])
        models.write_json(str(record), {**vars(args), "schedule": "linear"})
        if ok:
            online_loop.check_work_dir(args, str(record))
            with pytest.raises(models.UserError, match=r"made with --schedule='linear', not 'geometric'"):
                online_loop.check_work_dir(online_loop.get_parser().parse_args(["--model", model, "--schedule",
                                                                                 "geometric"]), str(record))
        else:
            with pytest.raises(models.UserError, match=r"made with --schedule='linear', not ''"):
                online_loop.check_work_dir(args, str(record))


def test_missing_prompt_file_is_a_one_line_error(tmp_path):  # real families' folders: test_real_defaults.py
    proc = run("online_loop.py", "--prompt-pool", tmp_path / "none.txt", "--work-dir", tmp_path / "w", check=False)
    assert proc.returncode == 2 and "none.txt: no such file" in proc.stderr and not (tmp_path / "w").exists()


def test_negative_budget_flags_are_refused(tmp_path):
    for flag in ("--max-pair-prompts", "--samples-per-prompt", "--train-steps", "--eval-samples", "--guard"):
        args = online_loop.get_parser().parse_args([flag, "-1", "--work-dir", str(tmp_path / "w")])
        with pytest.raises(models.UserError, match=f"{flag} must be >= 0"):
            online_loop.main(args)
    for bad, match in ((["--lr", "1e-4", "0"], r"--lr must be > 0 \(got 0.0001 0\)"),
                       (["--interpolate", "0.5", "0"], r"--interpolate must be in \(0, 1\] \(got 0.5 0\)"),
                       (["--final-ratio", "1.5"], r"--final-ratio must be in \(0, 1\) \(got 1.5\)"),
                       (["--rounds", "-1"], r"--rounds must be >= 0 \(0 = the default\) \(got -1\)"),
                       (["--budgets", "0.6", "0.7"], r"--budgets must be decreasing, in \(0, 1\), without --rounds, "
                                                     r"--final-ratio, --schedule \(got 0.6 0.7\)"),
                       (["--budgets", "0.7", "0.7"], r"--budgets must be decreasing.* \(got 0.7 0.7\)"),
                       (["--budgets", "1", "0.6"], r"--budgets must be decreasing.* \(got 1 0.6\)"),
                       (["--budgets", "1.5", "1.2"], r"--budgets must be decreasing.* \(got 1.5 1.2\)"),  # not --final-ratio
                       (["--budgets", "0.7", "0.6", "--schedule", "linear"], r"--budgets must be .*without --rounds.* \(got 0.7 0.6\)")):
        with pytest.raises(models.UserError, match=match):
            online_loop.main(online_loop.get_parser().parse_args([*bad, "--work-dir", str(tmp_path / "w")]))
    args = online_loop.get_parser().parse_args(["--sft-branches", "--sft-cfg", "0", "--work-dir", str(tmp_path / "w")])
    with pytest.raises(models.UserError, match=r"--sft-branches needs guided SFT \(--sft-cfg > 0\)"):
        online_loop.main(args)
    assert not (tmp_path / "w").exists()


def test_the_embedded_toy_loop_with_reduced_settings(tmp_path, monkeypatch, capsys):
    """`python online_loop.py` on the shipped toy teacher, with its own prompt files and the toy judge (in this
    process, as the loop runs its stages, so that the family's per-round steps can be made tiny: 1, then 2)."""
    from toy import world

    evalp = tmp_path / "eval.txt"
    evalp.write_text("\n".join(world.eval_prompts()[:3]) + "\n")
    monkeypatch.setitem(models.FAMILIES, "toy", dataclasses.replace(models.FAMILIES["toy"], train_steps=(1, 2)))
    argv = list(map(str, [
        "--work-dir", tmp_path / "work", "--eval-prompts", evalp, "--steps", "4", "--probe-steps", "2", "--num-probe",
        "2", "--probe-seeds", "1", "2", "--max-pair-prompts", "4", "--eval-samples", "1", "--no-filter", "--guard",
        "0.05", "--lr", "3e-5", "1e-4", "--lr-schedule", "cosine", "constant", "--train-layers", "temporal", "all", "--sft-on", "both", "winners",
        "--keep-by", "alone", "--loss", "sft", "redpo", "--beta", "0", "300", "--interpolate", "0.5", "1"]))
    online_loop.main(online_loop.get_parser().parse_args(argv))
    out = capsys.readouterr().out
    assert "V.I.P. finished" in out and "| round-2 | student |" in out
    for k in (1, 2):  # no --train-steps: each round trains the family's steps for that round
        assert len(open(tmp_path / "work" / f"round-{k}" / "student.log.jsonl").readlines()) == k
    rows = models.read_json(str(tmp_path / "work" / "results.json"))["rows"]
    assert [r["model"] for r in rows] == ["teacher", "pruned", "student", "pruned", "student"]
    assert rows[-1]["params"] <= models.get_family("toy").final_ratio * rows[0]["params"]
    assert 0.6 * rows[0]["params"] < rows[1]["params"] <= 0.7 * rows[0]["params"]  # round 1: the toy's budgets (0.7, 0.6)
    assert all(0 <= r[d] <= 1 for r in rows for d in models.DIMS)
    assert rows[2]["pairs_made"] == 8  # the toy's default: 2 pairs a curated prompt, each from its own seed
    trained = json.loads(models.read_student_meta(str(tmp_path / "work" / "round-1" / "student.safetensors"))["args"])
    assert trained["sft_cfg"] == models.get_family("toy").sft_cfg == 6.0  # the toy's guided SFT reaches redpo
    assert trained["sft_branches"] == models.get_family("toy").sft_branches  # and its SFT on the branches
    second = json.loads(models.read_student_meta(str(tmp_path / "work" / "round-2" / "student.safetensors"))["args"])
    assert (trained["lr"], second["lr"]) == (3e-5, 1e-4)  # --lr per round reaches each round's redpo
    assert (trained["train_layers"], second["train_layers"]) == ("temporal", "all")  # --train-layers per round too
    assert (trained["sft_on"], second["sft_on"]) == ("both", "winners")  # and --sft-on
    assert (trained["lr_schedule"], second["lr_schedule"]) == ("cosine", "constant")  # and --lr-schedule
    assert (trained["loss"], second["loss"]) == ("sft", "redpo")  # and --loss
    assert (trained["interpolate"], second["interpolate"]) == (0.5, 1.0)  # and --interpolate
    assert (trained["beta"], second["beta"]) == (models.get_family("toy").beta, 300.0)  # and --beta (0: the family's)
    assert "loss sft redpo," in open(tmp_path / "work" / "results.md").read()
    pruned = models.read_student_meta(str(tmp_path / "work" / "round-2" / "pruned.safetensors"))
    assert json.loads(pruned["args"])["keep_temporal_convs"] == models.get_family("toy").keep_temporal_convs == 1
    assert json.loads(pruned["args"])["keep_by"] == "alone"  # the loop's --keep-by reaches prune.py
    first = models.read_student_meta(str(tmp_path / "work" / "round-1" / "pruned.safetensors"))
    assert (json.loads(first["args"])["probe_seeds"], json.loads(pruned["args"])["probe_seeds"]) == (1, 2)  # per round
    assert len(json.loads(pruned["importance"])[0]["by_seed_set"]) == 2
    assert sum(".temp_convs." in p for p in pruned["removed"]) <= 10  # the last of the 11 is never removed
    summary = models.read_json(str(tmp_path / "work" / "round-1" / "pairs" / "filtered.json"))
    assert summary["guard"] == 0.05 and "winner_worse_on_a_dim" in summary["counts"]  # --guard reaches the filter
    # a rerun with nothing changed reuses every round's student (paths, logging and the like are not compared)
    made = [os.stat(tmp_path / "work" / f"round-{k}" / "student.safetensors").st_mtime_ns for k in (1, 2)]
    online_loop.main(online_loop.get_parser().parse_args(argv))
    assert made == [os.stat(tmp_path / "work" / f"round-{k}" / "student.safetensors").st_mtime_ns for k in (1, 2)]
    assert "[run ] redpo" not in capsys.readouterr().out
    # a family default changes after the work dir was made: a rerun refuses the student trained otherwise, by name
    toy = models.FAMILIES["toy"]
    monkeypatch.setitem(models.FAMILIES, "toy", dataclasses.replace(toy, train_steps=(1, 3)))
    with pytest.raises(models.UserError, match="round-2/student.safetensors: trained with --max-steps 2, not 3;"):
        online_loop.main(online_loop.get_parser().parse_args(argv))
    monkeypatch.setitem(models.FAMILIES, "toy", dataclasses.replace(toy, beta=50.0))
    with pytest.raises(models.UserError, match=f"round-1/student.safetensors: trained with --beta {toy.beta}, not 50.0;"):
        online_loop.main(online_loop.get_parser().parse_args(argv))
    # and a pruned model made otherwise (a pruning default changed): refused by name before anything is redone
    monkeypatch.setitem(models.FAMILIES, "toy", dataclasses.replace(toy, keep_temporal_convs=2))
    with pytest.raises(models.UserError, match="round-1/pruned.safetensors: pruned with --keep-temporal-convs 1, not 2;"):
        online_loop.main(online_loop.get_parser().parse_args(argv))
    assert made == [os.stat(tmp_path / "work" / f"round-{k}" / "student.safetensors").st_mtime_ns for k in (1, 2)]


def test_work_dir_recorded_with_one_value_of_a_per_round_flag_still_resumes(tmp_path):
    """--train-steps, --loss and --beta went per round: a record's single value equals the same value given once now;
    a recorded 0 (the default: the family's) equals none given, and an explicit 0 is the default too."""
    record = str(tmp_path / "loop.args.json")
    parse = lambda *argv: online_loop.get_parser().parse_args([*argv, "--work-dir", str(tmp_path)])
    old = vars(parse())
    for key, was, now, ok in (("train_steps", 0, [], True), ("train_steps", 60, ["60"], True),
                              ("train_steps", 60, ["60", "180"], False), ("train_steps", 0, ["60"], False),
                              ("train_steps", [0], [], True), ("train_steps", [], ["0", "0"], True),
                              ("train_steps", [0, 180], ["0", "180"], True), ("train_steps", [60], [], False),
                              ("loss", "redpo", [], True), ("loss", "sft", ["sft"], True), ("loss", "sft", [], False),
                              ("loss", "redpo", ["sft", "redpo"], False), ("beta", 0.0, [], True),
                              ("beta", 500.0, ["500"], True), ("beta", 500.0, [], False), ("beta", 0.0, ["0", "0"], True)):
        models.write_json(record, {**old, key: was})
        args = parse(*([f"--{key.replace('_', '-')}", *now] if now else []))
        if ok:
            online_loop.check_work_dir(args, record)
        else:
            with pytest.raises(models.UserError, match=f"made with --{key.replace('_', '-')}="):
                online_loop.check_work_dir(args, record)
