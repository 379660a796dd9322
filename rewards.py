"""Support module: reward scorers giving the four dimensions of METHOD.md section 5/7, and their summary.

The paper's reward is VideoScore (TIGER-Lab): a Mantis-Idefics2-8B regression model that rates a
video on visual quality (VQ), temporal consistency (TC), dynamic degree (DD) and text alignment (TA)
on a 1-4 scale. The scorers here are cheap, local PROXIES of those four dimensions, not VideoScore:
their numbers are on their own scales and are not comparable with the paper's table.

Interface (every scorer):
    scorer = get_scorer(name, path, device)       # name in SCORERS
    rows = scorer.score(videos, prompts)          # one {dim: float} per video, exactly DIMS
    scorer.name, scorer.fingerprint               # the fingerprint keys score caches
`videos` is uint8 (N, F, H, W, 3) or a list of (F, H, W, 3) arrays of possibly different sizes;
`prompts` holds one prompt per video. `aggregate(rows)` gives means with 95 % intervals.

Scorers:
  clip  open_clip from local weights only (`path` = a folder with open_clip_config.json, or
        ARCH:FILE such as ViT-H-14:/weights/open_clip_model.safetensors; for OpenAI weights use
        the `-quickgelu` architecture). Per video, with unit-norm frame embeddings e_f:
          VQ = mean_f softmax(logit_scale * [cos(e_f, "a good photo."), cos(e_f, "a bad photo.")])[good]
          TC = mean_f cos(e_f, e_{f+1})
          DD = 1 - exp(-mad / MOTION_SCALE), mad = mean |frame_{f+1} - frame_f| in pixels / 255
          TA = mean_f cos(e_f, text embedding of the prompt)   (raw CLIP cosine, ~0.2-0.35 for real CLIP)
  toy   the judge of the embedded toy world (`toy.world.judge`), scores in [0, 1].
"""
import hashlib
import math
import os
import types

import numpy as np
import torch

import models

DIMS = models.DIMS
SCORERS = ("clip", "toy")
VERSION = "1"                  # bump when a dimension's definition changes: invalidates score caches
MOTION_SCALE = 0.05            # DD: a mean absolute change of 5 % of the range per frame gives 1 - 1/e
QUALITY_PROMPTS = ("a good photo.", "a bad photo.")  # VQ: CLIP-IQA-style antonym pair, good first


class Scorer:
    """A reward model: `score(videos, prompts)` -> per video a dict of the four DIMS as floats."""
    name = ""
    fingerprint = ""

    def score(self, videos, prompts):
        raise NotImplementedError


def as_videos(videos, prompts):
    """Validate a batch and return it as a list of uint8 (F, H, W, 3) arrays, F >= 2."""
    videos = list(videos)  # an (N, F, H, W, 3) array iterates as N (F, H, W, 3) views
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    for i, v in enumerate(videos):
        if not (isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 4 and v.shape[-1] == 3
                and v.shape[0] >= 2):
            raise ValueError(f"video {i}: expected a uint8 (F >= 2, H, W, 3) array, "
                             f"got {getattr(v, 'dtype', type(v).__name__)} {getattr(v, 'shape', '')}")
    return videos


def motion(video):
    """Mean absolute change between consecutive frames, as a fraction of the pixel range."""
    return float(np.abs(np.diff(video.astype(np.int16), axis=0)).mean()) / 255.0


# ----------------------------------------------------------------------------- clip
def open_clip_source(path):
    """(model_name, pretrained file or None, model_cfg) for open_clip; local files only, never a hub."""
    import open_clip

    if not path:
        raise models.UserError("the clip scorer needs a local path: a folder with open_clip_config.json, "
                               "or ARCH:FILE")
    path = path.removeprefix("local-dir:")
    if path.startswith("hf-hub:"):
        raise models.UserError(f"{path}: hub models are not fetched; download it and give its local folder")
    if os.path.isdir(path):
        config = os.path.join(path, "open_clip_config.json")
        if not os.path.isfile(config):
            raise models.UserError(f"{path}: not an open_clip folder (missing open_clip_config.json)")
        cfg = models.read_json(config)
        if "model_cfg" not in cfg:
            raise models.UserError(f"{config}: missing 'model_cfg'")
        return "local-dir:" + path, None, cfg["model_cfg"]
    arch, sep, file = path.partition(":")
    if not sep:
        if os.path.isfile(path):
            raise models.UserError(f"{path}: a weights file needs its architecture: give ARCH:{path}")
        raise models.UserError(f"{path}: no such open_clip folder or file")
    if not os.path.isfile(file):
        raise models.UserError(f"{file}: no such open_clip weights file")
    if not file.endswith((".safetensors", ".bin", ".pt", ".pth")):
        raise models.UserError(f"{file}: expected a .safetensors, .bin, .pt or .pth weights file")
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise models.UserError(f"unknown open_clip architecture '{arch}' (see open_clip.list_models())")
    return arch, file, cfg


