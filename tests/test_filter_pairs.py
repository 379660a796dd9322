"""filter_pairs.py: the pair rule S(w) > S(l) > tau, targets, the 5-to-25-word rule, curation (keywords and a
tiny local LLM), the score cache, relocated paths, inputs never overwritten, torchrun. (The stage-file rules
are checked for every stage in test_cli.py.)"""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import filter_pairs as fp
import models
import rewards
from conftest import ROOT, run

DIMS = models.DIMS
VQ, TC, DD, TA = DIMS


def call(*argv):
    """Run filter_pairs.main in this process (no interpreter start-up) on the given flags."""
    return fp.main(fp.get_parser().parse_args([str(a) for a in argv]))


def words(n, lead="a red square moving quickly"):
    """A prompt of exactly n words (n >= 5) relevant to every target."""
    return " ".join((lead.split() + ["very"] * n)[:n])


def dims(vq, tc, dd, ta):
    return dict(zip(DIMS, (vq, tc, dd, ta)))


# ----------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("s_win, s_lose, tau, expected", [
    (0.9, 0.5, 0.0, (True, "kept")),
    (0.5, 0.5, 0.0, (False, "winner_not_better")),     # a tie is not better
    (0.4, 0.5, 0.0, (False, "winner_not_better")),
    (0.9, 0.0, 0.0, (False, "loser_below_tau")),       # S(l) must be strictly above tau
    (0.9, -0.1, 0.0, (False, "loser_below_tau")),
    (0.3, 0.2, 0.25, (False, "loser_below_tau")),
    (0.2, 0.3, 0.25, (False, "winner_not_better")),    # both fail: the winner is checked first
    (0.3, 0.2, -1.0, (True, "kept")),
    (math.nan, 0.2, 0.0, (False, "winner_not_better")),
])
def test_keep_pair_rule(s_win, s_lose, tau, expected):
    assert fp.keep_pair(s_win, s_lose, tau) == expected


def test_keep_pair_guard_checks_every_dimension_after_S():
    win, lose = dims(0.9, 0.9, 0.50, 0.9), dims(0.5, 0.5, 0.53, 0.5)  # S says win; DD is 0.03 below the loser's
    scores = {"winner": win, "loser": lose}
    assert fp.keep_pair(0.9, 0.5, 0.0, scores, None) == (True, "kept")  # off by default
    assert fp.keep_pair(0.9, 0.5, 0.0, scores, 0.02) == (False, "winner_worse_on_a_dim")
    assert fp.keep_pair(0.9, 0.5, 0.0, scores, 0.05) == (True, "kept")
    assert fp.keep_pair(0.9, 0.5, 0.0, {"winner": lose, "loser": lose}, 0.0) == (True, "kept")  # ties pass
    assert fp.keep_pair(0.4, 0.5, 0.0, scores, 0.02) == (False, "winner_not_better")  # S is checked first


def test_targets_from_scores():
    teacher = dims(1.0, 1.0, 1.0, 1.0)
    student = dims(1.0, 0.9, 1.1, 0.95)
    assert fp.targets_from_scores(teacher, student) == [TC, TA]  # equal VQ and better DD are no targets
    assert fp.targets_from_scores(teacher, student, margin=0.07) == [TC]
    assert fp.targets_from_scores(student, teacher) == [DD]
    assert fp.targets_from_scores(teacher, teacher) == []


def test_word_rule_5_to_25():
    assert fp.length_reason(words(5)[: -len(" quickly")], 5, 25) == "too_short"  # 4 words
    assert fp.length_reason(words(5), 5, 25) is None
    assert fp.length_reason(words(25), 5, 25) is None
    assert fp.length_reason(words(26), 5, 25) == "too_long"
    assert fp.length_reason("a  red\tsquare \n moving", 4, 4) is None  # words are whitespace-separated


def test_keyword_matches_per_dimension():
    m = fp.keyword_matches("a red square moving left quickly")
    assert set(m) == set(DIMS) and set(m[TA]) == {"red", "square", "left"} and "quickly" in m[DD]
    m = fp.keyword_matches("Two blue balls above 3 green cubes")
    assert set(m) == {VQ, TA} and {"two", "ball", "cube", "above", "3"} <= set(m[TA])  # plurals and digits count
    assert fp.keyword_matches("a still photo of an old chair") == {}
    assert set(fp.keyword_matches("a cinematic shot in high quality")) == {VQ}  # phrases match whole words
    assert fp.keyword_matches("a red chair in an empty room") == {VQ: ["red"]}  # one attribute is not enough for TA
    assert set(fp.keyword_matches("a dog walking steadily across the street")) == {TC, DD}


