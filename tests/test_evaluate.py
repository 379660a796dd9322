"""evaluate.py: the report's schema, VBench-named videos, side-by-side videos, efficiency, flags, errors."""
import copy
import json
import os
import subprocess
import sys

import pytest

import evaluate
import models
import tiny
from conftest import ROOT, TINY_SAMPLING, run, run_and_kill

MODEL_FIELDS = {"label", "checkpoint", "removed", "round", "params", "flops", "latency", "memory", "scores", "videos"}
ROW_FIELDS = {"prompt", "sample", "seed", "video", *models.DIMS}


def read_prompts(path, n):
    return models.read_prompts(path)[:n]


def evaluate_in_process(*argv):
    models.quiet_libraries()
    evaluate.main(evaluate.get_parser().parse_args(list(map(str, argv))))


def copy_of_teacher(family_name, teacher_dir, path, adapter=""):
    """A student checkpoint with nothing removed: the teacher's weights in the student format."""
    teacher = models.load_teacher(models.get_family(family_name), teacher_dir, adapter)
    models.save_student(path, teacher.family, copy.deepcopy(teacher.unet), teacher)
    return path


@pytest.fixture(scope="module")
def evaluated(vc2_dir, pruned, clip_dir, prompts_file, tmp_path_factory):
    """One real run: teacher + pruned student, 2 prompts x 2 samples, clip scorer, efficiency on."""
    out = tmp_path_factory.mktemp("eval") / "eval"
    proc = run("evaluate.py", "--model", "vc2", "--teacher", vc2_dir, "--students", pruned, "--labels", "pruned",
               "--prompts", prompts_file, "--num-prompts", 2, "--samples", 2, "--out-dir", out, "--scorer", "clip",
               "--scorer-path", clip_dir, "--batch-size", 3, "--latency-repeats", 1, "--seed", 7, *TINY_SAMPLING)
    return out, json.loads((out / "report.json").read_text()), proc


def test_report_schema_scores_and_shared_seeds(evaluated, prompts_file):
    out, report, _ = evaluated
    prompts = read_prompts(prompts_file, 2)
    assert report["prompts"] == prompts and report["samples"] == 2 and report["family"] == "vc2"
    assert report["settings"] == {"steps": 3, "cfg": 12.0, "eta": 1.0, "x0_rescale": True, "frames": 4,
                                  "height": 16, "width": 16, "precision": "fp32"}  # the CPU's default
    assert {m["latency"]["precision"] for m in report["models"]} == {"fp32"}
    assert report["scorer"]["name"] == "clip" and report["args"]["seed"] == 7
    assert [m["label"] for m in report["models"]] == ["teacher", "pruned"]
    for m in report["models"]:
        assert set(m) == MODEL_FIELDS
        assert set(m["scores"]) == {*models.DIMS, "average"}
        for s in m["scores"].values():
            assert set(s) == {"mean", "ci95", "n"} and s["n"] == 4 and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
        assert len(m["videos"]) == 4 and all(set(r) == ROW_FIELDS for r in m["videos"])
        assert [(r["prompt"], r["sample"]) for r in m["videos"]] == [(p, k) for p in prompts for k in (0, 1)]
        for r in m["videos"]:  # the same seed scheme for every model: teacher and student share x_T
            assert r["seed"] == evaluate.sample_seed(7, r["prompt"], r["sample"])
    teacher, student = report["models"]
    assert [r["seed"] for r in teacher["videos"]] == [r["seed"] for r in student["videos"]]
    assert len({r["seed"] for r in teacher["videos"]}) == 4
    assert teacher["checkpoint"] == "" and teacher["removed"] == [] and teacher["round"] == 0


def test_videos_are_named_for_vbench_and_readable(evaluated):
    out, report, _ = evaluated
    for m in report["models"]:
        for r in m["videos"]:
            assert r["video"] == os.path.join("videos", m["label"], f"{r['prompt']}-{r['sample']}.mp4")
            assert models.read_video(str(out / r["video"])).shape == (4, 16, 16, 3)


