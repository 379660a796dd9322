"""toy/study.py and toy/sweep.py: the interval math on hand-made numbers, the paired differences."""
import math
import os

import numpy as np
import pytest

import models
from toy import study


def test_t_interval_uses_t_with_n_minus_1_degrees_of_freedom():
    mean, half = study.t_interval([1.0, 2.0, 3.0])  # sd 1, se 1/sqrt(3), t(2) = 4.303
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    mean, half = study.t_interval([0.1, 0.3, 0.2, 0.5, 0.4])  # sd 0.1581, t(4) = 2.776
    assert mean == pytest.approx(0.3) and half == pytest.approx(2.776 * 0.158114 / math.sqrt(5), rel=1e-4)
    assert study.t_interval([0.7]) == (0.7, None)  # one seed: no interval
    assert study.t_interval([]) == (None, None)
    assert study.t_interval([0.5, None, 0.5]) == (0.5, 0.0)  # missing values are skipped
    assert study.t_interval([0.0] * 40 + [1.0] * 40)[1] == pytest.approx(1.96 * 0.503155 / math.sqrt(80), rel=1e-4)


def test_paired_differences_are_per_seed():
    a = {0: 0.60, 1: 0.70, 2: 0.65, 3: 0.55}
    b = {0: 0.50, 1: 0.62, 2: 0.60, 4: 0.99}  # seed 3 and 4 are not in both: left out
    diffs, (mean, half) = study.paired(a, b)
    assert diffs == pytest.approx([0.10, 0.08, 0.05])
    assert mean == pytest.approx(0.23 / 3) and half == pytest.approx(study.t_interval(diffs)[1])
    # pairing removes the between-seed spread that unpaired intervals would carry
    unpaired = math.hypot(study.t_interval([a[s] for s in (0, 1, 2)])[1], study.t_interval([b[s] for s in (0, 1, 2)])[1])
    assert half < unpaired


def test_formatting_of_intervals():
    assert study.fmt(0.12345, 0.0456) == "0.123 ± 0.046"
    assert study.fmt(-0.01, 0.02, sign=True) == "-0.010 ± 0.020"
    assert study.fmt(0.5, None) == "0.500" and study.fmt(None, None) == "-"


def test_judge_parts_reads_each_models_eval_videos(tmp_path):
    """The judge's parts table from real mp4 files: true clips get the prompted color and speed, clips with
    every color rotated get the speed but not the color."""
    import argparse

    import numpy as np

    import models
    from toy import world

    prompts = [p for p in world.eval_prompts() if "slowly" in p][:4] + [p for p in world.eval_prompts() if "quickly" in p][:4]
    clips = np.stack([world.render(world.parse_prompt(p), np.random.default_rng(i)) for i, p in enumerate(prompts)])
    for label, videos in (("teacher", clips), ("sft-online", clips[..., [1, 2, 0]])):
        for p, v in zip(prompts, videos):
            models.write_video(str(tmp_path / "seed-0" / "eval" / "videos" / label / f"{p}-0.mp4"), v, 8)
    table = study.judge_parts(argparse.Namespace(seeds=[0], work_dir=str(tmp_path))).splitlines()
    rows = {line.split(" | ")[0].strip("| "): [float(x) for x in line.strip(" |").split(" | ")[1:]] for line in table[2:]}
    assert list(rows) == ["teacher", "SFT online"]  # in the study's order, under the arms' names
    color, shape, speed, slow, quick = rows["teacher"]
    assert color == 1.0 and shape >= 0.75 and speed == 1.0
    assert abs(slow - world.SPEEDS["slowly"]) < 0.3 and abs(quick - world.SPEEDS["quickly"]) < 0.5
    cache = tmp_path / "seed-0" / "eval" / "judge_parts.json"  # kept per seed: --gather does not read the videos again
    assert models.read_json(str(cache))["teacher"] == pytest.approx(rows["teacher"], abs=0.005)
    models.write_json(str(cache), {"teacher": [0.5, 0.5, 0.5, 1.0, 2.0]})
    assert "| teacher | 0.50 | 0.50 | 0.50 | 1.00 | 2.00 |" in study.judge_parts(argparse.Namespace(seeds=[0], work_dir=str(tmp_path)))
    assert rows["SFT online"][0] == 0.0 and rows["SFT online"][2] == 1.0  # recolored: color lost, speed kept