class ClipScorer(Scorer):
    name = "clip"

    def __init__(self, path, device="cpu", batch_size=32):
        import open_clip

        model_name, pretrained, model_cfg = open_clip_source(path)
        try:
            self.model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                                require_pretrained=True).eval()
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            raise models.UserError(f"{path}: cannot load open_clip weights ({type(e).__name__}: {e})"
                                   .splitlines()[0])
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device, self.batch_size = device, batch_size
        pp = self.model.visual.preprocess_cfg
        if pp["resize_mode"] not in ("shortest", "squash"):
            raise models.UserError(f"{path}: resize_mode '{pp['resize_mode']}' is not supported")
        size = pp["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(pp["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp["std"], device=device).view(1, 3, 1, 1)
        self.pp = pp
        config = dict(version=VERSION, model_cfg=model_cfg, preprocess=pp, quality=QUALITY_PROMPTS,
                      motion_scale=MOTION_SCALE)
        self.fingerprint = "clip-" + models.fingerprint(
            types.SimpleNamespace(config=config, state_dict=self.model.state_dict))

    def preprocess(self, video):
        """uint8 (F, H, W, 3) -> normalised (F, 3, h, w) at the model's size, as open_clip's transform."""
        x = torch.from_numpy(video).to(self.device).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)
        th, tw = self.size
        if self.pp["resize_mode"] == "squash":
            shape = (th, tw)
        else:  # 'shortest': scale the short side to the target, then center-crop
            s = max(th / x.shape[-2], tw / x.shape[-1])
            shape = (max(th, round(x.shape[-2] * s)), max(tw, round(x.shape[-1] * s)))
        x = torch.nn.functional.interpolate(x, size=shape, mode=self.pp["interpolation"], antialias=True)
        top, left = (shape[0] - th) // 2, (shape[1] - tw) // 2
        x = x[..., top:top + th, left:left + tw].clamp(0, 1)  # (F, 3, th, tw)
        return (x - self.mean) / self.std

    def embed_text(self, texts):
        """Unit-norm text embeddings (len(texts), D)."""
        tokens = self.tokenizer(list(texts)).to(self.device)  # (T, context_length)
        return torch.cat([self.model.encode_text(t, normalize=True) for t in tokens.split(self.batch_size)])

    def embed_frames(self, video):
        """Unit-norm image embeddings of every frame (F, D), batched over frames."""
        x = self.preprocess(video)
        return torch.cat([self.model.encode_image(b, normalize=True) for b in x.split(self.batch_size)])

    @torch.no_grad()
    def score(self, videos, prompts):
        videos = as_videos(videos, prompts)
        texts = list(dict.fromkeys(prompts))  # unique prompts, in order
        t = self.embed_text(texts + list(QUALITY_PROMPTS))  # (T + 2, D)
        t_prompt, t_quality = t[:len(texts)], t[len(texts):]
        logit_scale = self.model.logit_scale.exp()
        rows = []
        for video, prompt in zip(videos, prompts):
            e = self.embed_frames(video)  # (F, D)
            quality = (logit_scale * e @ t_quality.T).softmax(dim=-1)[:, 0]  # (F,) p(good)
            rows.append({
                "visual_quality": quality.mean().item(),
                "temporal_consistency": (e[1:] * e[:-1]).sum(-1).mean().item(),
                "dynamic_degree": 1.0 - math.exp(-motion(video) / MOTION_SCALE),
                "text_alignment": (e @ t_prompt[texts.index(prompt)]).mean().item(),
            })
        return rows


# ----------------------------------------------------------------------------- toy
class ToyScorer(Scorer):
    """The toy world's own judge (imported lazily: rewards.py imports without it)."""
    name = "toy"

    @property
    def fingerprint(self):
        from toy import world

        with open(world.__file__, "rb") as f:
            return f"toy-{VERSION}-" + hashlib.sha256(f.read()).hexdigest()[:16]

    def score(self, videos, prompts):
        from toy.world import judge

        as_videos(videos, prompts)
        return [{d: float(row[d]) for d in DIMS} for row in judge(videos, prompts)]


def get_scorer(name, path="", device="cpu"):
    """The scorer `name` (one of SCORERS); `path` locates its weights (clip only)."""
    if name == "clip":
        return ClipScorer(path, models.resolve_device(device))
    if name == "toy":
        return ToyScorer()
    raise models.UserError(f"unknown scorer '{name}' (choose from {', '.join(SCORERS)})")


# ----------------------------------------------------------------------------- summary
def mean_score(row, dims=DIMS):
    """One video's score over `dims` (the 'average' column; S of METHOD.md section 5 step 4)."""
    return float(np.mean([row[d] for d in dims]))


def interval(values):
    """Mean and 95 % normal interval mean +- 1.96 * std / sqrt(n) (n - 1 std; zero width for n = 1)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    m = x.mean()
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return {"mean": float(m), "ci95": [float(m - half), float(m + half)], "n": int(len(x))}


def aggregate(rows, dims=DIMS):
    """Per dimension and for 'average' (each video's mean over `dims`): {mean, ci95: [lo, hi], n}."""
    out = {d: interval([row[d] for row in rows]) for d in dims}
    out["average"] = interval([mean_score(row, dims) for row in rows])
    return out
