"""A procedural text-to-video world small enough to train a teacher on two CPU cores, and its judge.

Clips: 8 frames of 32x32 RGB (uint8, (F, H, W, 3)) showing one ~10 px object (square, circle,
triangle; red, green, blue, yellow) that moves left/right/up/down at 1 px/frame ("slowly") or
2.5 px/frame ("quickly") over a dark background, anti-aliased by 4x supersampling.
Prompts: "a {color} {shape} moving {direction} {speed}" (every word one CLIP token), 96 in all;
24 of them (balanced over every attribute) are held out for evaluation.

The judge scores videos on the four dimensions the method reports (models.DIMS) with analytic
measurements (no learned model): see `judge` and `judge_details`.

    python -c "from toy import world; print(world.eval_prompts())"
"""
import itertools
import math

import numpy as np

FRAMES, SIZE, SUPER = 8, 32, 4
COLORS = {"red": (225, 45, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
SPEEDS = {"slowly": 1.0, "quickly": 2.5}  # px per frame
BACKGROUND = (18, 18, 26)
HALF = 6.0  # half the largest extent of any shape (px): start positions keep the object in frame


# ----------------------------------------------------------------------------- prompts
def make_prompt(color, shape, direction, speed):
    return f"a {color} {shape} moving {direction} {speed}"


def parse_prompt(prompt):
    """'a red square moving left quickly' -> {'color': 'red', 'shape': 'square', ...}; ValueError otherwise."""
    words = str(prompt).strip().lower().split()
    if (len(words) != 6 or words[0] != "a" or words[3] != "moving" or words[1] not in COLORS
            or words[2] not in SHAPES or words[4] not in DIRECTIONS or words[5] not in SPEEDS):
        raise ValueError(f"not a toy-world prompt: '{prompt}' (expected e.g. 'a red square moving left quickly')")
    return {"color": words[1], "shape": words[2], "direction": words[4], "speed": words[5]}


def _combos():
    return list(itertools.product(range(len(COLORS)), range(len(SHAPES)), range(len(DIRECTIONS)), range(len(SPEEDS))))


def _prompt_of(c, s, d, v):
    return make_prompt(list(COLORS)[c], SHAPES[s], list(DIRECTIONS)[d], list(SPEEDS)[v])


def all_prompts():
    """The 96 prompts of the grammar in a fixed order."""
    return [_prompt_of(*k) for k in _combos()]


def _is_eval(c, s, d, v):
    # A Latin-square rule: for each (color, shape, speed) exactly one direction is held out, so the
    # 24 eval prompts hold every color 6x, shape 8x, direction 6x and speed 12x.
    return (c + s + d + v) % len(DIRECTIONS) == 0


def eval_prompts():
    """The 24 held-out prompts (deterministic, balanced over attributes)."""
    return [_prompt_of(*k) for k in _combos() if _is_eval(*k)]


def train_prompts():
    """The other 72 prompts (the teacher's training prompts)."""
    return [_prompt_of(*k) for k in _combos() if not _is_eval(*k)]


def _is_val(c, s, d, v):
    # The same Latin square shifted by two: 24 of the train prompts, as balanced as the eval set.
    return (c + s + d + v) % len(DIRECTIONS) == 2


def val_prompts():
    """24 train prompts set apart to choose distillation settings on (never the eval prompts)."""
    return [_prompt_of(*k) for k in _combos() if _is_val(*k)]


def pool_prompts():
    """The 48 train prompts that are neither validation nor eval: the pool pairs are made from."""
    return [_prompt_of(*k) for k in _combos() if not _is_eval(*k) and not _is_val(*k)]


def write_prompt_file(path, which="eval"):
    """Write one prompt a line (the format models.read_prompts reads); which: eval, val, pool, train or all."""
    prompts = {"eval": eval_prompts, "val": val_prompts, "pool": pool_prompts, "train": train_prompts,
               "all": all_prompts}[which]()
    with open(path, "w") as f:
        f.write(f"# toy world: {which} prompts ({len(prompts)})\n" + "\n".join(prompts) + "\n")
    return path


# ----------------------------------------------------------------------------- rendering
_SUB = (np.arange(SIZE * SUPER) + 0.5) / SUPER  # supersample centres in pixel units


def _coverage(shape, cx, cy):
    """Anti-aliased coverage (F, H, W) in [0, 1] of `shape` centred at (cx[f], cy[f])."""
    u = _SUB[None, None, :] - cx[:, None, None]  # (F, 1, W*S)
    v = _SUB[None, :, None] - cy[:, None, None]  # (F, H*S, 1)
    if shape == "square":  # 10 x 10
        inside = (np.abs(u) <= 5.0) & (np.abs(v) <= 5.0)
    elif shape == "circle":  # radius 5.8
        inside = u * u + v * v <= 5.8 ** 2
    else:  # triangle pointing up: apex at v = -6, base (width 12) at v = +5
        inside = (v >= -6.0) & (v <= 5.0) & (np.abs(u) <= (v + 6.0) * 6.0 / 11.0)
    f = cx.shape[0]
    inside = np.broadcast_to(inside, (f, SIZE * SUPER, SIZE * SUPER))
    return inside.reshape(f, SIZE, SUPER, SIZE, SUPER).mean(axis=(2, 4))  # (F, H, W)


def render(attrs, rng):
    """uint8 clip (F, H, W, 3) for attrs {'color', 'shape', 'direction', 'speed'} (or a prompt string)."""
    if isinstance(attrs, str):
        attrs = parse_prompt(attrs)
    dx, dy = DIRECTIONS[attrs["direction"]]
    travel = SPEEDS[attrs["speed"]] * (FRAMES - 1)
    lo, hi = HALF, SIZE - HALF  # range of the centre that keeps the object inside the frame
    # along the motion axis the whole trajectory must fit; across it any position does
    start = [rng.uniform(lo + travel * (d < 0), hi - travel * (d > 0)) if d else rng.uniform(lo, hi)
             for d in (dx, dy)]
    t = np.arange(FRAMES)
    cx = start[0] + dx * SPEEDS[attrs["speed"]] * t
    cy = start[1] + dy * SPEEDS[attrs["speed"]] * t
    alpha = _coverage(attrs["shape"], cx, cy)[..., None]  # (F, H, W, 1)
    clip = (1 - alpha) * np.array(BACKGROUND, np.float32) + alpha * np.array(COLORS[attrs["color"]], np.float32)
    return np.round(clip).astype(np.uint8)


def sample_clips(n, rng, prompts=None):
    """n clips (n, F, H, W, 3) uint8 and their prompts, prompts drawn uniformly (default: train prompts)."""
    prompts = list(prompts) if prompts is not None else train_prompts()
    chosen = [prompts[i] for i in rng.integers(0, len(prompts), size=n)]
    parsed = {p: parse_prompt(p) for p in set(chosen)}
    return np.stack([render(parsed[p], rng) for p in chosen]), chosen



# ----------------------------------------------------------------------------- the toy judge
# Analytic, per frame: background = the frame's median color; the object's color = the mean of its
# brightest-contrast pixels; alpha = each pixel's projection onto (object color - background), so
# anti-aliasing, blur and noise all read as soft coverage. Frames with no visible object score 0.
MIN_CONTRAST = 50.0  # the object's core must differ from the background by this much (0-255 units)
# area / (soft width * soft height), as measured on rendered clips (ideal: 1, pi/4, 1/2)
SHAPE_FILL = {"square": 1.0, "circle": 0.79, "triangle": 0.57}
_DIR_VECS = np.array(list(DIRECTIONS.values()), np.float64)  # (4, 2)
_PALETTE = np.array(list(COLORS.values()), np.float64) - np.array(BACKGROUND, np.float64)
_PALETTE /= np.linalg.norm(_PALETTE, axis=1, keepdims=True)  # (4, 3) unit color directions
_FILLS = np.array(list(SHAPE_FILL.values()))


def _dilate(mask, r):
    """Binary dilation of (..., H, W) by a (2r+1)^2 square (numpy only)."""
    for _ in range(r):
        m = mask.copy()
        m[..., 1:, :] |= mask[..., :-1, :]
        m[..., :-1, :] |= mask[..., 1:, :]
        mask = m.copy()
        mask[..., :, 1:] |= m[..., :, :-1]
        mask[..., :, :-1] |= m[..., :, 1:]
    return mask


def frame_features(frames):
    """Per-frame measurements of uint8 frames (..., H, W, 3): a dict of arrays of shape (...)."""
    lead = np.shape(frames)[:-3]
    x = np.asarray(frames, np.float64).reshape(-1, *np.shape(frames)[-3:])  # (M, H, W, 3)
    f, h, w, _ = x.shape
    bg = np.median(x.reshape(f, -1, 3), axis=1)  # (M, 3)
    diff = x - bg[:, None, None, :]  # (M, H, W, 3)
    dist = np.linalg.norm(diff, axis=-1).reshape(f, -1)  # (M, H*W)
    contrast = np.sort(dist, axis=1)[:, -12:].mean(1)  # (M,) the object's core vs the background
    core = dist >= 0.8 * contrast[:, None]  # (M, H*W)
    color = (diff.reshape(f, -1, 3) * core[..., None]).sum(1) / np.maximum(core.sum(1), 1)[:, None]  # (M, 3)
    cnorm2 = np.maximum((color ** 2).sum(-1), 1e-6)  # (M,)
    alpha = np.einsum("fhwc,fc->fhw", diff, color) / cnorm2[:, None, None]  # (M, H, W) soft coverage
    region = _dilate(alpha > 0.5, 1)
    a = np.clip(alpha, 0, 1) * region  # (M, H, W)
    area = a.sum((1, 2))
    width, height = a.max(1).sum(1), a.max(2).sum(1)  # soft extents: sub-pixel- and blur-robust
    fill = area / np.maximum(width * height, 1e-6)
    ys, xs = np.mgrid[0:h, 0:w]
    cx = (a * xs).sum((1, 2)) / np.maximum(area, 1e-6)
    cy = (a * ys).sum((1, 2)) / np.maximum(area, 1e-6)
    soft_edge = ((alpha > 0.05) & (alpha < 0.95) & region).sum((1, 2))
    edge_width = soft_edge / np.maximum(2 * (width + height), 1e-6)  # px of soft edge per px of outline
    far = ~_dilate(alpha > 0.25, 2)  # background away from the object
    noise = np.sqrt(((diff ** 2).mean(-1) * far).sum((1, 2)) / np.maximum(far.sum((1, 2)), 1))  # RMS
    rgb = color + bg
    # an object: contrasted, and one compact blob rather than texture all over the frame
    found = (contrast >= MIN_CONTRAST) & (area >= 4) & (np.maximum(width, height) <= 0.6 * max(h, w))
    ft = dict(found=found, contrast=contrast, area=area, fill=fill, cx=cx, cy=cy, rgb=rgb,
              edge_width=edge_width, noise=noise, chroma=rgb.max(-1) - rgb.min(-1),
              color_id=((color / np.sqrt(cnorm2)[:, None]) @ _PALETTE.T).argmax(1),
              shape_id=np.abs(fill[:, None] - _FILLS[None, :]).argmin(1))
    return {k: v.reshape(*lead, *v.shape[1:]) for k, v in ft.items()}


def _velocity(ft):
    """Least-squares centroid velocity (vx, vy) in px/frame over the frames with an object."""
    t = np.flatnonzero(ft["found"])
    if len(t) < 2:
        return 0.0, 0.0
    tc = t - t.mean()
    return (float((tc * ft["cx"][t]).sum() / (tc ** 2).sum()), float((tc * ft["cy"][t]).sum() / (tc ** 2).sum()))


def _score(ft, attrs):
    """The four dimensions and the details of one video from its frame features."""
    found = ft["found"]
    # visual quality: no background noise, a sharp edge, a saturated and contrasted object
    noise_q = 1 / (1 + (ft["noise"] / 10) ** 2)
    sharp_q = np.clip((3.0 - ft["edge_width"]) / 1.5, 0, 1)
    color_q = np.clip(ft["chroma"] / 120, 0, 1) * np.clip(ft["contrast"] / 120, 0, 1)
    visual = float((found * noise_q * sharp_q * color_q).mean())
    # temporal consistency: mean deviation of color, size and fill from the clip's median
    if found.sum() >= 2:
        med = lambda v: np.median(v[found], axis=0)  # noqa: E731
        dc = np.linalg.norm(ft["rgb"][found] - med(ft["rgb"]), axis=-1).mean() / 255
        da = np.abs(ft["area"][found] - med(ft["area"])).mean() / max(med(ft["area"]), 1e-6)
        df = np.abs(ft["fill"][found] - med(ft["fill"])).mean()
        temporal = float(found.mean() * math.exp(-(dc / 0.15 + da / 0.2 + df / 0.2)))
    else:
        temporal = 0.0
    # motion: the centroid's velocity against the prompted direction and speed
    vx, vy = _velocity(ft)
    speed = math.hypot(vx, vy)
    target = SPEEDS[attrs["speed"]]
    dynamic = float(found.mean() * math.exp(-math.log(max(speed, 1e-3) / target) ** 2 / (2 * 0.3 ** 2)))
    dx, dy = DIRECTIONS[attrs["direction"]]
    moving = speed >= 0.3
    direction_s = float(found.mean() * max(0.0, (vx * dx + vy * dy) / max(speed, 1e-9)) * min(1.0, speed / 0.5))
    color_s = float((found & (ft["color_id"] == list(COLORS).index(attrs["color"]))).mean())
    shape_s = float((found & (ft["shape_id"] == SHAPES.index(attrs["shape"]))).mean())
    scores = dict(visual_quality=visual, temporal_consistency=temporal, dynamic_degree=dynamic,
                  text_alignment=(color_s + shape_s + direction_s) / 3)
    measured_dir = list(DIRECTIONS)[int((_DIR_VECS @ [vx, vy]).argmax())]
    measured_speed = "quickly" if speed >= math.sqrt(SPEEDS["slowly"] * SPEEDS["quickly"]) else "slowly"
    details = dict(color=color_s > 0.5, shape=shape_s > 0.5,
                   direction=bool(moving and measured_dir == attrs["direction"]),
                   speed=bool(moving and measured_speed == attrs["speed"]),
                   color_score=color_s, shape_score=shape_s, direction_score=direction_s,
                   found=float(found.mean()), vx=vx, vy=vy, speed_px=speed)
    return scores, details


def _check(videos, prompts):
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
        raise ValueError(f"expected uint8 videos (N, F, H, W, 3), got {videos.dtype} {videos.shape}")
    if len(prompts) != len(videos):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    return videos, [parse_prompt(p) for p in prompts]


def judge(videos, prompts):
    """Per video a dict of the four dimensions (models.DIMS), each a float in [0, 1]:
    visual_quality (no noise, a sharp and saturated object), temporal_consistency (the same object's
    color, size and shape frame to frame), dynamic_degree (the centroid's speed against the prompted
    one), text_alignment (mean of the color, shape and direction sub-scores)."""
    videos, attrs = _check(videos, prompts)
    ft = frame_features(videos)  # arrays (N, F, ...)
    return [_score({k: v[i] for k, v in ft.items()}, a)[0] for i, a in enumerate(attrs)]


def judge_details(videos, prompts):
    """Per video: color/shape/direction/speed correct (bools; average them for accuracies), the
    sub-scores, and the measured velocity in px/frame."""
    videos, attrs = _check(videos, prompts)
    ft = frame_features(videos)  # arrays (N, F, ...)
    return [_score({k: v[i] for k, v in ft.items()}, a)[1] for i, a in enumerate(attrs)]