# ----------------------------------------------------------------------------- curate
def test_curate_keywords_lengths_duplicates_relevance(tmp_path, capsys):
    pool = [words(4 + 1)[: -len(" quickly")], words(5), words(25), words(26), words(5).upper(),
            "a still photo of an old empty wooden chair", "two blue balls above three green cubes"]
    (tmp_path / "pool.txt").write_text("\n".join(pool) + "\n")
    out = tmp_path / "cur" / "prompts.txt"
    call("--job", "curate", "--prompts", tmp_path / "pool.txt", "--targets", "dynamic_degree", "--out", out)
    assert sorted(out.read_text().splitlines()) == sorted([words(5), words(25)])
    summary = json.loads((tmp_path / "cur" / "prompts.json").read_text())
    assert [r["reason"] for r in summary["prompts"]] == ["too_short", "kept", "kept", "too_long", "duplicate",
                                                          "not_relevant", "not_relevant"]
    assert [r["words"] for r in summary["prompts"]][:4] == [4, 5, 25, 26]
    assert summary["targets"] == [DD] and summary["targets_from"] == "--targets" and summary["args"]["job"] == "curate"
    assert summary["counts"] == {"in": 7, "kept": 2, "too_short": 1, "too_long": 1, "duplicate": 1, "not_relevant": 2,
                                 "over_max_prompts": 0}
    assert "kept 2/7" in capsys.readouterr().out
    # other targets, other limits, --max-prompts, and --min-keep
    call("--job", "curate", "--prompts", tmp_path / "pool.txt", "--targets", "text_alignment,visual_quality",
         "--min-words", "4", "--max-words", "7", "--max-prompts", "2", "--batch-size", "1", "--out", out)
    rows = json.loads((tmp_path / "cur" / "prompts.json").read_text())["prompts"]
    assert [r["reason"] for r in rows][2:6] == ["too_long", "too_long", "duplicate", "too_long"]
    assert sorted(r["reason"] for r in rows if r["words"] <= 7 and r["reason"] != "duplicate") == [
        "kept", "kept", "over_max_prompts"]  # three relevant to both targets, two kept
    # balance: the two red-square prompts share their words, so one of them gives way to the other prompt
    assert "two blue balls above three green cubes" in out.read_text().splitlines()
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(models.UserError, match="only 3 of 7 prompts kept.*--min-keep 4"):
        call("--job", "curate", "--prompts", tmp_path / "pool.txt", "--targets", "all", "--min-keep", "4", "--out",
             tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()
    with pytest.raises(models.UserError, match="unknown.*bogus"):
        call("--job", "curate", "--prompts", tmp_path / "pool.txt", "--targets", "bogus", "--out", out)
    with pytest.raises(models.UserError, match="needs --targets or --report"):
        call("--job", "curate", "--prompts", tmp_path / "pool.txt", "--out", out)


def test_curation_ignores_the_pool_order_and_balances_attributes(tmp_path):
    """A shuffled pool gives the same kept prompts in the same order; with --max-prompts the toy pool's
    colors, shapes, directions and speeds come out balanced; prompts matching more targets come first."""
    from toy import world

    pool = world.pool_prompts()
    kept = []
    for n, order in enumerate((pool, pool[::-1], sorted(pool, key=lambda p: p[::-1]))):
        (tmp_path / f"pool{n}.txt").write_text("\n".join(order) + "\n")
        call("--job", "curate", "--prompts", tmp_path / f"pool{n}.txt", "--targets", "all", "--max-prompts", "16",
             "--seed", "3", "--out", tmp_path / f"kept{n}.txt")
        kept.append((tmp_path / f"kept{n}.txt").read_text().splitlines())
    assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 16
    attrs = [world.parse_prompt(p) for p in kept[0]]
    for key, values in (("color", world.COLORS), ("direction", world.DIRECTIONS), ("speed", world.SPEEDS)):
        assert [sum(a[key] == v for a in attrs) for v in values] == [16 // len(values)] * len(values), key
    assert max(sum(a["shape"] == s for a in attrs) for s in world.SHAPES) <= 6
    # another seed breaks ties differently; a prompt relevant to more targets is kept before the others
    call("--job", "curate", "--prompts", tmp_path / "pool0.txt", "--targets", "all", "--max-prompts", "16",
         "--seed", "4", "--out", tmp_path / "other.txt")
    assert (tmp_path / "other.txt").read_text().splitlines() != kept[0]
    mixed = ["a red square moving left quickly", "a dog walking steadily across the street",
             "a detailed sharp portrait of an old man", "a still photo of an old chair today"]
    (tmp_path / "mixed.txt").write_text("\n".join(mixed) + "\n")
    call("--job", "curate", "--prompts", tmp_path / "mixed.txt", "--targets", "all", "--max-prompts", "1",
         "--out", tmp_path / "one.txt")
    assert (tmp_path / "one.txt").read_text().splitlines() == ["a red square moving left quickly"]  # 4 targets


def write_report(path, *models_means):
    """An evaluate.py-style report: models [(label, {dim: mean})]."""
    entries = [{"label": label, "scores": {**{d: {"mean": m[d], "ci95": [m[d], m[d]], "n": 4} for d in DIMS},
                                           "average": {"mean": sum(m.values()) / 4, "ci95": [0, 0], "n": 4}}}
               for label, m in models_means]
    path.write_text(json.dumps({"args": {}, "models": entries}))
    return path


def test_targets_from_an_evaluate_report(tmp_path, capsys):
    report = write_report(tmp_path / "report.json", ("teacher", dims(0.5, 0.5, 0.5, 0.5)),
                          ("pruned", dims(0.5, 0.4, 0.6, 0.45)), ("vip", dims(0.4, 0.6, 0.6, 0.6)))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": p, "extra": 1}) + "\n" for p in
                            ["a red square moving left quickly", "a dog walking steadily across the street",
                             "a detailed sharp portrait of an old man"]))
    out, summary = tmp_path / "p.txt", tmp_path / "p.json"

    def targets(*flags):
        call("--job", "curate", "--prompts", pool, "--out", out, *flags)
        return json.loads(summary.read_text())["targets"]

    assert targets("--report", report) == [VQ]  # the last non-teacher model
    assert sorted(out.read_text().splitlines()) == ["a detailed sharp portrait of an old man",
                                                    "a red square moving left quickly"]
    assert targets("--report", report, "--student-label", "pruned") == [TC, TA]
    assert targets("--report", report, "--student-label", "pruned", "--margin", "0.08") == [TC]
    better = write_report(tmp_path / "better.json", ("teacher", dims(0.5, 0.5, 0.5, 0.5)),
                          ("s", dims(0.6, 0.6, 0.6, 0.6)))
    assert targets("--report", better) == list(DIMS)
    assert "not worse than the teacher on any dimension" in capsys.readouterr().out
    for bad, msg in [({"models": [{"label": "s", "scores": {}}]}, "labelled 'teacher'"),
                     ({"models": [{"label": "teacher", "scores": {}}, {"label": "s", "scores": {}}]}, "scores.DIM.mean"),
                     ({"rows": []}, "expected 'models'")]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(models.UserError, match=f"bad.json.*{msg}"):
            targets("--report", tmp_path / "bad.json")
    with pytest.raises(models.UserError, match="a student labelled 'nobody'"):
        targets("--report", report, "--student-label", "nobody")
    with pytest.raises(models.UserError, match="at most one"):
        targets("--report", report, "--targets", "all")


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random 1-layer GPT-2 with CLIP's tokenizer (no hub), and a copy whose tokenizer has a chat template."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=49408, bos_token_id=49406,
                               eos_token_id=49407)).save_pretrained(d / "plain")
    tok = models.build_clip_tokenizer(77)
    tok.save_pretrained(d / "plain")
    shutil.copytree(d / "plain", d / "chat")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} so the reply is:{% endif %}"
    tok.save_pretrained(d / "chat")
    return d