def test_side_by_side_panels_under_label_strips(evaluated, prompts_file):
    out, report, _ = evaluated
    sbs = report["side_by_side"]
    strip = sbs["label_strip_px"]
    assert strip > 0 and strip % 2 == 0
    assert sbs["videos"] == [os.path.join("side_by_side", f"{p}.mp4") for p in read_prompts(prompts_file, 2)]
    for path in sbs["videos"]:
        v = models.read_video(str(out / path))
        k = sbs["scale"]
        assert k == 8 and v.shape == (4, 16 * k + strip, 16 * k * 2, 3)  # (F, strip + kH, models * kW, 3)
        assert v[:, :strip].max() > 150  # the labels are written in white on black


def test_pruned_student_has_fewer_params_and_flops(evaluated, pruned):
    _, report, _ = evaluated
    teacher, student = report["models"]
    meta = models.read_student_meta(pruned)
    assert student["checkpoint"] == pruned and student["removed"] == meta["removed"] and student["round"] == 1
    assert teacher["params"]["prunable"] == report["teacher_params"]
    assert teacher["params"]["fraction_of_teacher"] == 1.0
    assert student["params"]["prunable"] == int(meta["prunable_params"]) < teacher["params"]["prunable"]
    assert student["params"]["unet"] < teacher["params"]["unet"]
    assert 0 < student["flops"]["unet_forward"] < teacher["flops"]["unet_forward"]
    assert teacher["flops"]["latent_shape"] == [1, 4, 4, 8, 8]  # one latent video (1, C, F, h, w)
    for m in (teacher, student):
        assert m["latency"]["repeats"] == 1 and m["latency"]["unet_forward_s"] > 0 and m["latency"]["video_s"] > 0
        assert m["memory"]["measure"] == "process_peak_rss" and m["memory"]["peak_mib"] > 0


def test_markdown_table_has_one_row_per_model(evaluated):
    out, report, proc = evaluated
    table = (out / "report.md").read_text(encoding="utf-8")
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == ["teacher", "pruned"]
    assert all(r.count("±") == 5 and r.count("|") == 11 for r in rows)
    assert table.strip() in proc.stdout  # printed at the end


def test_teacher_copy_scores_like_the_teacher_animatediff(animatediff_dirs, clip_dir, prompts_file, tmp_path):
    """A student equal to the teacher gets identical scores: same seeds, same initial noise. Also
    --motion-adapter, --no-efficiency, --no-side-by-side and the default label (the file stem)."""
    sd, adapter = animatediff_dirs
    student = copy_of_teacher("animatediff", sd, str(tmp_path / "copy.safetensors"), adapter)
    out = tmp_path / "eval"
    evaluate_in_process("--model", "animatediff", "--teacher", sd, "--motion-adapter", adapter, "--students", student,
                        "--prompts", prompts_file, "--num-prompts", 1, "--samples", 2, "--out-dir", out,
                        "--scorer", "clip", "--scorer-path", clip_dir, "--no-efficiency", "--no-side-by-side",
                        *TINY_SAMPLING)
    report = json.loads((out / "report.json").read_text())
    teacher, copied = report["models"]
    assert copied["label"] == "copy" and copied["params"] == teacher["params"]
    assert copied["params"]["prunable"] < copied["params"]["unet"]  # animatediff counts motion modules only
    strip = lambda rows: [{k: v for k, v in r.items() if k != "video"} for r in rows]  # noqa: E731
    assert strip(copied["videos"]) == strip(teacher["videos"]) and copied["scores"] == teacher["scores"]
    assert all(m[k] is None for m in report["models"] for k in ("flops", "latency", "memory"))
    assert report["side_by_side"] is None and not (out / "side_by_side").exists()
    assert sorted(os.listdir(out / "videos")) == ["copy", "teacher"]