def test_loop_gains_pairs_each_round_student_with_its_own_pruned_start(tmp_path):
    from models import UserError, write_json

    starts = {0: (0.70, 0.60), 1: (0.66, 0.58), 2: (0.72, 0.61)}  # seed: (round-1 pruned, round-2 pruned)
    gains = {0: (0.02, 0.05), 1: (-0.01, 0.03), 2: (0.03, 0.04)}
    dirs = []
    for seed in starts:
        rows = [{"round": "round-0", "model": "teacher", "average": 0.75}]
        for k in (0, 1):
            rows += [{"round": f"round-{k + 1}", "model": "pruned", "average": starts[seed][k]},
                     {"round": f"round-{k + 1}", "model": "student", "average": starts[seed][k] + gains[seed][k]}]
        write_json(str(tmp_path / f"s{seed}" / "results.json"), {"args": {"seed": seed}, "rows": rows})
        dirs.append(str(tmp_path / f"s{seed}"))
    # round 1 of every seed has its eval report: 4 videos a model, per-video gains +0.1, -0.1, +0.1, +0.1
    per_video = (0.1, -0.1, 0.1, 0.1)
    for seed in starts:
        videos = {"pruned": [{"prompt": "p", "sample": i, **dict.fromkeys(models.DIMS, 0.5)} for i in range(4)],
                  "student": [{"prompt": "p", "sample": i, **dict.fromkeys(models.DIMS, 0.5 + g)}
                              for i, g in reversed(list(enumerate(per_video)))]}  # matched by (prompt, sample)
        write_json(str(tmp_path / f"s{seed}" / "round-1" / "eval" / "report.json"),
                   {"models": [{"label": k, "videos": v} for k, v in videos.items()]})
    se = np.std(per_video, ddof=1) / 2  # the same for every seed, so also their root mean square
    assert study.eval_noise(str(tmp_path / "s0" / "round-1" / "eval" / "report.json")) == pytest.approx(se)
    assert study.eval_noise(str(tmp_path / "s0" / "round-2" / "eval" / "report.json")) is None
    lines = study.loop_gains(dirs).splitlines()
    assert lines[0].endswith("| seed 0 | seed 1 | seed 2 | eval se of a seed's gain / sd over seeds |")
    assert len(lines) == 4  # header, rule, two rounds
    for line, k in zip(lines[2:], (0, 1)):
        cells = [c.strip() for c in line.strip("|").split("|")]
        mean, half = study.t_interval([gains[s][k] for s in starts])
        assert cells[0] == f"round-{k + 1}" and cells[3] == study.fmt(mean, half, sign=True)
        assert cells[4:7] == [f"{gains[s][k]:+.3f}" for s in starts]
        sd = np.std([gains[s][k] for s in starts], ddof=1)
        assert cells[7] == (f"{se:.3f} / {sd:.3f}" if k == 0 else "-")  # round 2 has no eval videos here
    assert cells[3].startswith("+0.040")  # round 2: (0.05 + 0.03 + 0.04) / 3
    with pytest.raises(UserError, match="results.json: no such file"):
        study.loop_gains(dirs + [str(tmp_path / "unfinished")])