def test_llm_curator_answers_yes_or_no_deterministically(tiny_llm, tmp_path):
    pool = tmp_path / "pool.txt"
    prompts = ["a red square moving left quickly", "a blue circle moving up slowly", "a cat", words(30),
               "two blue balls above three green cubes", "a detailed sharp portrait of an old man in soft light"]
    pool.write_text("\n".join(prompts) + "\n")
    decisions = []
    for folder, batch in (("plain", 2), ("plain", 2), ("plain", 1), ("chat", 3)):
        out = tmp_path / folder / "p.txt"
        call("--job", "curate", "--prompts", pool, "--targets", "all", "--curator", tiny_llm / folder, "--batch-size",
             batch, "--min-keep", "0", "--device", "cpu", "--out", out)
        rows = json.loads(out.with_suffix(".json").read_text())["prompts"]
        assert [r["reason"] for r in rows][2:4] == ["too_short", "too_long"] and "llm" not in rows[2]
        judged = [r for r in rows if r["reason"] in ("kept", "not_relevant")]
        assert len(judged) == 4
        for r in judged:
            assert set(r["llm"]) == {"yes", "no"} and all(math.isfinite(v) for v in r["llm"].values())
            assert r["kept"] == (r["llm"]["yes"] > r["llm"]["no"]) == (r["reason"] == "kept")
        assert sorted(out.read_text().splitlines()) == sorted(r["prompt"] for r in judged if r["kept"])
        decisions.append([(r["llm"]["yes"], r["llm"]["no"]) for r in judged])
    assert decisions[0] == decisions[1]  # deterministic
    assert np.allclose(decisions[0], decisions[2], atol=1e-5)  # right padding in a batch changes nothing
    assert not np.allclose(decisions[0], decisions[3])  # the chat template's text is what the model reads
    with pytest.raises(models.UserError, match="not 'keywords' and not a model folder"):
        call("--job", "curate", "--prompts", pool, "--targets", "all", "--curator", tmp_path / "none", "--out",
             tmp_path / "x.txt")


