"""The toy world: prompts, rendering, and the analytic judge on ground-truth and corrupted clips."""
import time

import numpy as np
import pytest

import models
from toy import world

DIMS = list(models.DIMS)


def mean_scores(videos, prompts):
    s = world.judge(videos, prompts)
    return {k: float(np.mean([r[k] for r in s])) for k in DIMS}


@pytest.fixture(scope="module")
def gt():
    """Every prompt once (96 distinct prompts), ground-truth clips."""
    rng = np.random.default_rng(0)
    prompts = world.all_prompts()
    return np.stack([world.render(p, rng) for p in prompts]), prompts


@pytest.fixture(scope="module")
def gt_scores(gt):
    return mean_scores(*gt)


def test_grammar_and_split():
    allp, train, ev = world.all_prompts(), world.train_prompts(), world.eval_prompts()
    assert len(set(allp)) == 96 and len(ev) == 24 and len(train) == 72
    assert not set(train) & set(ev) and set(train) | set(ev) == set(allp)
    assert ev == world.eval_prompts()  # deterministic
    attrs = [world.parse_prompt(p) for p in ev]
    for key, n in (("color", 6), ("shape", 8), ("direction", 6), ("speed", 12)):  # balanced
        values = [a[key] for a in attrs]
        assert all(values.count(v) == n for v in set(values)), key
    assert world.parse_prompt("a red square moving left quickly") == dict(
        color="red", shape="square", direction="left", speed="quickly")
    for bad in ("a purple square moving left quickly", "a red square moving left", "red square moving left quickly",
                "a red square moving sideways slowly", "", "a red square moving left quickly please"):
        with pytest.raises(ValueError):
            world.parse_prompt(bad)


def test_render_and_sample_clips(tmp_path):
    rng = np.random.default_rng(1)
    t0 = time.time()
    clips, prompts = world.sample_clips(500, rng)
    assert time.time() - t0 < 5  # 2,000 clips in a few seconds
    assert clips.shape == (500, 8, 32, 32, 3) and clips.dtype == np.uint8
    assert set(prompts) <= set(world.train_prompts())
    clips, prompts = world.sample_clips(4, rng, prompts=world.eval_prompts()[:1])
    assert set(prompts) == {world.eval_prompts()[0]}
    assert clips.reshape(-1, 3).min(0).tolist() == list(world.BACKGROUND)  # dark background, object in frame
    path = world.write_prompt_file(str(tmp_path / "eval.txt"), "eval")
    assert models.read_prompts(path) == world.eval_prompts()


def test_ground_truth_scores_near_one(gt_scores):
    for k in DIMS:
        assert gt_scores[k] >= 0.9, (k, gt_scores)
    details = world.judge_details(*world.sample_clips(64, np.random.default_rng(2), world.all_prompts()))
    for k in ("color", "shape", "direction", "speed"):
        assert np.mean([d[k] for d in details]) >= 0.95, k


def test_noise_hurts_visual_quality(gt, gt_scores):
    videos, prompts = gt
    noisy = np.clip(videos + np.random.default_rng(3).normal(0, 12, videos.shape), 0, 255).astype(np.uint8)
    s = mean_scores(noisy, prompts)
    assert s["visual_quality"] < gt_scores["visual_quality"] - 0.4
    for k in ("dynamic_degree", "text_alignment"):
        assert s[k] > gt_scores[k] - 0.1, k
    assert s["temporal_consistency"] > gt_scores["temporal_consistency"] - 0.2


def test_recolor_hurts_text_alignment_only(gt, gt_scores):
    videos, prompts = gt
    s = mean_scores(videos[..., [1, 2, 0]], prompts)  # channel rotation: every color becomes another
    assert s["text_alignment"] < gt_scores["text_alignment"] - 0.25
    for k in ("visual_quality", "temporal_consistency", "dynamic_degree"):
        assert abs(s[k] - gt_scores[k]) < 0.05, k
    assert np.mean([d["color"] for d in world.judge_details(videos[..., [1, 2, 0]], prompts)]) < 0.1


def test_frozen_hurts_dynamic_degree(gt, gt_scores):
    videos, prompts = gt
    s = mean_scores(np.repeat(videos[:, :1], 8, axis=1), prompts)
    assert s["dynamic_degree"] < 0.1
    assert s["visual_quality"] > 0.9 and s["temporal_consistency"] > 0.9


def test_wrong_direction_hurts_text_alignment(gt, gt_scores):
    videos, prompts = gt
    s = mean_scores(videos[:, ::-1], prompts)  # played backwards: the opposite direction
    assert s["text_alignment"] < gt_scores["text_alignment"] - 0.25
    assert s["dynamic_degree"] > 0.9
    assert np.mean([d["direction"] for d in world.judge_details(videos[:, ::-1], prompts)]) == 0


def test_midway_change_hurts_temporal_consistency(gt_scores):
    prompts, changed = world.eval_prompts(), []
    for i, p in enumerate(prompts):
        a = world.parse_prompt(p)
        b = dict(a, color=list(world.COLORS)[(list(world.COLORS).index(a["color"]) + 1) % 4]) if i % 2 else \
            dict(a, shape=world.SHAPES[(world.SHAPES.index(a["shape"]) + 1) % 3])
        first, second = world.render(a, np.random.default_rng(i)), world.render(b, np.random.default_rng(i))
        changed.append(np.concatenate([first[:4], second[4:]]))  # same trajectory, other object from frame 4
    s = world.judge(np.stack(changed), prompts)
    tc = [r["temporal_consistency"] for r in s]
    assert np.mean(tc[1::2]) < gt_scores["temporal_consistency"] - 0.4  # color changes
    assert np.mean(tc[0::2]) < gt_scores["temporal_consistency"] - 0.3  # shape changes
    assert np.mean([r["dynamic_degree"] for r in s]) > 0.85


def test_judge_is_robust_and_bounded():
    rng = np.random.default_rng(4)
    prompts = world.eval_prompts()[:4]
    videos = np.stack([np.zeros((8, 32, 32, 3), np.uint8),  # nothing
                       rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),  # pure noise
                       np.full((8, 32, 32, 3), 200, np.uint8),  # flat
                       world.render(prompts[3], rng)])
    videos[3, 2:5] = 0  # the object vanishes for three frames
    s = world.judge(videos, prompts)
    for r in s:
        assert set(r) == set(DIMS) and all(0.0 <= v <= 1.0 and np.isfinite(v) for v in r.values())
    for r in s[:3]:
        assert max(r.values()) < 0.5
    assert s[3]["temporal_consistency"] < 0.7
    with pytest.raises(ValueError):
        world.judge(videos, prompts[:3])
    with pytest.raises(ValueError):
        world.judge(videos.astype(np.float32), prompts)