def test_a_smaller_study_reports_only_its_arms_and_their_differences(tmp_path):
    """--leave-out: gather reads only the arms kept, pairs only what it has; a misspelt arm is a one-line error."""
    import argparse

    from models import UserError, write_json

    kept = ["SFT online", "V.I.P. (ReDPO online)"]
    avg = {0: {"teacher": 0.8, "untrained-pruned": 0.60, "sft-online": 0.62, "v-i-p-redpo-online": 0.65},
           1: {"teacher": 0.8, "untrained-pruned": 0.58, "sft-online": 0.63, "v-i-p-redpo-online": 0.64}}
    for seed, by in avg.items():
        write_json(str(tmp_path / f"seed-{seed}" / "eval" / "report.json"), {"models": [
            {"label": k, "params": {"prunable": 100}, "scores": {d: {"mean": v} for d in study.DIMS}}
            for k, v in by.items()]})
    args = argparse.Namespace(seeds=[0, 1], work_dir=str(tmp_path), arms=list(study.ARMS),
                              leave_out=[n for n in study.ARMS if n not in kept])
    table, diffs, summary = study.gather(args)
    assert [r.split(" | ")[0].strip("| ") for r in table.splitlines()[2:]] == ["teacher", "untrained pruned", *kept]
    assert list(summary) == ["ReDPO - SFT, online", "SFT online - untrained pruned", "V.I.P. (ReDPO online) - untrained pruned"]
    assert summary["ReDPO - SFT, online"]["per_seed"] == pytest.approx([0.03, 0.01])
    assert len(diffs.splitlines()) == 2 + 3
    with pytest.raises(UserError, match="'SFT on-line' is no arm of the study"):
        study.study_arms(argparse.Namespace(arms=list(study.ARMS), leave_out=["SFT on-line"]))


def test_guidance_error_compares_predictions_along_the_teachers_path(tmp_path, capsys):
    """toy/guidance_error.py: the teacher's own copy is at distance 0 in every branch; a perturbed student is
    not, and its guided error is the one of eps(0) + cfg (eps(c) - eps(0)) (checked at the first step)."""
    import copy

    import torch

    import models
    from toy import guidance_error

    fam = models.get_family("toy")
    teacher = models.load_teacher(fam, "", dtype=torch.float32)
    student = copy.deepcopy(teacher.unet)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    prompts = ["a red circle moving left slowly", "a blue square moving up quickly"]
    errors = guidance_error.path_errors(teacher, [copy.deepcopy(teacher.unet), student], prompts, seeds=1)
    zero = {"cond": 0.0, "uncond": 0.0, "guided": 0.0, "by_step": [0.0] * fam.steps}
    assert errors[0] == zero
    assert all(errors[1][k] > 0 for k in ("cond", "uncond", "guided")) and errors[1]["guided"] != errors[1]["cond"]
    by_step = errors[1]["by_step"]  # the guided error step by step: all there, its mean the overall one
    assert len(by_step) == fam.steps and min(by_step) > 0 and len(set(by_step)) == fam.steps
    assert sum(by_step) / fam.steps == pytest.approx(errors[1]["guided"], rel=1e-6)
    # --path own: the teacher's copy walks the teacher's path (0 again); the perturbed student walks its own
    own = guidance_error.path_errors(teacher, [copy.deepcopy(teacher.unet), student], prompts, seeds=1, own=True)
    assert own[0] == zero
    assert all(own[1][k] > 0 for k in ("cond", "uncond", "guided")) and own[1]["guided"] != pytest.approx(errors[1]["guided"], rel=1e-6)
    one_step = lambda own=False: guidance_error.path_errors(teacher, [student], prompts, seeds=1, own=own)[0]  # noqa: E731
    steps = fam.steps
    try:  # one DDIM step: the guided error by hand from the two branches at x_T (where both paths start)
        object.__setattr__(fam, "steps", 1)
        got, got_own = one_step(), one_step(own=True)
    finally:
        object.__setattr__(fam, "steps", steps)
    assert got_own.pop("by_step") == pytest.approx(got.pop("by_step"), rel=1e-6)  # one step: both paths at x_T
    assert got_own == pytest.approx(got, rel=1e-6)
    x = models.seeded_noise([11 * 100_000 + i for i in range(2)], models.latent_shape(teacher, fam.frames, fam.height,
                                                                                         fam.width))
    teacher.scheduler.set_timesteps(1)
    t = torch.full((2,), teacher.scheduler.timesteps[0].item(), dtype=torch.long)
    cond, uncond = models.encode_prompts(teacher, prompts), models.encode_prompts(teacher, [""]).expand(2, -1, -1)
    with torch.no_grad():
        d_c = models.predict_noise(fam, student, x, t, cond) - models.predict_noise(fam, teacher.unet, x, t, cond)
        d_u = models.predict_noise(fam, student, x, t, uncond) - models.predict_noise(fam, teacher.unet, x, t, uncond)
    assert got["cond"] == pytest.approx(d_c.pow(2).mean().item(), rel=1e-4)
    assert got["guided"] == pytest.approx((d_u + fam.cfg * (d_c - d_u)).pow(2).mean().item(), rel=1e-4)
    path = tmp_path / "s.safetensors"
    models.save_student(str(path), fam, student, teacher)
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    guidance_error.main(guidance_error.get_parser().parse_args(["--students", str(path), "--prompts", str(prompt_file),
                                                                "--seeds", "1", "--per-step"]))
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"| {path} |")]
    assert len(row) == 2 and float(row[0].split("|")[4]) == pytest.approx(errors[1]["guided"], rel=1e-3)
    assert [float(c) for c in row[1].split("|")[2:-1]] == pytest.approx(by_step, abs=1e-4)  # --per-step's row


