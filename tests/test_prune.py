"""prune.py: the paper's counts, shape-safe candidates, both importance criteria, budgets, errors."""
import copy
import json
import re

import pytest
import torch

import models
import prune
from conftest import TINY_SAMPLING, run


def numbers(text):
    return [int(x.replace(",", "")) for x in re.findall(r"\d[\d,]{6,}", text)]


def test_architecture_only_vc2_counts():
    out = run("prune.py", "--model", "vc2", "--architecture-only").stdout
    assert "prunable parameters 1,413,284,420" in out
    assert "1,411,233,860 in the diffusers UNet3DConditionModel + 2,050,560" in out
    assert "0.902 B" in out and "reachable" in out and "NOT reachable" not in out
    assert "transformer_in" in out and "mid_block.temp_attentions.0" in out


def test_architecture_only_animatediff_counts():
    out = run("prune.py", "--model", "animatediff", "--architecture-only").stdout
    assert "prunable parameters 453,209,280" in out
    assert "21 candidate layers" in out and out.count("motion_modules ") == 21
    assert "0.147 B" in out and "NOT reachable" not in out


def test_removing_every_candidate_keeps_shapes(vc2_dir, animatediff_dirs):
    for fam_name, paths in (("vc2", (vc2_dir,)), ("animatediff", animatediff_dirs)):
        teacher = models.load_teacher(models.get_family(fam_name), *paths)
        fam = teacher.family
        cands = prune.candidates(fam, teacher.unet)
        assert cands and sum(n for _, n in cands) < models.count_params(fam, teacher.unet, paper=False) + 1
        unet = models.remove_layers(copy.deepcopy(teacher.unet), [p for p, _ in cands])
        assert prune.candidates(fam, unet) == []
        x = torch.randn(2, 4, 4, 8, 8)
        emb = models.encode_prompts(teacher, ["a", "b"])
        with torch.no_grad():
            assert models.predict_noise(fam, unet, x, torch.tensor([1, 2]), emb).shape == x.shape
        if fam_name == "vc2":
            kinds = {prune.kind_of(p) for p, _ in cands}
            assert kinds == {"transformer_in", "attentions", "temp_attentions", "temp_convs", "resnets"}
            assert not any(p.startswith("up_blocks") and ".resnets." in p for p, _ in cands)