# ----------------------------------------------------------------------------- filter
# Hand-made pairs whose scores a fake cache fixes: (winner scores, loser scores) per pair.
HAND = [(dims(0.8, 0.8, 0.8, 0.8), dims(0.5, 0.5, 0.5, 0.5)),     # kept whatever S
        (dims(0.4, 0.4, 0.4, 0.4), dims(0.6, 0.6, 0.6, 0.6)),     # winner_not_better
        (dims(0.5, 0.5, 0.5, 0.5), dims(-0.1, -0.1, -0.1, -0.1)),  # loser_below_tau (tau 0)
        (dims(0.2, 0.2, 0.2, 0.9), dims(0.6, 0.6, 0.6, 0.3))]     # kept on TA alone, not on the average
HAND_PROMPTS = ["a red square moving left quickly", "a blue circle moving up slowly",
                "a green triangle moving right quickly", "a yellow square moving down slowly"]


@pytest.fixture
def hand_pairs(tmp_path):
    """pairs/pairs.jsonl with 8 distinct tiny mp4s, and a toy-scorer cache holding HAND's scores."""
    d = tmp_path / "pairs"
    rows, cache = [], []
    fingerprint = rewards.get_scorer("toy").fingerprint
    for i, (prompt, scores) in enumerate(zip(HAND_PROMPTS, HAND)):
        row = {"id": f"{i:06d}", "prompt": prompt, "seed": i, "text_emb": f"latents/{i:06d}_text.safetensors"}
        for k, side in enumerate(("winner", "loser")):
            video = np.full((4, 16, 16, 3), 20 + 50 * i + 25 * k, np.uint8)  # (F, H, W, 3), one color per video
            video[:, 4:10, 2 + 2 * k:8 + 2 * k] = 230
            path = d / "videos" / f"{i:06d}_{side}.mp4"
            models.write_video(str(path), video, 8)
            row[side] = {"model": side, "video": f"videos/{path.name}", "latents": f"latents/{i:06d}_{side}.safetensors"}
            cache.append({"key": fp.cache_key(fingerprint, fp.file_sha256(str(path)), prompt), "scores": scores[k]})
        rows.append(row)
    models.write_jsonl(str(d / "pairs.jsonl"), rows)
    models.write_jsonl(str(tmp_path / "cache.jsonl"), cache)
    return d / "pairs.jsonl", tmp_path / "cache.jsonl"