def test_study_masks_keep_the_loops_temporal_convolutions(tmp_path, monkeypatch):
    """Every prune.py call of the study's shared masks carries the toy family's --keep-temporal-convs (the
    loop's pruning rule), so the study's arms and the shipped loop prune alike; one-shot takes round 2's mask."""
    calls = []

    def fake_step(name, out, argv, log):  # records the command and writes its output, as the real step would
        calls.append([str(a) for a in argv])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write(name)

    monkeypatch.setattr(study.online_loop, "run_step", fake_step)
    masks = study.make_masks(str(tmp_path / "seed-0"), 0, [0.8, 0.6])
    keep = str(models.get_family("toy").keep_temporal_convs)
    assert keep == "1" and len(calls) == 3
    for argv in calls:
        i = argv.index("--keep-temporal-convs")
        assert argv[0] == "prune.py" and argv[i + 1] == keep
    assert [a[a.index("--target-ratio") + 1] for a in calls] == ["0.6", "0.8", "0.6"]
    with open(os.path.join(masks, "oneshot", "pruned.safetensors")) as f:
        assert f.read() == "masks: round 2"


def test_minutes_left_scales_the_unit_estimates_by_the_pace_so_far(monkeypatch):
    """Hand-made numbers: the finished masks took twice their estimate, so the waiting evaluation counts double and
    the running masks have twice their estimate less what they have run; a unit done in seconds (a rerun finding it
    finished) does not set the pace."""
    monkeypatch.setattr(study, "UNIT_SECONDS", {"masks": 300, "evaluate": 200})
    took = {(0, "masks"): 600.0, (2, "masks"): 3.0}
    left = study.minutes_left({(0, "evaluate"): []}, {(1, "masks"): 1000.0 - 100}, took, 2, now=1000.0)
    assert left == pytest.approx((2 * 200 + (2 * 300 - 100)) / 2 / 60)
    assert study.minutes_left({(0, "evaluate"): []}, {}, {(2, "masks"): 3.0}, 1, now=0.0) == pytest.approx(200 / 60)
    assert study.minutes_left({}, {(1, "masks"): 0.0}, took, 1, now=10_000.0) == 0  # overdue: nothing left, not less