def test_no_teacher_and_the_toy_judge(vc2_dir, pruned, prompts_file, tmp_path):
    out = tmp_path / "eval"
    evaluate_in_process("--model", "vc2", "--teacher", vc2_dir, "--students", pruned, "--no-teacher", "--prompts",
                        prompts_file, "--num-prompts", 2, "--out-dir", out, "--scorer", "toy", "--no-efficiency",
                        "--latency-repeats", 1, *TINY_SAMPLING)
    report = json.loads((out / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["pruned"] and os.listdir(out / "videos") == ["pruned"]
    scores = report["models"][0]["scores"]
    assert report["scorer"]["name"] == "toy" and all(0 <= scores[d]["mean"] <= 1 for d in models.DIMS)
    assert scores["average"]["n"] == 2
    v = models.read_video(str(out / report["side_by_side"]["videos"][0]))
    k = report["side_by_side"]["scale"]
    assert v.shape[1:3] == (16 * k + report["side_by_side"]["label_strip_px"], 16 * k)  # one panel


def test_bad_input_is_a_one_line_error(vc2_dir, pruned, prompts_file, tmp_path, monkeypatch, capsys):
    base = ["--model", "vc2", "--teacher", vc2_dir, "--prompts", prompts_file, "--out-dir", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *base, "--students", pruned, "--labels", "a", "b"])
    with pytest.raises(SystemExit) as e:
        models.cli(evaluate.main, evaluate.get_parser())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --labels has 2 labels")
    other = tiny.make_vc2(str(tmp_path / "other"), seed=1)
    foreign = copy_of_teacher("vc2", other, str(tmp_path / "foreign.safetensors"))
    cases = [(["--students", foreign], "foreign.safetensors: made from teacher"),
             (["--no-teacher"], "nothing to evaluate"),
             (["--students", pruned, pruned], "distinct"),
             (["--prompts", str(tmp_path / "missing.txt")], "missing.txt: no such file")]
    for extra, message in cases:
        with pytest.raises(models.UserError, match=message):
            evaluate.main(evaluate.get_parser().parse_args(base + extra))
    assert not (tmp_path / "o").exists()


def test_torchrun_two_processes_match_one(evaluated, vc2_dir, pruned, clip_dir, prompts_file, tmp_path):
    """Two CPU ranks (gloo) split the videos; rank 0 merges rows equal to the single-process run's."""
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29531", os.path.join(ROOT, "evaluate.py"), "--model", "vc2", "--teacher", vc2_dir,
                           "--students", pruned, "--labels", "pruned", "--no-teacher", "--prompts", prompts_file,
                           "--num-prompts", "2", "--samples", "2", "--out-dir", str(out), "--scorer", "clip",
                           "--scorer-path", clip_dir, "--no-efficiency", "--seed", "7", *TINY_SAMPLING],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and proc.stdout.count("| pruned |") == 1  # rank 0 prints alone
    ddp, single = report["models"][0]["videos"], evaluated[1]["models"][1]["videos"]
    assert [(r["prompt"], r["sample"], r["seed"]) for r in ddp] == [(r["prompt"], r["sample"], r["seed"]) for r in single]
    for a, b in zip(ddp, single):
        assert all(a[d] == pytest.approx(b[d], abs=1e-3) for d in models.DIMS)
    assert all((out / path).exists() for path in report["side_by_side"]["videos"])


def test_killed_run_resumes_to_the_uninterrupted_report(evaluated, vc2_dir, pruned, clip_dir, prompts_file, tmp_path,
                                                        capsys):
    """SIGKILL once the first batch's rows are on disk, rerun (in this process: cheaper): the rerun skips
    that batch, ignores a torn last line, and writes the report of an uninterrupted run of the same command
    (the `evaluated` fixture) except the measured fields; the partial file is gone."""
    ref, reference, _ = evaluated
    out = tmp_path / "eval"
    partial = out / "report.partial.0-of-1.jsonl"
    argv = ["--model", "vc2", "--teacher", vc2_dir, "--students", pruned, "--labels", "pruned", "--prompts",
            prompts_file, "--num-prompts", 2, "--samples", 2, "--out-dir", out, "--scorer", "clip", "--scorer-path",
            clip_dir, "--batch-size", 3, "--latency-repeats", 1, "--seed", 7, *TINY_SAMPLING]  # the fixture's
    run_and_kill("evaluate.py", *argv, when=lambda: partial.exists() and "\n" in partial.read_text())
    assert not (out / "report.json").exists()
    with open(partial, "a") as f:
        f.write('{"key": "torn by a ki')  # what a kill in the middle of an append leaves
    evaluate_in_process(*argv)
    assert "resuming: 3 of 8 videos already done" in capsys.readouterr().out
    assert not partial.exists()

    def results(report):  # what must not depend on the run: all but the measurements and the out dir
        report = copy.deepcopy(report)
        report["args"].pop("out_dir")
        for m in report["models"]:
            for field in evaluate.MEASURED:
                group, key = field.split(".")
                assert m[group][key] > 0
                del m[group][key]
        return report

    assert results(json.loads((out / "report.json").read_text())) == results(reference)
