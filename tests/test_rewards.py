"""rewards.py: the clip proxy scorer on a tiny random open_clip model, the toy delegation, aggregate."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

import models
import rewards

from tiny import TINY_CLIP, make_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny"))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return rewards.get_scorer("clip", clip_dir)


def videos(seed=0, n=3, frames=4, h=40, w=56):
    """Video 0 frozen, the others independent noise per frame (maximal motion): uint8 (n, F, h, w, 3)."""
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 256, (n, frames, h, w, 3), dtype=np.uint8)
    v[0] = v[0, :1]
    return v


def test_clip_scores_four_finite_dims(scorer):
    rows = scorer.score(videos(), ["a red square moving left"] * 3)
    assert len(rows) == 3
    for row in rows:
        assert set(row) == set(rewards.DIMS)
        assert all(isinstance(x, float) and math.isfinite(x) for x in row.values())
        assert 0.0 <= row["visual_quality"] <= 1.0 and 0.0 <= row["dynamic_degree"] < 1.0
    frozen, noisy = rows[0], rows[1]
    assert frozen["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert frozen["dynamic_degree"] == 0.0 < noisy["dynamic_degree"]


def test_text_alignment_follows_the_prompt_only(scorer):
    v = videos(n=2)
    a = scorer.score(v, ["a blue circle moving up", "a red square moving left"])[1]
    b = scorer.score(v[1:], ["a blue circle moving up"])[0]
    c = scorer.score(v[1:], ["a red square moving left"])[0]
    assert a == pytest.approx(c, abs=1e-6)  # a video's scores do not depend on the rest of the batch
    assert abs(b["text_alignment"] - c["text_alignment"]) > 1e-4
    for d in ("visual_quality", "temporal_consistency", "dynamic_degree"):  # video-only dims
        assert b[d] == pytest.approx(c[d], abs=1e-6)


def test_deterministic_and_list_of_sizes(scorer, clip_dir):
    v = videos()
    prompts = ["a", "b", "c"]
    assert scorer.score(v, prompts) == scorer.score(v, prompts)
    assert rewards.get_scorer("clip", clip_dir).score(v, prompts) == scorer.score(v, prompts)
    mixed = [v[1], videos(seed=1, n=2, frames=3, h=24, w=24)[1],
             videos(seed=2, n=1, frames=5, h=64, w=33)[0]]  # (4, 40, 56), (3, 24, 24), (5, 64, 33)
    rows = scorer.score(mixed, prompts)
    assert len(rows) == 3 and all(math.isfinite(x) for r in rows for x in r.values())
    assert rows[0] == pytest.approx(scorer.score(v[1:2], ["a"])[0], abs=1e-6)


def test_preprocess_matches_open_clip_transform(scorer):
    """Our tensor resize + crop + normalise against open_clip's own PIL transform (smooth image)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    yy, xx = np.mgrid[0:48, 0:80]
    img = np.stack([xx * 3, yy * 5, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)  # (48, 80, 3)
    ours = scorer.preprocess(np.stack([img, img]))[0]  # (3, 32, 32)
    transform = image_transform_v2(PreprocessCfg(**scorer.model.visual.preprocess_cfg), is_train=False)
    theirs = transform(Image.fromarray(img))
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.02


def test_arch_file_loads_like_the_folder(scorer, clip_dir, monkeypatch):
    import open_clip.factory

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "vip-tiny-clip", TINY_CLIP)
    weights = os.path.join(clip_dir, "open_clip_model.safetensors")
    other = rewards.get_scorer("clip", "vip-tiny-clip:" + weights)  # the ARCH:FILE form
    v = videos()
    mine, theirs = other.score(v, ["a", "b", "c"]), scorer.score(v, ["a", "b", "c"])
    assert len(mine) == len(theirs) == 3
    for a, b in zip(mine, theirs):  # per video, per dimension (approx does not take nested structures)
        assert a.keys() == b.keys()
        assert all(a[d] == pytest.approx(b[d], abs=1e-6) for d in a)
    assert other.fingerprint == scorer.fingerprint


def test_fingerprint_depends_on_weights(scorer, tmp_path):
    assert scorer.fingerprint.startswith("clip-")
    other = rewards.get_scorer("clip", make_tiny_clip(str(tmp_path / "other"), seed=1))
    assert other.fingerprint != scorer.fingerprint


def test_toy_delegates_to_the_world_judge(monkeypatch, tmp_path):
    src = tmp_path / "world.py"
    src.write_text("# fake toy world\n")
    calls = []

    def judge(videos, prompts):
        calls.append(len(prompts))
        return [{d: np.float32(0.5) for d in rewards.DIMS} for _ in prompts]

    monkeypatch.setitem(sys.modules, "toy.world", types.SimpleNamespace(judge=judge, __file__=str(src)))
    scorer = rewards.get_scorer("toy")
    rows = scorer.score(videos(n=2), ["a", "b"])
    assert calls == [2] and rows == [{d: 0.5 for d in rewards.DIMS}] * 2
    assert all(type(x) is float for x in rows[0].values())
    assert scorer.fingerprint.startswith("toy-")


def test_aggregate_known_numbers():
    rows = [dict(zip(rewards.DIMS, vals)) for vals in [(1, 2, 3, 4), (2, 2, 3, 5), (3, 2, 3, 6), (4, 2, 3, 7)]]
    out = rewards.aggregate(rows)
    half = 1.96 * np.std([1, 2, 3, 4], ddof=1) / 2  # = 1.2652
    assert out["visual_quality"]["mean"] == pytest.approx(2.5)
    assert out["visual_quality"]["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert out["temporal_consistency"]["ci95"] == pytest.approx([2.0, 2.0])
    assert out["average"]["mean"] == pytest.approx(np.mean([2.5, 3.0, 3.5, 4.0]))
    assert out["average"]["n"] == 4 and set(out) == set(rewards.DIMS) | {"average"}
    one = rewards.aggregate(rows[:1], dims=("visual_quality", "text_alignment"))
    assert one["average"] == {"mean": 2.5, "ci95": [2.5, 2.5], "n": 1}
    assert rewards.aggregate([])["average"]["n"] == 0


def test_errors(tmp_path, clip_dir):
    missing = str(tmp_path / "no_such_clip")
    with pytest.raises(models.UserError, match="no_such_clip"):
        rewards.get_scorer("clip", missing)
    with pytest.raises(models.UserError, match="nope.safetensors"):
        rewards.get_scorer("clip", "ViT-B-32:" + str(tmp_path / "nope.safetensors"))
    weights = os.path.join(clip_dir, "open_clip_model.safetensors")
    with pytest.raises(models.UserError, match="unknown open_clip architecture"):
        rewards.get_scorer("clip", "No-Such-Arch:" + weights)
    with pytest.raises(models.UserError, match="needs its architecture"):
        rewards.get_scorer("clip", weights)
    with pytest.raises(models.UserError, match="open_clip_config.json"):
        rewards.get_scorer("clip", str(tmp_path))
    with pytest.raises(models.UserError, match="local path"):
        rewards.get_scorer("clip", "")
    with pytest.raises(models.UserError, match="videoscore, clip, toy"):
        rewards.get_scorer("bogus")
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with pytest.raises(models.UserError, match="cannot load"):
        rewards.get_scorer("clip", str(empty))


def test_bad_video_batches(scorer):
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        scorer.score(videos(n=2), ["a"])
    with pytest.raises(ValueError, match="video 0"):
        scorer.score(videos(n=1).astype(np.float32), ["a"])
    with pytest.raises(ValueError, match="F >= 2"):
        scorer.score(videos(n=1, frames=1), ["a"])