def test_select_removes_least_important_until_budget():
    cands = [("a", 10), ("b", 20), ("c", 30), ("d", 40)]
    table = {"a": 0.5, "b": -0.1, "c": 0.2, "d": 0.9}
    assert prune.select(cands, table, 100, 75) == (["b", "c"], 50)
    assert prune.select(cands, table, 100, 100) == ([], 100)
    # a large unimportant layer is not dropped to cover a small remainder: layers that fit go first
    cands = [("big", 60), ("s1", 3), ("s2", 2), ("s3", 4)]
    table = {"big": -1.0, "s1": 0.1, "s2": 0.2, "s3": 0.3}
    assert prune.select(cands, table, 100, 95) == (["s1", "s2"], 95)
    # when no layer fits, the least important of those that cross the target finishes the round
    assert prune.select(cands, table, 100, 99) == (["big"], 40)
    table["big"] = 1.0
    assert prune.select(cands, table, 100, 99) == (["s1"], 97)
    # a pass before the last stops at the first layer that would cross, leaving the rest to the next pass
    cands = [("a", 10), ("big", 50), ("s", 5)]
    table = {"a": 0.1, "big": 0.2, "s": 0.9}
    assert prune.select(cands, table, 100, 60) == (["a", "s", "big"], 35)  # small "s" from far down, then "big"
    assert prune.select(cands, table, 100, 60, fill=False) == (["a"], 90)
    # keep {kind: N}: the last N layers of a kind stay, the next least important layers go instead
    cands = [("b.temp_convs.0", 10), ("b.temp_convs.1", 10), ("b.attentions.0", 10), ("b.resnets.0", 10)]
    table = {"b.temp_convs.0": 0.0, "b.temp_convs.1": 0.1, "b.attentions.0": 0.2, "b.resnets.0": 0.3}
    assert prune.select(cands, table, 40, 20) == (["b.temp_convs.0", "b.temp_convs.1"], 20)
    assert prune.select(cands, table, 40, 20, keep={"temp_convs": 1}) == (["b.temp_convs.0", "b.attentions.0"], 20)
    assert prune.select(cands, table, 40, 25, keep={"temp_convs": 2}) == (["b.attentions.0", "b.resnets.0"], 20)
    # where the kind is cut to its last N, R measured with each as the only one of its kind left picks who stays
    cands = [("b.temp_convs.0", 10), ("b.temp_convs.1", 10), ("b.temp_convs.2", 10), ("b.attentions.0", 10)]
    table = {"b.temp_convs.0": 0.0, "b.temp_convs.1": 0.1, "b.temp_convs.2": 0.2, "b.attentions.0": 0.3}
    alone = {"b.temp_convs.0": 0.9, "b.temp_convs.1": 0.5, "b.temp_convs.2": 0.4}
    convs = ["b.temp_convs.0", "b.temp_convs.1", "b.temp_convs.2"]
    assert prune.binding(cands, table, 40, 10, True, {"temp_convs": 1}) == {"temp_convs": (convs, 1)}  # would keep 0
    assert prune.select(cands, table, 40, 10, keep={"temp_convs": 1}, alone=alone) == (
        ["b.temp_convs.1", "b.temp_convs.2", "b.attentions.0"], 10)
    assert prune.binding(cands, table, 40, 20, True, {"temp_convs": 1}) == {"temp_convs": (convs, 1)}  # would keep 1
    assert prune.select(cands, table, 40, 20, keep={"temp_convs": 1}, alone=alone) == (
        ["b.temp_convs.1", "b.temp_convs.2"], 20)
    # where more than N would stay anyway, nothing changes: the least important goes, whatever its R alone
    assert prune.binding(cands, table, 40, 30, True, {"temp_convs": 1}) == {}
    assert prune.select(cands, table, 40, 30, keep={"temp_convs": 1}, alone=alone) == (["b.temp_convs.0"], 30)
    # a kind that alone does not cover keeps the ranking's rule
    assert prune.select(cands, table, 40, 10, keep={"temp_convs": 1}, alone={"b.temp_convs.1": 0.9}) == (
        ["b.temp_convs.0", "b.temp_convs.1", "b.attentions.0"], 10)


def test_spearman_on_hand_made_rankings():
    assert prune.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert prune.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert prune.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/(5*24)
    assert prune.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.866025, abs=1e-5)  # ties share a rank