def test_filter_rule_reasons_and_output_schema(hand_pairs, tmp_path, capsys):
    pairs, cache = hand_pairs
    before = cache.read_bytes()
    out = tmp_path / "else" / "kept.jsonl"

    def filtered(*flags):
        call("--job", "filter", "--pairs", pairs, "--score-cache", cache, "--out", out, *flags)
        return models.read_jsonl(str(out)), json.loads(out.with_suffix(".json").read_text())

    rows, summary = filtered("--targets", "text_alignment")  # default --score targets, --tau 0
    assert [r["id"] for r in rows] == ["000000", "000003"]
    assert summary["counts"] == {"in": 4, "kept": 2, "winner_not_better": 1, "loser_below_tau": 1,
                                 "winner_worse_on_a_dim": 0}
    assert summary["videos"] == {"unique": 8, "scored": 0, "cached": 8} and cache.read_bytes() == before
    assert "kept 2/4 pairs (winner_not_better 1, loser_below_tau 1, winner_worse_on_a_dim 0)" in \
        capsys.readouterr().out
    inp = models.read_jsonl(str(pairs))
    for r in rows:
        i = int(r["id"])
        assert {k: v for k, v in r.items() if k not in ("winner", "loser", "text_emb", "scores", "S", "targets")} == \
               {k: v for k, v in inp[i].items() if k not in ("winner", "loser", "text_emb")}
        assert r["scores"] == {"winner": HAND[i][0], "loser": HAND[i][1]} and r["targets"] == [TA]
        assert r["S"] == {"winner": HAND[i][0][TA], "loser": HAND[i][1][TA]}
        for side in ("winner", "loser"):  # paths now relative to the output's folder, pointing at the same files
            assert r[side]["model"] == side and r[side]["video"] == f"../pairs/{inp[i][side]['video']}"
            assert os.path.isfile(out.parent / r[side]["video"])
            assert r[side]["latents"] == os.path.relpath(pairs.parent / inp[i][side]["latents"], out.parent)
        assert r["text_emb"] == f"../pairs/{inp[i]['text_emb']}"
    assert summary["targets"] == [TA] and summary["score"] == "targets" and summary["score_dims"] == [TA]
    assert summary["tau"] == 0.0 and summary["guard"] is None
    assert summary["scorer"]["name"] == "toy" and summary["args"]["job"] == "filter"
    assert summary["means"]["all"]["winner"][VQ]["mean"] == pytest.approx(np.mean([w[VQ] for w, _ in HAND]))
    assert summary["means"]["kept"]["loser"][TA]["n"] == 2
    assert [p["reason"] for p in summary["pairs"]] == ["kept", "winner_not_better", "loser_below_tau", "kept"]

    rows, summary = filtered("--targets", "text_alignment", "--score", "avg")  # S over all four: pair 3 drops
    assert [r["id"] for r in rows] == ["000000"] and summary["counts"]["winner_not_better"] == 2
    assert rows[0]["S"] == {"winner": pytest.approx(0.8), "loser": pytest.approx(0.5)}
    assert summary["pairs"][3]["S"] == {"winner": pytest.approx(0.375), "loser": pytest.approx(0.525)}

    rows, summary = filtered("--targets", "all", "--tau", "0.45")
    assert summary["counts"] == {"in": 4, "kept": 1, "winner_not_better": 2, "loser_below_tau": 1,
                                 "winner_worse_on_a_dim": 0}

    # --guard: pair 3 wins on TA (its S) but its winner is 0.4 below its loser on VQ, TC and DD
    rows, summary = filtered("--targets", "text_alignment", "--guard", "0.02")
    assert [r["id"] for r in rows] == ["000000"] and summary["guard"] == 0.02
    assert summary["counts"] == {"in": 4, "kept": 1, "winner_not_better": 1, "loser_below_tau": 1,
                                 "winner_worse_on_a_dim": 1}
    assert summary["pairs"][3]["reason"] == "winner_worse_on_a_dim"
    rows, summary = filtered("--targets", "text_alignment", "--guard", "0.45")  # 0.2 < 0.6 - 0.45 is false: kept
    assert [r["id"] for r in rows] == ["000000", "000003"]
    with pytest.raises(models.UserError, match="--guard must be >= 0"):
        filtered("--guard", "-0.1")

    rows, summary = filtered()  # no --targets/--report: the pairs' own verdict (losers below winners)
    w_means = {d: np.mean([w[d] for w, _ in HAND]) for d in DIMS}
    l_means = {d: np.mean([l[d] for _, l in HAND]) for d in DIMS}
    assert summary["targets"] == fp.targets_from_scores(w_means, l_means) == list(DIMS)
    assert summary["targets_from"].startswith("the pairs")

    rows, summary = filtered("--targets", "all", "--tau", "5")  # nothing passes: an empty file and a warning
    assert rows == [] and out.read_text() == "" and summary["counts"] == {"in": 4, "kept": 0, "winner_not_better": 2,
                                                                          "loser_below_tau": 2, "winner_worse_on_a_dim": 0}
    assert "warning: no pair kept" in capsys.readouterr().err

    rows, summary = filtered("--targets", "all", "--tau", "5", "--keep-all")  # ablation: the same verdicts, none dropped
    assert [r["id"] for r in rows] == ["000000", "000001", "000002", "000003"] and all("S" in r for r in rows)
    assert summary["counts"]["kept"] == 0 and summary["args"]["keep_all"] is True


