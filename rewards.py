"""Support module: reward scorers giving the four dimensions of METHOD.md section 5/7, and their summary.

The paper's reward is VideoScore (TIGER-Lab): a Mantis-Idefics2-8B regression model that rates a
video on visual quality (VQ), temporal consistency (TC), dynamic degree (DD) and text alignment (TA)
on a nominal 1-4 scale. `videoscore` runs the released weights; `clip` and `toy` are cheap, local
PROXIES of the same four dimensions, on their own scales, not comparable with the paper's table.

Interface (every scorer):
    scorer = get_scorer(name, path, device)       # name in SCORERS
    rows = scorer.score(videos, prompts)          # one {dim: float} per video: DIMS (+ EXTRA_DIMS, videoscore)
    scorer.name, scorer.fingerprint               # the fingerprint keys score caches
`videos` is uint8 (N, F, H, W, 3) or a list of (F, H, W, 3) arrays of possibly different sizes;
`prompts` holds one prompt per video. `aggregate(rows)` gives means with 95 % intervals.

Scorers:
  videoscore  VideoScore from its released folder, local files only (`path` = the folder of
        TIGER-Lab/VideoScore or TIGER-Lab/VideoScore-v1.1: config.json, sharded safetensors + index,
        processor and tokenizer files). Built from transformers classes (no `mantis` package):
        Idefics2Model + `score` = Linear(text hidden, 5) on the hidden state of the last real token,
        loaded strictly (every tensor used, none missing); bf16 on GPU, fp32 on CPU. As the repository's
        examples/run_videoscore.py: the query is VIDEOSCORE_QUERY with the prompt, then "<image> " per
        frame (no chat template; the processor adds BOS and expands each image into its tokens);
        frames: all up to 16 (48 for v1.1, recognised by "v1.1" in the folder's name), else
        np.arange(0, F, F / max) of them; images resized without splitting (shortest edge 378, longest
        980, from the folder's preprocessor_config.json). Raw regression outputs (no clipping) for VQ,
        TC, DD, TA and factual consistency, the last as "factual_consistency" (EXTRA_DIMS: reported by
        `aggregate`, never in DIMS or the average). Where transformers 5 differs from the 4.x Mantis
        code VideoScore was trained with, this follows the training: the perceiver's RMSNorm eps is the
        text model's (5.x reads its own, default 1e-6); tokenizer.json is used as saved (5.x's
        LlamaTokenizer rebuilds its normalizer and splits the spaces between image tokens differently);
        images are resized with PIL. Pooling reads each sequence's last real token from the attention
        mask (right padding; 5.x configs have no top-level pad id), so a batch equals one video at a time.
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
SCORERS = ("videoscore", "clip", "toy")
VERSION = "1"                  # bump when a dimension's definition changes: invalidates score caches
MOTION_SCALE = 0.05            # DD: a mean absolute change of 5 % of the range per frame gives 1 - 1/e
QUALITY_PROMPTS = ("a good photo.", "a bad photo.")  # VQ: CLIP-IQA-style antonym pair, good first
EXTRA_DIMS = ("factual_consistency",)  # reported when every row has them; never in DIMS or the average


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


# ----------------------------------------------------------------------------- videoscore
# REGRESSION_QUERY_PROMPT of TIGER-AI-Lab/VideoScore examples/run_videoscore.py, character for character
# (1,163 characters; one line ends in a space, hence one literal per line). The score depends on it.
VIDEOSCORE_QUERY = (
    "\n"
    "Suppose you are an expert in judging and evaluating the quality of AI-generated videos,\n"
    "please watch the following frames of a given video and see the text prompt for generating the video,\n"
    "then give scores from 5 different dimensions:\n"
    "(1) visual quality: the quality of the video in terms of clearness, resolution, brightness, and color\n"
    "(2) temporal consistency, both the consistency of objects or humans and the smoothness of motion or movements\n"
    "(3) dynamic degree, the degree of dynamic changes\n"
    "(4) text-to-video alignment, the alignment between the text prompt and the video content\n"
    "(5) factual consistency, the consistency of the video content with the common-sense and factual knowledge\n"
    "\n"
    "for each dimension, output a float number from 1.0 to 4.0,\n"
    "the higher the number is, the better the video performs in that sub-score, \n"
    "the lowest 1.0 means Bad, the highest 4.0 means Perfect/Real (the video is like a real video)\n"
    "Here is an output example:\n"
    "visual quality: 3.2\n"
    "temporal consistency: 2.7\n"
    "dynamic degree: 4.0\n"
    "text-to-video alignment: 2.3\n"
    "factual consistency: 1.8\n"
    "\n"
    "For this video, the text prompt is \"{text_prompt}\",\n"
    "all the frames of video are as follows:\n"
)
VIDEOSCORE_ASPECTS = (*DIMS, *EXTRA_DIMS)  # the head's five outputs, in order: VQ, TC, DD, TA, factual consistency
VIDEOSCORE_MAX_FRAMES = {"VideoScore": 16, "VideoScore-v1.1": 48}  # what each release was trained with
VIDEOSCORE_DOWNLOAD = "hf download TIGER-Lab/VideoScore --local-dir ckpt/VideoScore (or TIGER-Lab/VideoScore-v1.1)"


def videoscore_frame_indices(num_frames, max_frames):
    """Frames VideoScore sees: all up to `max_frames`, else evenly spaced as examples/run_videoscore.py does."""
    if num_frames > max_frames:
        return np.arange(0, num_frames, num_frames / max_frames).astype(int)
    return np.arange(num_frames)


def videoscore_query(prompt, num_frames):
    """The text for one video: the regression query with its prompt, then one '<image> ' per frame."""
    if "<image>" in prompt or "<fake_token_around_image>" in prompt:
        raise ValueError(f"prompt {prompt!r} contains an image token")
    return VIDEOSCORE_QUERY.format(text_prompt=prompt) + "<image> " * num_frames


def videoscore_max_frames(path):
    """48 for a VideoScore-v1.1 folder (recognised by 'v1.1' in its name), else 16 (VideoScore)."""
    return VIDEOSCORE_MAX_FRAMES["VideoScore-v1.1" if "v1.1" in os.path.basename(os.path.normpath(path)).lower()
                                 else "VideoScore"]


def videoscore_shards(path):
    """The weight files of a released VideoScore folder; a missing folder or file is a one-line UserError."""
    if not path or not os.path.isdir(path):
        raise models.UserError(f"videoscore: no folder '{path}': download it with {VIDEOSCORE_DOWNLOAD}")
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise models.UserError(f"{path}: missing {name}: download the whole folder with {VIDEOSCORE_DOWNLOAD}")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(models.read_json(index).get("weight_map", {}).values()))
    else:
        shards = ["model.safetensors"]
    for name in shards:
        if not os.path.isfile(os.path.join(path, name)):
            raise models.UserError(f"{path}: missing {name}: download the whole folder with {VIDEOSCORE_DOWNLOAD}")
    return [os.path.join(path, name) for name in shards]


class VideoScoreScorer(Scorer):
    """VideoScore = Idefics2Model + a linear regression head on the last real token (Mantis'
    Idefics2ForSequenceClassification), from transformers classes and the released files."""
    name = "videoscore"

    def __init__(self, path, device="cpu", max_frames=0, batch_size=4):
        import accelerate
        from safetensors import SafetensorError, safe_open
        from transformers import Idefics2Config, Idefics2Model, Idefics2Processor, PreTrainedTokenizerFast

        try:  # transformers 5: the PIL backend resizes like the 4.x processor VideoScore was trained with
            from transformers import Idefics2ImageProcessorPil as ImageProcessor
        except ImportError:
            from transformers import Idefics2ImageProcessor as ImageProcessor
        shards = videoscore_shards(path)
        self.device, self.batch_size = device, batch_size
        self.max_frames = max_frames or videoscore_max_frames(path)
        self.dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32

        config = Idefics2Config.from_pretrained(path, local_files_only=True)
        # Mantis' perceiver normalises with the text model's eps (1e-5); transformers 5 reads its own (default 1e-6)
        config.perceiver_config.rms_norm_eps = config.text_config.rms_norm_eps
        # tokenizer.json exactly as saved (as transformers 4.x loaded it for training): transformers 5's
        # LlamaTokenizer rebuilds its normalizer and tokenizes the spaces around image tokens differently
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        tokenizer.padding_side = "right"  # pooling below reads each sequence's last real token
        if tokenizer.pad_token is None:
            tokenizer.pad_token_id = config.text_config.pad_token_id
        image_processor = ImageProcessor.from_pretrained(path, local_files_only=True, do_image_splitting=False)
        seq_len = config.perceiver_config.resampler_n_latents
        self.processor = Idefics2Processor(image_processor, tokenizer, image_seq_len=seq_len)
        if self.processor.image_token_id != config.image_token_id:
            raise models.UserError(f"{path}: the tokenizer's <image> id {self.processor.image_token_id} differs from "
                                   f"config.json's image_token_id {config.image_token_id}")

        state = {}
        for file in shards:
            try:
                with safe_open(file, framework="pt", device=str(device)) as f:
                    state.update({k: f.get_tensor(k).to(self.dtype) for k in f.keys()})
            except SafetensorError as e:  # a cut download
                raise models.UserError(f"{file}: not a readable safetensors file ({e}); download it again") from None
        if "score.weight" not in state:
            raise models.UserError(f"{path}: no 'score.weight' tensor: not a VideoScore (regression) checkpoint")
        with accelerate.init_empty_weights(include_buffers=False):  # parameters come from the files below
            net = torch.nn.ModuleDict({"model": Idefics2Model(config),
                                       "score": torch.nn.Linear(config.text_config.hidden_size,
                                                                state["score.weight"].shape[0])})
        try:  # the files' keys are exactly 'model.*' and 'score.*': every tensor is used, none may be missing
            net.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise models.UserError(f"{path}: weights do not match the VideoScore architecture "
                                   f"({' '.join(str(e).split())[:400]})")
        if net.score.out_features != len(VIDEOSCORE_ASPECTS):
            raise models.UserError(f"{path}: the score head has {net.score.out_features} outputs, "
                                   f"expected {len(VIDEOSCORE_ASPECTS)}")
        self.net = net.to(device).eval().requires_grad_(False)  # non-persistent buffers (rotary) follow
        self.model, self.score_head = net.model, net.score

        with open(os.path.join(path, "tokenizer.json"), "rb") as f:
            tokenizer_sha = hashlib.sha256(f.read()).hexdigest()
        settings = dict(version=VERSION, query=hashlib.sha256(VIDEOSCORE_QUERY.encode()).hexdigest(),
                        max_frames=self.max_frames, image_seq_len=seq_len,
                        model={k: v for k, v in config.to_dict().items() if k != "transformers_version"},
                        image_processor=image_processor.to_dict(), dtype=str(self.dtype), tokenizer=tokenizer_sha)
        self.fingerprint = "videoscore-" + models.fingerprint(
            types.SimpleNamespace(config=settings, state_dict=net.state_dict))

    def inputs(self, videos, prompts):
        """Processor outputs for a batch of videos: right-padded ids, pixel values (B, F, 3, H, W)."""
        from PIL import Image

        frames = [[Image.fromarray(f) for f in v[videoscore_frame_indices(len(v), self.max_frames)]] for v in videos]
        texts = [videoscore_query(p, len(f)) for p, f in zip(prompts, frames)]
        return self.processor(text=texts, images=frames, padding=True, return_tensors="pt").to(self.device)

    def forward(self, batch):
        """(B, 5) float32: the score head on each sequence's last real token (right padding)."""
        mask = batch["attention_mask"]  # (B, L), ones then zeros
        last = mask.sum(-1) - 1  # (B,) index of the last real token
        if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device) <= last[:, None]):
            raise RuntimeError("videoscore: the tokenizer did not pad on the right")
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask, pixel_values=batch["pixel_values"],
                            pixel_attention_mask=batch.get("pixel_attention_mask"), use_cache=False).last_hidden_state
        return self.score_head(hidden[torch.arange(len(hidden), device=hidden.device), last]).float()  # (B, 5)

    @torch.no_grad()
    def score(self, videos, prompts):
        videos = as_videos(videos, prompts)
        rows = [None] * len(videos)
        groups = {}  # videos of one shape batch without any image or pixel padding
        for i, v in enumerate(videos):
            groups.setdefault((min(len(v), self.max_frames), *v.shape[1:3]), []).append(i)
        for idx in groups.values():
            for chunk in (idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)):
                out = self.forward(self.inputs([videos[i] for i in chunk], [prompts[i] for i in chunk]))
                for i, values in zip(chunk, out.tolist()):
                    rows[i] = dict(zip(VIDEOSCORE_ASPECTS, values))
        return rows


def get_scorer(name, path="", device="cpu"):
    """The scorer `name` (one of SCORERS); `path` locates its weights (videoscore, clip)."""
    if name == "videoscore":
        return VideoScoreScorer(path, models.resolve_device(device))
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
    """Per dimension and for 'average' (each video's mean over `dims`): {mean, ci95: [lo, hi], n}; plus
    each of EXTRA_DIMS that every row has (videoscore's factual_consistency), outside the average."""
    out = {d: interval([row[d] for row in rows]) for d in dims}
    out.update({d: interval([row[d] for row in rows]) for d in EXTRA_DIMS if rows and all(d in row for row in rows)})
    out["average"] = interval([mean_score(row, dims) for row in rows])
    return out