def test_split_half_compares_the_means_of_the_two_halves_of_the_seed_sets():
    two = {"a": [1.0, 3.0], "b": [2.0, 2.0], "c": [3.0, 1.0]}
    assert prune.split_half(two, ["a", "b", "c"]) == pytest.approx(prune.spearman([1, 2, 3], [3, 2, 1]))  # sets 1, 2
    # four sets: the halves' means are a 1.5 / 3.5, b 1.5 / 0, c 3 / 1; set-by-set the first two would agree
    four = {"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, 2.0, 0.0, 0.0], "c": [3.0, 3.0, 1.0, 1.0]}
    assert prune.split_half(four, ["a", "b", "c"]) == pytest.approx(prune.spearman([1.5, 1.5, 3], [3.5, 0, 1]))
    assert prune.split_half(four, ["a", "b", "c"]) != pytest.approx(prune.spearman([1, 1, 3], [2, 2, 3]))
    odd = {"a": [1.0, 2.0, 9.0], "b": [2.0, 1.0, -9.0]}  # an odd last set is left out
    assert prune.split_half(odd, ["a", "b"]) == pytest.approx(-1.0)
    assert (prune.halves(2), prune.halves(3), prune.halves(4)) == ("1 and 2", "1 and 2", "1-2 and 3-4")


def test_output_importance_prunes_to_target(pruned, vc2_dir):
    meta = models.read_student_meta(pruned)
    teacher = models.load_teacher(models.get_family("vc2"), vc2_dir)
    full = models.count_params(teacher.family, teacher.unet)
    assert int(meta["prunable_params"]) <= 0.8 * full and meta["removed"] and meta["round"] == "1"
    table = json.loads(meta["importance"])
    assert {r["layer"] for r in table if r["removed"]} == set(meta["removed"])
    assert all(r["importance"] >= 0 for r in table)  # removing a layer never brings the teacher closer
    kept = [r["importance"] for r in table if not r["removed"]]
    assert max(r["importance"] for r in table if r["removed"]) <= max(kept)


def test_reward_importance_prunes_further_from_a_student(pruned, vc2_dir, prompts_file, clip_dir, tmp_path):
    out = tmp_path / "r2.safetensors"
    proc = run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--prompts", prompts_file,
               "--num-prompts", "2", "--importance", "reward", "--scorer", "clip", "--scorer-path", clip_dir,
               "--target-ratio", "0.6", "--out", out, *TINY_SAMPLING)
    meta, before = models.read_student_meta(str(out)), models.read_student_meta(pruned)
    assert set(before["removed"]) < set(meta["removed"]) and meta["round"] == "2"
    assert int(meta["prunable_params"]) <= 0.6 * int(meta["teacher_prunable_params"])
    assert isinstance(json.loads(meta["base_reward"]), float) and "layers removed" in proc.stdout
    assert json.loads(meta["args"])["importance"] == "reward"
    # two probe seed sets: each layer's importance per set, their mean, and the sets' rank correlation
    rho = json.loads(meta["importance_rank_correlation"])
    assert -1 <= rho <= 1 and f"seed sets 1 and 2: {rho:.3f}" in proc.stdout
    for r in json.loads(meta["importance"]):
        assert len(r["by_seed_set"]) == 2 and r["importance"] == pytest.approx(sum(r["by_seed_set"]) / 2)

    # the same mask again, without measuring: from the checkpoint's layers, or from its stored table
    again = tmp_path / "again.safetensors"
    run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--layers-from", out, "--out", again)
    assert models.read_student_meta(str(again))["removed"] == meta["removed"]
    table = tmp_path / "table.safetensors"
    run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--importance-from", out,
        "--target-ratio", "0.6", "--out", table)
    assert sorted(models.read_student_meta(str(table))["removed"]) == sorted(meta["removed"])
    proc = run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--layers-from", pruned, "--student", out,
               "--out", tmp_path / "bad.safetensors", check=False)
    assert proc.returncode == 2 and "already removed" in proc.stderr and not (tmp_path / "bad.safetensors").exists()


def test_the_temporal_conv_kept_is_the_one_best_alone(vc2_dir, prompts_file, tmp_path):
    out = tmp_path / "alone.safetensors"
    flags = ["--model", "vc2", "--teacher", vc2_dir, "--prompts", prompts_file, "--importance", "output", "--timesteps",
             "2", "--target-ratio", "0.3", "--keep-temporal-convs", "1", *TINY_SAMPLING]
    proc = run("prune.py", *flags, "--keep-by", "alone", "--out", out)
    rows = json.loads(models.read_student_meta(str(out))["importance"])
    convs = [r for r in rows if r["kind"] == "temp_convs"]
    assert len(convs) > 1 and all(len(r["kept_alone"]) == 2 for r in convs)  # the rule bound: each measured alone
    assert not any(r["kept_alone"] for r in rows if r["kind"] != "temp_convs") and "R kept alone" in proc.stdout
    mean = lambda r: sum(r["kept_alone"]) / 2
    (kept,) = [r for r in convs if not r["removed"]]
    assert mean(kept) == max(mean(r) for r in convs)
    # the value is R of the teacher with every other temporal conv removed, measured the same way
    teacher = models.load_teacher(models.get_family("vc2"), vc2_dir)
    args = prune.get_parser().parse_args([str(a) for a in flags])
    other = [r["layer"] for r in convs if r is not kept]
    unet = models.remove_layers(copy.deepcopy(teacher.unet), other)
    measured = prune.prober(args, teacher.family, unet, teacher, models.read_prompts(prompts_file)[:8], "cpu")()
    assert measured.tolist() == pytest.approx(kept["kept_alone"], rel=1e-4)
    # alone() puts every layer back
    x, emb = torch.randn(1, 4, 4, 8, 8), models.encode_prompts(teacher, ["a"])
    before = models.predict_noise(teacher.family, teacher.unet, x, torch.tensor([5]), emb)
    measure = prune.prober(args, teacher.family, teacher.unet, teacher, ["a"], "cpu")
    assert set(prune.alone(measure, teacher.unet, [r["layer"] for r in convs])) == {r["layer"] for r in convs}
    assert torch.equal(models.predict_noise(teacher.family, teacher.unet, x, torch.tensor([5]), emb), before)
    # --keep-by importance: the most important one stays, and nothing is measured alone
    ranked = tmp_path / "ranked.safetensors"
    run("prune.py", *flags, "--keep-by", "importance", "--out", ranked)
    rows = json.loads(models.read_student_meta(str(ranked))["importance"])
    convs = [r for r in rows if r["kind"] == "temp_convs"]
    (kept,) = [r for r in convs if not r["removed"]]
    assert kept["importance"] == max(r["importance"] for r in convs) and not any(r["kept_alone"] for r in rows)
    # a stored table reuses the alone measurements: the same mask without measuring
    again = tmp_path / "again.safetensors"
    run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--importance-from", out, "--target-ratio", "0.3",
        "--keep-temporal-convs", "1", "--keep-by", "alone", "--out", again)
    assert sorted(models.read_student_meta(str(again))["removed"]) == sorted(models.read_student_meta(str(out))["removed"])
    # a stored table without them (measured with --keep-by importance) keeps the ranking's conv, and says so
    proc = run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--importance-from", ranked, "--target-ratio", "0.3",
               "--keep-temporal-convs", "1", "--keep-by", "alone", "--out", tmp_path / "fallback.safetensors")
    assert "as --keep-by importance" in proc.stdout
    assert sorted(models.read_student_meta(str(tmp_path / "fallback.safetensors"))["removed"]) == sorted(
        models.read_student_meta(str(ranked))["removed"])