def test_filter_scores_once_and_reruns_score_nothing(hand_pairs, tmp_path, capsys):
    pairs, _ = hand_pairs
    out = tmp_path / "run" / "kept.jsonl"
    cache = tmp_path / "run" / "score_cache.jsonl"  # the default: beside the output
    args = ("--job", "filter", "--pairs", pairs, "--out", out, "--batch-size", "3", "--device", "cpu")
    call(*args)
    lines = cache.read_text().splitlines()
    first = json.loads(out.with_suffix(".json").read_text())
    assert first["videos"] == {"unique": 8, "scored": 8, "cached": 0} and len(lines) == 8
    entry = json.loads(lines[0])
    assert set(entry) == {"key", "scorer", "prompt", "video", "scores"} and set(entry["scores"]) == set(DIMS)
    assert entry["video"] == "../pairs/videos/000000_winner.mp4"
    # the toy judge's own scores, recorded unchanged
    video = models.read_video(str(pairs.parent / "videos" / "000000_winner.mp4"))
    assert entry["scores"] == pytest.approx(rewards.get_scorer("toy").score([video], [HAND_PROMPTS[0]])[0])
    cache.write_text("\n".join(lines[:-1]) + '\n{"key": "torn by a cra')  # a crash mid-append, one entry lost
    call(*args)
    assert json.loads(out.with_suffix(".json").read_text())["videos"] == {"unique": 8, "scored": 1, "cached": 7}
    assert cache.read_text().splitlines()[-1] == lines[-1]  # the new entry starts its own line
    call(*args)
    second = json.loads(out.with_suffix(".json").read_text())
    assert second["videos"] == {"unique": 8, "scored": 0, "cached": 8}
    assert second["pairs"] == first["pairs"]
    assert "videos scored 0, cached 8" in capsys.readouterr().out


def test_input_is_never_overwritten(hand_pairs, tmp_path):
    pairs, cache = hand_pairs
    before = pairs.read_bytes()
    proc = run("filter_pairs.py", "--job", "filter", "--pairs", pairs, "--out", pairs, check=False)  # a real process
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --out") and "overwrite" in proc.stderr
    for flags in (["--out", pairs.with_suffix(".txt"), "--score-cache", pairs],
                  ["--out", tmp_path / "o.jsonl", "--score-cache", tmp_path / "o.jsonl"]):
        with pytest.raises(models.UserError, match="overwrite"):
            call("--job", "filter", "--pairs", pairs, *flags)
    assert pairs.read_bytes() == before and not (tmp_path / "o.jsonl").exists()
    with pytest.raises(models.UserError, match="overwrite"):
        call("--job", "curate", "--prompts", tmp_path / "p.txt", "--targets", "all", "--out", tmp_path / "p.txt")