def test_the_job_queue_runs_each_unit_after_what_it_reads_and_no_more_than_jobs_at_once(tmp_path, capsys):
    """--jobs: real processes (each unit here a short python that records when it ran); no unit starts before
    its prerequisites end, at most --jobs run at once, and every unit runs once. A failing unit stops the queue:
    what waits on it never starts, and the error is one line naming the unit's log."""
    import sys

    record = tmp_path / "record.txt"

    def argv_of(args, seed, unit):
        fail = "raise SystemExit(3)" if (seed, unit) == args.fail else "pass"
        return [sys.executable, "-c", f"import time; t = time.time(); time.sleep(0.15); {fail}\n"
                f"open({str(record)!r}, 'a').write(f'{seed}|{unit}|{{t}}|{{time.time()}}\\n')"]

    args = study.get_parser().parse_args(["--seeds", "0", "1", "--jobs", "2", "--work-dir", str(tmp_path / "w")])
    args.fail = None
    jobs = study.units(args)
    assert jobs[(0, "V.I.P. (ReDPO online)")] == [(0, "masks"), (0, "SFT online")]  # it copies SFT online's data
    assert jobs[(1, "SFT online")] == [(1, "masks"), (1, "SFT one-shot")]  # and SFT one-shot's teacher videos
    assert set(jobs[(1, "evaluate")]) == {(1, n) for n in study.ARMS}
    study.run_jobs(args, argv_of)
    runs = {}
    for line in record.read_text().splitlines():
        seed, unit, start, end = line.split("|")
        assert (int(seed), unit) not in runs  # each unit once
        runs[(int(seed), unit)] = (float(start), float(end))
    assert set(runs) == set(jobs) and len(jobs) == 2 * (len(study.ARMS) + 2)
    for u, deps in jobs.items():
        assert all(runs[d][1] <= runs[u][0] for d in deps), u
    later = [runs[(1, n)][0] for n in ("ReDPO one-shot", "V.I.P. (ReDPO online)", "DPO online (no SFT term)")]
    assert runs[(0, "evaluate")][0] < min(later)  # seed by seed: seed 0 is evaluated before seed 1's last arms start
    moments = sorted(t for start, _ in runs.values() for t in (start + 1e-4,))
    assert max(sum(s <= t < e for s, e in runs.values()) for t in moments) == 2  # two at a time, never three
    assert os.path.exists(tmp_path / "w" / "logs" / "seed-1-v-i-p-redpo-online.log")
    done = [line for line in capsys.readouterr().out.splitlines() if " done in " in line]
    assert len(done) == len(jobs) and all("min left at this pace)" in line for line in done[:-1])
    assert "left" not in done[-1]  # the last unit: nothing left to estimate

    record.unlink()
    args.fail = (0, "SFT online")
    with pytest.raises(models.UserError, match=r"seed 0: SFT online failed with exit code 3; its log is .*seed-0-sft-online\.log"):
        study.run_jobs(args, argv_of)
    out = capsys.readouterr().out
    after = out[out.index(" failed with exit code "):].splitlines()[1:]
    assert not any("left" in line for line in after)  # the time left no longer counts units that will never start
    ran = {tuple(line.split("|")[:2]) for line in record.read_text().splitlines()}
    assert ("0", "V.I.P. (ReDPO online)") not in ran and ("0", "evaluate") not in ran
    with pytest.raises(models.UserError, match="--jobs must be at least 1"):
        study.main(study.get_parser().parse_args(["--jobs", "0"]))


def test_sigterm_stops_the_queue_and_its_running_units(tmp_path):
    """SIGTERM to the study (a cluster's time limit) ends the units it started, not only itself; a rerun appends
    to a unit's log instead of replacing what the first run wrote."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    pids = tmp_path / "pids.txt"
    script = f"""
import os, sys
sys.path.insert(0, {ROOT!r})
from toy import study
args = study.get_parser().parse_args(["--seeds", "0", "--jobs", "2", "--work-dir", {str(tmp_path / "w")!r}])
child = "import os, time; open({str(pids)!r}, 'a').write(str(os.getpid()) + chr(10)); time.sleep(600)"
study.run_jobs(args, lambda args, seed, unit: [sys.executable, "-c", child])
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not (pids.exists() and pids.read_text().count("\n") >= 1):
        time.sleep(0.2)
    assert pids.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out
    child = int(pids.read_text().split()[0])
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the unit's process is gone, not orphaned
        os.kill(child, 0)
    log = tmp_path / "w" / "logs" / "seed-0-masks.log"
    first = log.read_text()
    assert first.startswith("==== ") and first.count("==== ") == 1
    args = study.get_parser().parse_args(["--seeds", "0", "--masks-only", "--jobs", "2", "--work-dir", str(tmp_path / "w")])
    study.run_jobs(args, lambda args, seed, unit: [sys.executable, "-c", "print('again')"])
    assert log.read_text().startswith(first) and log.read_text().count("==== ") == 2 and "again" in log.read_text()