def test_bad_arguments_are_one_line_errors(vc2_dir, prompts_file, tmp_path):
    for args in (["--target-ratio", "0.5", "--target-params", "10"], ["--target-ratio", "1.5"], []):
        proc = run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--prompts", prompts_file, "--out",
                   tmp_path / "o.safetensors", *args, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_passes_measure_importance_again_on_the_smaller_model(pruned, vc2_dir, prompts_file, tmp_path):
    out = tmp_path / "passes.safetensors"
    proc = run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--prompts", prompts_file, "--importance", "output",
               "--timesteps", "2", "--target-ratio", "0.6", "--passes", "3", "--out", out, *TINY_SAMPLING)
    meta = models.read_student_meta(str(out))
    full, kept = int(meta["teacher_prunable_params"]), int(meta["prunable_params"])
    rows = json.loads(meta["importance"])
    assert kept <= 0.6 * full and {r["layer"] for r in rows if r["removed"]} == set(meta["removed"])
    assert all(r["pass"] in (1, 2, 3) for r in rows)
    # the layers kept carry their last pass's measurement: made on the model without pass 1's layers
    assert {r["pass"] for r in rows if r["removed"]} == {1, 2, 3} and {r["pass"] for r in rows if not r["removed"]} == {3}
    assert proc.stdout.count("prune: pass ") == 3 and "pass 3/3" in proc.stdout
    # the last pass stops within one layer of the target
    assert kept > 0.6 * full - max(r["params"] for r in rows if r["removed"] and r["pass"] == 3)
    # pass 1 measures every candidate on the unpruned model, as the one-pass `pruned` fixture did (same settings)
    first = {r["layer"]: r["importance"] for r in json.loads(models.read_student_meta(pruned)["importance"])}
    assert all(r["importance"] == pytest.approx(first[r["layer"]]) for r in rows if r["pass"] == 1)
    assert any(r["importance"] != pytest.approx(first[r["layer"]], rel=1e-3) for r in rows if r["pass"] == 3)
    # its table mixes the passes' models: reusing it for one selection is refused, its mask is not
    proc = run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--importance-from", out, "--target-ratio", "0.6",
               "--out", tmp_path / "reuse.safetensors", check=False)
    assert proc.returncode == 2 and "3 passes" in proc.stderr and "--layers-from" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "reuse.safetensors").exists()
    proc = run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--prompts", prompts_file, "--passes", "0",
               "--target-ratio", "0.6", "--out", tmp_path / "bad.safetensors", check=False)
    assert proc.returncode == 2 and "--passes must be >= 1" in proc.stderr and not (tmp_path / "bad.safetensors").exists()