def test_bad_pairs_files_name_file_and_line(hand_pairs, tmp_path):
    pairs, _ = hand_pairs
    lines = pairs.read_text().splitlines()
    bad = pairs.parent / "bad.jsonl"
    for text, msg in [(lines[0] + "\n{not json\n", "bad.jsonl:2: not valid JSON"),
                      (lines[0] + '\n{"id": "1", "prompt": "x", "winner": {}}\n', "bad.jsonl:2: missing field 'winner.video'"),
                      (lines[0].replace("000000_loser.mp4", "gone.mp4") + "\n", "bad.jsonl:1: missing video videos/gone.mp4"),
                      ("", "bad.jsonl: no pairs")]:
        bad.write_text(text)
        with pytest.raises(models.UserError, match=msg):
            call("--job", "filter", "--pairs", bad, "--out", tmp_path / "o.jsonl")
    (pairs.parent / "videos" / "broken.mp4").write_bytes(b"not a video")
    bad.write_text(lines[0].replace("000000_loser.mp4", "broken.mp4") + "\n")
    with pytest.raises(models.UserError, match="broken.mp4: cannot read video"):
        call("--job", "filter", "--pairs", bad, "--out", tmp_path / "o.jsonl")
    with pytest.raises(models.UserError, match="--batch-size must be >= 1"):
        call("--job", "filter", "--pairs", pairs, "--batch-size", "0", "--out", tmp_path / "o.jsonl")


def test_clip_scorer_end_to_end_on_make_pairs_output(pairs, clip_dir, tmp_path):
    """The real clip scorer on make_pairs.py's pairs, as a process; the output lives in another folder."""
    src = os.path.join(pairs[0], "pairs.jsonl")
    out = tmp_path / "filtered" / "pairs.jsonl"
    proc = run("filter_pairs.py", "--job", "filter", "--pairs", src, "--scorer", "clip", "--scorer-path", clip_dir,
               "--batch-size", "3", "--tau", "-10", "--out", out)
    summary = json.loads(out.with_suffix(".json").read_text())
    inp = {r["id"]: r for r in models.read_jsonl(src)}
    rows = models.read_jsonl(str(out))
    c = summary["counts"]
    assert c["in"] == len(inp) == c["kept"] + c["winner_not_better"] + c["loser_below_tau"] == 4
    assert len(rows) == c["kept"] and f"kept {c['kept']}/4 pairs" in proc.stdout
    assert summary["videos"]["scored"] == summary["videos"]["unique"] > 0 and summary["scorer"]["name"] == "clip"
    for r in rows:
        assert r["targets"] == summary["targets"]
        for side in ("winner", "loser"):
            assert r[side]["video"] != inp[r["id"]][side]["video"]  # rewritten for the new folder ...
            assert os.path.isfile(out.parent / r[side]["video"])  # ... and valid from it
            assert r["S"][side] == pytest.approx(rewards.mean_score(r["scores"][side], r["targets"]))
            assert os.path.isfile(out.parent / r[side]["latents"])
        assert fp.keep_pair(r["S"]["winner"], r["S"]["loser"], -10) == (True, "kept")
    for p in summary["pairs"]:
        assert fp.keep_pair(p["S"]["winner"], p["S"]["loser"], -10)[1] == p["reason"]
    cache = out.parent / "score_cache.jsonl"
    size = cache.stat().st_size
    scorer = rewards.get_scorer("clip", clip_dir)
    for entry in map(json.loads, cache.read_text().splitlines()):  # every video's real clip scores
        video = models.read_video(str(out.parent / entry["video"]))
        assert entry["scores"] == pytest.approx(scorer.score([video], [entry["prompt"]])[0], abs=1e-5)
    assert len(cache.read_text().splitlines()) == summary["videos"]["unique"]
    call("--job", "filter", "--pairs", src, "--scorer", "clip", "--scorer-path", clip_dir, "--score", "avg", "--out", out)
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["videos"]["scored"] == 0 and cache.stat().st_size == size
    assert again["score_dims"] == list(DIMS)


def test_torchrun_two_processes_split_the_scoring(hand_pairs, tmp_path):
    pairs, _ = hand_pairs
    single = tmp_path / "single" / "kept.jsonl"
    call("--job", "filter", "--pairs", pairs, "--out", single)
    out = tmp_path / "ddp" / "kept.jsonl"
    with socket.socket() as s:  # a free port: other runs may hold a fixed one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), os.path.join(ROOT, "filter_pairs.py"), "--job", "filter", "--pairs", str(pairs),
                           "--out", str(out), "--batch-size", "2"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("filter_pairs filter:") == 1  # rank 0 reports alone
    assert len((tmp_path / "ddp" / "score_cache.jsonl").read_text().splitlines()) == 8  # each video scored once
    assert json.loads(out.with_suffix(".json").read_text())["pairs"] == \
           json.loads(single.with_suffix(".json").read_text())["pairs"]
    assert out.read_text() == single.read_text()

