"""Support module: model families, loading a teacher, sampling plumbing and the file formats.

No stage algorithm lives here (DESIGN.md). What is here:
  1. errors and the command-line runner (one-line errors, no traceback)
  2. atomic files, JSON / JSONL / prompt files, mp4 videos, a lock file
  3. the families `vc2`, `animatediff`, `toy` with their defaults and embedded architectures
  4. loading a teacher from a local diffusers folder, the teacher fingerprint
  5. noise prediction, the vc2 x0 rescaling, DDIM sampling with batched CFG, VAE decoding
  6. the student checkpoint: removed layers as identities, safetensors + metadata, strict loading
     (and `load_pipeline`: the student inside a diffusers pipeline)
  7. devices and torch.distributed set-up
"""
import contextlib
import copy
import datetime
import errno
import gzip
import hashlib
import io
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
STUDENT_FORMAT = "vip-student/1"
DIMS = ("visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment")
DIM_SHORT = {"visual_quality": "VQ", "temporal_consistency": "TC", "dynamic_degree": "DD", "text_alignment": "TA"}


# ----------------------------------------------------------------------------- 1. errors, CLI
class UserError(Exception):
    """Bad input: printed as one line `error: ...` with exit code 2, never a traceback."""


def cli(main, parser):
    """Parse arguments and run `main(args)`; a UserError, or an OSError naming a file (unreadable, a folder,
    a full disk), becomes a one-line error and exit 2. Any other exception is a bug: it keeps its traceback."""
    args = parser.parse_args()
    quiet_libraries()
    if run_main(main, args):
        sys.exit(2)


def run_main(main, args):
    """main(args), with a UserError or an OSError naming a file printed as one `error:` line: returns 2
    then, else 0. Any other exception propagates (a bug keeps its traceback)."""
    try:
        main(args)
        return 0
    except (UserError, OSError) as e:
        err = e if isinstance(e, UserError) else file_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def file_error(e, path=None):
    """The one-line UserError `FILE: what is wrong` for an OSError met reading or writing `path` (or the file
    the error names); None for an OSError that names no file and is no full disk (not a bad input)."""
    name = e.filename if e.filename is not None else path
    if name is None and e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    what = {errno.ENOENT: "no such file", errno.EISDIR: "is a folder, expected a file",
            errno.EACCES: "permission denied"}.get(e.errno, (e.strerror or str(e)).lower())
    return UserError(f"{name}: {what}" if name is not None else what)


def quiet_libraries():
    """Keep diffusers' and transformers' info logs and per-file progress bars out of our output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------- 2. files
_SWEPT = set()  # folders whose stale temporary files this process already removed
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # several hosts may share a folder


def temporary_name(path):
    """PATH's temporary sibling: ROOT.tmpPID-HOST.EXT (the extension kept: ffmpeg and safetensors look at it)."""
    root, ext = os.path.splitext(str(path))
    return f"{root}.tmp{os.getpid()}-{_HOST}{ext}"


def remove_stale_temporaries(folder):
    """Remove the temporary files (temporary_name) in `folder` of processes of this host that no longer
    run (a SIGKILL skips atomic_path's cleanup); live processes' and other hosts' are left alone. Once per
    folder per process."""
    folder = os.path.abspath(folder)
    if folder in _SWEPT:
        return
    _SWEPT.add(folder)
    for name in os.listdir(folder):
        m = re.fullmatch(r".+\.tmp(\d+)-" + _HOST + r"(\.[^./]*)?", name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


@contextlib.contextmanager
def sigterm_exits():
    """Inside the block SIGTERM (a cluster's time limit, scancel, kill) raises SystemExit(128 + 15) like an error,
    so `finally` clauses run (locks released, child processes stopped); only in the main thread and only where
    SIGTERM has its default action (a host program's own handler is left alone)."""
    import signal
    import threading

    handle = (threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if handle:
        signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    try:
        yield
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; rename it into place only if the block succeeds. A failed
    write (full disk, no permission) is a one-line UserError naming `path`; the temporary file is removed
    and an older `path` stays as it was."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename not in (None, tmp, path):  # another file the block touched: its own error
            raise
        raise UserError(f"{path}: cannot write it ({(e.strerror or str(e)).lower()})") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_pipeline_index(folder):
    """model_index.json of a TextToVideoSDPipeline folder in the VC2 layout (the toy teacher, convert_vc2's
    output), so that `TextToVideoSDPipeline.from_pretrained(folder)` loads it."""
    write_json(os.path.join(folder, "model_index.json"), {
        "_class_name": "TextToVideoSDPipeline", "_diffusers_version": __import__("diffusers").__version__,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})


def read_text(path):
    """A UTF-8 text file's contents (a BOM dropped); a missing, unreadable or undecodable file, or a
    folder, is a one-line UserError naming it (and the line of the first bad byte)."""
    try:
        with open(path, "rb") as f:
            data = f.read().removeprefix(b"\xef\xbb\xbf")
    except OSError as e:
        raise file_error(e, path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8") from None


def read_lines(path):
    """The lines of a UTF-8 text file as `open(path)` gives them (universal newlines)."""
    return io.StringIO(read_text(path), newline=None).readlines()


def first_change(made, now, parser, skip=()):
    """(key, value recorded, value now) of the first of `now`'s settings (a dict of `parser`'s arguments, keys in
    `skip` left out) that `made`, an older record of them, has otherwise; None if none. A key the record lacks (a
    flag newer than it) counts as made with the parser's default, so an old record resumes under the defaults."""
    was = lambda k: made.get(k, parser.get_default(k))
    k = next((k for k in now if k not in skip and was(k) != now[k]), None)
    return None if k is None else (k, was(k), now[k])


def read_json(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})")


def write_jsonl(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path, required=()):
    """Rows of a JSONL file; each must be an object holding the `required` keys (dotted for nesting)."""
    rows = []
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})")
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        for key in required:
            node = row
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise UserError(f"{path}:{n}: missing field '{key}'")
                node = node[part]
        rows.append(row)
    return rows


def read_prompts(path):
    """Prompts from a .txt file (one a line, '#' comments) or a .jsonl file with a 'prompt' field."""
    if path.endswith(".jsonl"):
        prompts = []
        for n, row in enumerate(read_jsonl(path, required=("prompt",)), 1):
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise UserError(f"{path}: row {n}: 'prompt' must be a non-empty string")
            prompts.append(row["prompt"].strip())
    else:
        prompts = [ln.strip() for ln in read_lines(path) if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts in file")
    return prompts


def write_video(path, frames, fps):
    """Write uint8 frames (F, H, W, 3) as an H.264 mp4 that any player opens (H and W must be even)."""
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", quality=8,
                         macro_block_size=1, pixelformat="yuv420p", format="FFMPEG")


def write_videos(paths, videos, fps):
    """write_video for each (path, video), side by side on threads (each write is an ffmpeg process)."""
    in_threads(lambda sl: [write_video(p, v, fps) for p, v in zip(paths[sl], videos[sl])], len(paths), "cpu")


def read_video(path):
    """uint8 frames (F, H, W, 3) of a video file."""
    import imageio.v2 as imageio

    if not os.path.exists(path):
        raise UserError(f"{path}: no such video file")
    try:
        return np.stack(imageio.mimread(path, format="FFMPEG", memtest=False))
    except Exception as e:  # imageio raises many kinds on a broken file
        raise UserError(f"{path}: cannot read video ({type(e).__name__}: {e})".splitlines()[0])


def read_videos(paths):
    """read_video of each path, in order, side by side on threads (each read is an ffmpeg process)."""
    return [v for part in in_threads(lambda sl: [read_video(p) for p in paths[sl]], len(paths), "cpu") for v in part]


def lock_holder(path):
    """(pid, host) written in a lock file; None when there is no lock."""
    try:
        with open(path) as f:
            pid, host = f.read().split()
        return int(pid), host
    except FileNotFoundError:
        return None
    except ValueError:  # being written this instant, or garbled: held by someone unknown
        return 0, "an unknown host"


def take_lock(path):
    """Create `path` holding this pid and host (O_EXCL: one holder, for one run per work dir). A lock whose
    pid is gone from this host is taken over with a notice; a live one, or one from another host, is a
    one-line error naming its holder."""
    host = socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            held = lock_holder(path)
            if held is None:  # released meanwhile
                continue
            pid, where = held
            if where != host or pid_alive(pid):
                raise UserError(f"{path}: another run (pid {pid} on {where}) is using this folder; wait for it "
                                f"to end (if that process is gone, delete the lock)")
            print(f"[lock] {path}: its pid {pid} is no longer running on this host; taking the lock over")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {host}\n")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def release_lock(path):
    """Remove `path` if this process holds it."""
    if lock_holder(path) == (os.getpid(), socket.gethostname()):
        os.remove(path)


def bytes_to_unicode():
    """The byte -> printable-character table of GPT-2 / CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for n, b in enumerate(b for b in range(256) if b not in bs):
        bs.append(b)
        cs.append(256 + n)
    return dict(zip(bs, map(chr, cs)))


def build_clip_tokenizer(model_max_length=77, pad_token="<|endoftext|>"):
    """CLIP's tokenizer built offline from the BPE file that ships inside open_clip (no hub).

    Ids equal `open_clip.tokenize` up to padding (see `tokenize` for open_clip's pad id 0).
    """
    import tempfile

    import open_clip
    from transformers import CLIPTokenizer

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # 49,408 tokens
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                             pad_token=pad_token, model_max_length=model_max_length)


# ----------------------------------------------------------------------------- 3. families
# VideoCrafter2's UNet is diffusers' UNet3DConditionModel default (+ an fps embedding, folded into
# the time embedding's last bias at conversion; NOTES.md). 1,411,233,860 + 2,050,560 parameters.
VC2_UNET_CONFIG = dict(
    in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
    cross_attention_dim=1024, attention_head_dim=64,
)

# Stable Diffusion 1.5's UNet (859,520,964) and AnimateDiff's motion adapter v1-5-2 (453,209,280).
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
    cross_attention_dim=768, attention_head_dim=8,
)
MOTION_ADAPTER_CONFIG = dict(
    block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
    motion_mid_block_layers_per_block=1, motion_num_attention_heads=8, motion_norm_num_groups=32,
    motion_max_seq_length=32, use_motion_mid_block=True,
)


@dataclass(frozen=True)
class Family:
    name: str
    height: int
    width: int
    frames: int
    steps: int            # DDIM steps
    cfg: float            # classifier-free guidance scale
    eta: float            # DDIM eta
    fps: int              # of written videos (and vc2's folded fps conditioning)
    lr: float             # ReDPO learning rate default
    beta: float           # ReDPO's DPO temperature default (toy: chosen on its validation prompts)
    rounds: int           # online rounds in the paper
    final_ratio: float    # prunable parameters kept after the last round (paper)
    x0_scale_b: float = 0.0   # vc2 x0 rescaling: scale_t 1.0 -> b over t = 0..400 (0 = off)
    fps_folded: bool = False  # vc2: the fps embedding was folded into the time embedding's bias
    pad_id: int = -1          # token id written after the end token (-1 = the tokenizer's; vc2: 0 like open_clip)
    latent_factor: int = 8    # pixels per latent pixel of the family's VAE
    train_steps: tuple = (30,)  # the loop's ReDPO steps, one per round (the last for later rounds and one-shot)
    lr_schedule: tuple = ("constant",)  # the loop's ReDPO rate after the warmup (redpo.py --lr-schedule), per round
    budgets: tuple = ()       # the loop's fraction kept after each round (empty: a linear schedule to final_ratio)
    pairs_per_prompt: int = 1  # the loop's pairs a curated prompt, each from its own seed
    eval_samples: int = 1     # the loop's eval videos a prompt
    sft_cfg: float = 0.0      # the loop's ReDPO SFT on the CFG-guided prediction at this scale (0 = conditional)
    sft_branches: bool = False  # the loop's guided SFT also on each branch (redpo.py --sft-branches)
    sft_on: str = "winners"     # the loop's SFT members (redpo.py --sft-on; "both" adds the losers)
    keep_temporal_convs: int = 0  # the loop's pruning never removes the last N temporal convs (0 = no rule, the paper's)
    keep_by: str = "importance"   # which of them stay where pruning cuts to those N (prune.py --keep-by; toy: alone)
    default_teacher: str = ""
    unet_config: dict = field(default_factory=dict)

    @property
    def trains_motion_only(self):
        return self.name == "animatediff"


FAMILIES = {
    "vc2": Family("vc2", 320, 512, 16, 50, 12.0, 1.0, 28, 6e-6, 5000.0, 2, 0.902e9 / 1_413_284_420,
                  x0_scale_b=0.7, fps_folded=True, pad_id=0, unet_config=VC2_UNET_CONFIG),
    "animatediff": Family("animatediff", 512, 512, 16, 25, 7.5, 0.0, 8, 1e-5, 5000.0, 3, 0.147e9 / 453_209_280,
                          unet_config=SD15_UNET_CONFIG),
    # toy: all 48 pool prompts x 2 seeds (~80 pairs kept), 60 steps of 4 pairs in round 1 (about 3 epochs) and 180
    # at the final size (about 8; 60 left it under-trained): chosen on the validation prompts (toy/RESULTS.md);
    # 4 eval videos a prompt for stable means
    "toy": Family("toy", 32, 32, 8, 10, 6.0, 0.0, 8, 1e-4, 500.0, 2, 0.6, latent_factor=4, budgets=(0.7, 0.6),
                  train_steps=(60, 180), pairs_per_prompt=2, eval_samples=4, sft_cfg=6.0, sft_branches=True, sft_on="both",
                  keep_temporal_convs=1, keep_by="alone",
                  default_teacher=os.path.join(HERE, "toy", "teacher")),
}


def get_family(name):
    if name not in FAMILIES:
        raise UserError(f"unknown model family '{name}' (choose from {', '.join(FAMILIES)})")
    return FAMILIES[name]


def round_budgets(family, budgets=(), rounds=0, final_ratio=0.0, schedule=""):
    """The fraction of the prunable parameters kept after each online round: `budgets` as given; else the family's
    own (the toy's 0.7, 0.6: toy/RESULTS.md row 55) unless rounds, final_ratio or schedule is given; else the
    schedule's to final_ratio (linear, the default: equal cuts; geometric: an equal fraction kept each round)."""
    if budgets or (family.budgets and not (rounds or final_ratio or schedule)):
        return list(budgets or family.budgets)
    rounds, final_ratio = rounds or family.rounds, final_ratio or family.final_ratio
    if schedule == "geometric":
        return [final_ratio ** (k / rounds) for k in range(1, rounds + 1)]
    return [1 - (1 - final_ratio) * k / rounds for k in range(1, rounds + 1)]


def build_meta_unet(family, config_dir=None):
    """The family's real architecture on the meta device (no memory, no files) for counting."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel

    with torch.device("meta"):
        if family.name == "animatediff":
            return UNetMotionModel.from_unet2d(UNet2DConditionModel(**SD15_UNET_CONFIG),
                                               MotionAdapter(**MOTION_ADAPTER_CONFIG))
        config = family.unet_config
        if not config:  # the toy's architecture is whatever its shipped teacher has
            path = os.path.join(config_dir or family.default_teacher, "unet", "config.json")
            config = {k: v for k, v in read_json(path).items() if not k.startswith("_")}
        return UNet3DConditionModel(**config)


TEMPORAL_PARTS = (".temp_convs.", ".temp_attentions.", "transformer_in.", ".motion_modules.")


def trainable_keys(family, unet, layers="all"):
    """Names of the student's own tensors: the whole UNet, or only the motion modules (animatediff); with
    layers="temporal" only those of its temporal layers (temporal convs and transformers, transformer_in,
    motion modules)."""
    keys = list(unet.state_dict().keys())
    keys = [k for k in keys if ".motion_modules." in k] if family.trains_motion_only else keys
    if layers not in ("all", "temporal"):
        raise ValueError(f"layers={layers!r}")
    return keys if layers == "all" else [k for k in keys if any(p in f".{k}" for p in TEMPORAL_PARTS)]


def folded_params(family, unet):
    """Parameters the paper counts that our vc2 port folds away: lvdm's fps embedding, a
    TimestepEmbedding(c, 4c) with c = the first width (2,050,560 for VideoCrafter2)."""
    if not family.fps_folded:
        return 0
    c = unet.config.block_out_channels[0]
    return c * 4 * c + 4 * c + 4 * c * 4 * c + 4 * c


def count_params(family, unet, paper=True):
    """Prunable parameters: the whole UNet (vc2/toy) or the motion modules (animatediff); with
    `paper`, as the paper counts them (vc2 includes its folded fps embedding)."""
    names = set(trainable_keys(family, unet))
    own = sum(p.numel() for n, p in unet.named_parameters() if n in names)
    return own + (folded_params(family, unet) if paper else 0)


# ----------------------------------------------------------------------------- 4. teachers
@dataclass
class Teacher:
    family: Family
    path: str
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    fingerprint: str
    motion_adapter: str = ""


def _subfolder(path, name):
    sub = os.path.join(path, name)
    if not os.path.isdir(sub):
        raise UserError(f"{path}: not a teacher folder (missing '{name}/'; expected unet/, vae/, "
                        f"text_encoder/, tokenizer/, scheduler/ as diffusers saves them)")
    return sub


def fingerprint(*modules):
    """A short hash of a model's config and of exact samples of every tensor (device-independent)."""
    h = hashlib.sha256()
    for m in modules:
        config = m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)
        config = {k: v for k, v in config.items() if not k.startswith("_")}  # private keys vary run to run
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, t in m.state_dict().items():
            flat = t.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel())).long().to(flat.device)
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_motion_adapter(path, heads=8, norm_groups=32):
    """A MotionAdapter from a diffusers folder, or from an original AnimateDiff motion-module file
    (.ckpt/.pth/.safetensors, e.g. mm_sd_v15_v2.ckpt) through diffusers' key converter. Widths and
    layers per block are read from the tensors; heads and norm groups (not in any shape) default
    to v1-5-2's. The sinusoidal position tables of the original file are rebuilt, not loaded."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    if os.path.isdir(path):
        return MotionAdapter.from_pretrained(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: motion adapter not found (a MotionAdapter folder or an AnimateDiff .ckpt)")
    try:  # a cut download or another kind of file fails here, naming itself
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
    except Exception as e:
        raise UserError(f"{path}: cannot read the motion module ({type(e).__name__}: {e})".splitlines()[0])
    sd = convert_animatediff_checkpoint_to_diffusers(sd)
    widths = [sd[f"down_blocks.{i}.motion_modules.0.norm.weight"].numel()
              for i in range(8) if f"down_blocks.{i}.motion_modules.0.norm.weight" in sd]
    if not widths:
        raise UserError(f"{path}: no 'down_blocks.N.motion_modules.0.*' tensors: not an AnimateDiff motion module")
    layers = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.motion_modules.")})
    mid = any(k.startswith("mid_block.") for k in sd)
    adapter = MotionAdapter(block_out_channels=tuple(widths), motion_layers_per_block=layers,
                            motion_mid_block_layers_per_block=1, motion_num_attention_heads=heads,
                            motion_norm_num_groups=norm_groups, motion_max_seq_length=32, use_motion_mid_block=mid)
    missing, unexpected = adapter.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "pos_embed" not in k]
    if missing or unexpected:
        raise UserError(f"{path}: does not fit a MotionAdapter of widths {widths} "
                        f"(first missing: {missing[:1]}, first unexpected: {unexpected[:1]})")
    return adapter


def frozen_dtype(device, precision="auto"):
    """The weight dtype of models that are only run, never trained (the teacher, the DPO reference, students
    that are sampled): bf16 on CUDA (auto), float32 elsewhere. A trained student keeps float32 master weights."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision must be auto, fp32 or bf16 (got {precision!r})")
    bf16 = precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))
    return torch.bfloat16 if bf16 else torch.float32


def autocast(device, enabled, unet=None):
    """bf16 autocast on the device's type when enabled (matmuls and convolutions in bf16, reductions in fp32).

    Given the `unet` it is for, only when its weights are float32 (a trained student): bf16 weights then run
    natively, as diffusers' pipelines run them, since autocast would take their group norms and softmaxes to
    float32 and back (sampling 15 % slower on an H200: benchmarks/RESULTS.md). Where a float32 student is
    compared with a bf16 model, both keep autocast (no `unet`): redpo's train_step, whose DPO term multiplies
    the student-reference error gap by beta / 2 (a native bf16 reference moved the step-1 loss of a student
    equal to it from log 2 = 0.693 to 0.525 at VC2's beta), and prune.py's distillation-error probes."""
    if unet is not None and next(unet.parameters()).dtype != torch.float32:
        enabled = False
    return torch.autocast(str(device).split(":")[0], dtype=torch.bfloat16, enabled=enabled)


SPEED_OPTIONS = ("cudnn-benchmark", "channels-last", "compile", "compile-blocks")


def unet_blocks(unet):
    """The UNet's down, mid and up blocks in forward order (the units that checkpointing and regional
    compilation wrap)."""
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def for_speed(unet, options):
    """`unet` set up for speed with `options` (a subset of SPEED_OPTIONS), in place where it can be:
    cudnn-benchmark  cuDNN times its convolution algorithms once per shape (a global switch);
    channels-last    Conv2d weights in NHWC, so bf16 convolutions need no layout transposes around them;
    compile          torch.compile of the whole UNet (returns the compiled module);
    compile-blocks   torch.compile of each down, mid and up block on its own (regional: the blocks of a kind
                     share their compiled code, so it compiles in a fraction of the whole UNet's time).
    benchmarks/bench_redpo.py --variants measures each (benchmarks/RESULTS.md)."""
    unknown = set(options) - set(SPEED_OPTIONS)
    if unknown:
        raise UserError(f"unknown speed option(s) {sorted(unknown)}: choose from {', '.join(SPEED_OPTIONS)}")
    if "cudnn-benchmark" in options:
        torch.backends.cudnn.benchmark = True
    if "channels-last" in options:  # the 2-D convolutions (a Conv3d's 5-D weights have no channels-last form)
        for m in unet.modules():
            if isinstance(m, nn.Conv2d):
                m.to(memory_format=torch.channels_last)
    if "compile-blocks" in options:  # static shapes: a block kind compiles once per resolution and model dtype
        from torch._dynamo import config

        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(64, getattr(config, name)))
        for block in unet_blocks(unet):
            block.compile(dynamic=False)
    return torch.compile(unet) if "compile" in options else unet


@contextlib.contextmanager
def loading(path):
    """diffusers and transformers fail on a damaged model folder with many kinds of errors (an OSError
    without a file name, a safetensors or a JSON error): one line naming the folder instead."""
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot load this model folder ({first[:300]})")


def load_unet(family, path, motion_adapter=""):
    """The teacher's denoiser as stored, on the CPU: UNet3DConditionModel (vc2/toy) or UNetMotionModel built
    from the SD-1.5 UNet and the MotionAdapter (animatediff)."""
    from diffusers import UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel

    if family.name != "animatediff":
        return UNet3DConditionModel.from_pretrained(path, subfolder="unet")
    if not motion_adapter:
        raise UserError("--motion-adapter is required for --model animatediff (a MotionAdapter folder "
                        "or an original AnimateDiff motion-module .ckpt)")
    return UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
                                       load_motion_adapter(motion_adapter))


def load_teacher(family, path, motion_adapter="", device="cpu", dtype=None):
    """The frozen teacher M_0 from local folders (vc2/toy: one diffusers folder in the layout that
    TextToVideoSDPipeline saves; animatediff: an SD-1.5 folder plus a MotionAdapter folder), its weights
    in `dtype` (None = frozen_dtype(device): bf16 on CUDA, float32 elsewhere)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    path = path or family.default_teacher
    if not path:
        raise UserError(f"--teacher is required for --model {family.name}")
    if not os.path.isdir(path):
        raise UserError(f"{path}: teacher folder not found")
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        _subfolder(path, name)
    with loading(path):  # a damaged folder: one line naming it
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        unet = load_unet(family, path, motion_adapter)
    if family.name == "animatediff":  # AnimateDiff samples with a linear-beta DDIM (its published settings)
        scheduler = DDIMScheduler.from_config(scheduler.config, beta_schedule="linear", clip_sample=False,
                                              timestep_spacing="linspace", steps_offset=1)
    parts = (unet, vae, text_encoder)
    for m in parts:  # float32 whatever the stored dtype: the fingerprint is taken before any cast
        m.requires_grad_(False).eval().to(torch.float32)
    fp = fingerprint(*parts)  # the same for a bf16 and a float32 load, on any device
    for m in parts:
        m.to(device, dtype or frozen_dtype(device))
    return Teacher(family, os.path.abspath(path), unet, vae, text_encoder, tokenizer, scheduler,
                   fp, os.path.abspath(motion_adapter) if motion_adapter else "")


# ----------------------------------------------------------------------------- 5. sampling plumbing
def tokenize(family, tokenizer, prompts):
    """Token ids (N, L) padded to the tokenizer's length; vc2 pads with 0 as open_clip.tokenize does
    (its UNet attends to all positions, so the pad id matters)."""
    tok = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    if family.pad_id >= 0:
        return tok.input_ids.masked_fill(tok.attention_mask == 0, family.pad_id)
    return tok.input_ids


@torch.no_grad()
def encode_prompts(teacher, prompts):
    """Text embeddings (N, L, D): the encoder's last hidden state, no attention mask (as VC2/SD)."""
    ids = tokenize(teacher.family, teacher.tokenizer, prompts)
    device = next(teacher.text_encoder.parameters()).device
    return teacher.text_encoder(ids.to(device))[0].float()


def predict_noise(family, unet, x_t, t, emb):
    """eps(x_t, c, t) for latent videos x_t (B, C, F, h, w), timesteps t (B,), embeddings emb (B, L, D)."""
    if family.name == "animatediff":  # diffusers >= 0.31 wants one text embedding per frame
        emb = emb.repeat_interleave(x_t.shape[2], dim=0)  # (B*F, L, D)
    dtype = next(unet.parameters()).dtype  # bf16 weights get bf16 inputs (under autocast its first ops cast them too)
    return unet(x_t.to(dtype), t, encoder_hidden_states=emb.to(dtype), return_dict=False)[0]


def x0_scale(family, t, enabled=True):
    """VC2's `use_scale` factor scale_t: 1.0 at t=0 falling linearly to b at t=400, then b (else 1)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if not (enabled and family.x0_scale_b):
        return torch.ones_like(t)
    return torch.where(t < 400, 1.0 + (family.x0_scale_b - 1.0) * t / 399.0,
                       torch.full_like(t, family.x0_scale_b))


def add_noise(family, scheduler, x0, eps, t, x0_rescale=True):
    """x_t = sqrt(abar_t) * scale_t * x0 + sqrt(1 - abar_t) * eps  (scale_t = 1 unless vc2 rescaling)."""
    abar = scheduler.alphas_cumprod.to(x0.device)[t].float().view(-1, *[1] * (x0.ndim - 1))
    s = x0_scale(family, t, x0_rescale).to(x0.device).view_as(abar)  # on t's device: no sync
    return abar.sqrt() * s * x0 + (1 - abar).sqrt() * eps


def latent_shape(teacher, frames, height, width):
    f = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    if height % f or width % f:
        raise UserError(f"height and width must be multiples of {f} for this VAE (got {height}x{width})")
    return (teacher.vae.config.latent_channels, frames, height // f, width // f)


def seeded_noise(seeds, shape, offset=0):
    """One N(0, I) tensor per seed, drawn on the CPU so every device gets the same numbers."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s) + offset))
                        for s in seeds])


def ddim_step(family, scheduler, x, eps, t, prev_t, eta=0.0, noise=None, x0_rescale=True):
    """One DDIM update x_t -> x_prev (Song et al. eq. 12), with VC2's x0 rescaling when it is on:
    pred_x0 is divided by scale_t and re-noised with scale_prev, as VC2's own sampler does."""
    acp = scheduler.alphas_cumprod
    a_t = acp[t].float()
    a_prev = acp[prev_t].float() if prev_t >= 0 else scheduler.final_alpha_cumprod.float()
    s_t = x0_scale(family, t, x0_rescale)
    s_prev = x0_scale(family, max(prev_t, 0), x0_rescale)
    pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() / s_t
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x_prev = a_prev.sqrt() * s_prev * pred_x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


def cpu_cores():
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_workers():
    """Threads a CPU stage samples on: OMP_NUM_THREADS when set, else the cores this process may use."""
    n = os.environ.get("OMP_NUM_THREADS", "")
    if n.isdigit() and int(n) > 0:
        return int(n)
    return cpu_cores()


@contextlib.contextmanager
def intra_op_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_threads(fn, n, device, workers=None):
    """[fn(slice) for up to `workers` (default cpu_workers()) contiguous slices of range(n)], in order. On a
    CPU the slices run side by side, one Python thread each with one intra-op thread (PyTorch's kernels
    release the GIL): the cores work on different videos and never wait on each other, so a busy machine
    slows the work in proportion, not threefold as OpenMP's spinning threads do when a core is taken. On a
    GPU, or with one worker, a single call. The split is fixed by the worker count: videos agree across
    worker counts to float rounding, and are identical for the same count."""
    workers = min(n, workers or cpu_workers())
    if workers <= 1 or not str(device).startswith("cpu"):
        return [fn(slice(0, n))]
    from concurrent.futures import ThreadPoolExecutor

    grad = torch.is_grad_enabled()  # thread-local, like autocast: each thread sets its own

    def run(sl):
        with torch.set_grad_enabled(grad):
            return fn(sl)

    bounds = [round(k * n / workers) for k in range(workers + 1)]
    with intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, [slice(a, b) for a, b in zip(bounds, bounds[1:])]))


def guide(eps_u, eps_c, scale):
    """Classifier-free guidance: eps(0) + scale * (eps(c) - eps(0)), the noise estimate a CFG sampler follows
    (of differences too: the guided error from the two branches' errors)."""
    return eps_u + scale * (eps_c - eps_u)


@torch.no_grad()
def sample(family, unet, scheduler, cond, uncond, seeds, shape, steps, cfg, eta=0.0, x0_rescale=True,
           progress=False, bf16=False):
    """DDIM sampling with classifier-free guidance in one batched forward.

    cond (N, L, D) text embeddings, uncond (1, L, D) the embedding of "", one seed per sample fixes
    the initial noise and the eta noise, so the teacher and a student given the same seeds start from
    the same x_T. The UNet runs in its weights' dtype, under bf16 autocast when `bf16` (a float32 student
    sampled on CUDA); the DDIM update is float32. On a CPU the videos are split over threads (in_threads).
    Returns the final latents (N, C, F, h, w) in float32.
    """
    from tqdm import tqdm

    device = cond.device
    dtype = next(unet.parameters()).dtype
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()

    def part(sl):  # the videos sl of the batch, all steps
        n = len(seeds[sl])
        x = seeded_noise(seeds[sl], shape).to(device)  # (n, C, F, h, w)
        emb = torch.cat([uncond.expand(n, -1, -1), cond[sl]]).to(dtype)  # (2n, L, D): [uncond; cond]
        gens = [torch.Generator().manual_seed(int(s) + 1) for s in seeds[sl]]
        for i, t in enumerate(tqdm(timesteps, desc="ddim", leave=False, disable=not progress)):
            tt = torch.full((2 * n,), t, device=device, dtype=torch.long)
            with autocast(device, bf16, unet):
                eps_u, eps_c = predict_noise(family, unet, torch.cat([x, x]).to(dtype), tt, emb).float().chunk(2)
            eps = guide(eps_u, eps_c, cfg)
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) if eta > 0 else None
            prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1  # "leading": t - T // steps
            x = ddim_step(family, scheduler, x, eps, t, prev_t, eta, noise, x0_rescale)
        return x

    return torch.cat(in_threads(part, len(seeds), device))  # (N, C, F, h, w)


@torch.no_grad()
def decode(vae, latents, chunk=16):
    """Latent videos (N, C, F, h, w) -> uint8 videos (N, F, H, W, 3)."""
    n, c, f, h, w = latents.shape
    z = latents.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)  # (N*F, C, h, w)
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    starts = range(0, z.shape[0], chunk)
    part = lambda sl: [vae.decode((z[i:i + chunk] / vae.config.scaling_factor).to(device, dtype)).sample.float()
                       .clamp(-1, 1).cpu() for i in starts[sl]]
    x = torch.cat(sum(in_threads(part, len(starts), device), []))  # (N*F, 3, H, W) in [-1, 1]
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    return x.reshape(n, f, 3, x.shape[-2], x.shape[-1]).permute(0, 1, 3, 4, 2).numpy()  # (N, F, H, W, 3)


def add_sampling_args(p):
    """The sampler flags shared by every stage that generates videos (0 / -1 = the family default)."""
    p.add_argument("--steps", type=int, default=0, help="DDIM steps (0 = family default)")
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance scale (0 = family default)")
    p.add_argument("--eta", type=float, default=-1.0, help="DDIM eta (-1 = family default)")
    p.add_argument("--frames", type=int, default=0, help="frames (0 = family default)")
    p.add_argument("--height", type=int, default=0, help="height in pixels (0 = family default)")
    p.add_argument("--width", type=int, default=0, help="width in pixels (0 = family default)")
    p.add_argument("--no-x0-rescale", action="store_true", help="vc2: sample without VC2's x0 rescaling")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 weights and autocast on CUDA, float32 elsewhere")


def sampling_settings(args, family, device="cpu"):
    """The sampler settings a run uses, family defaults filled in (part of every cache key)."""
    return {"steps": args.steps or family.steps, "cfg": args.cfg or family.cfg,
            "eta": family.eta if args.eta < 0 else args.eta, "x0_rescale": not args.no_x0_rescale,
            "frames": args.frames or family.frames, "height": args.height or family.height,
            "width": args.width or family.width,
            "precision": "bf16" if frozen_dtype(device, args.precision) == torch.bfloat16 else "fp32"}


def generate(teacher, unet, cond, uncond, seeds, s):
    """Latents (N, C, F, h, w) and uint8 videos (N, F, H, W, 3) of `unet` under settings `s`."""
    shape = latent_shape(teacher, s["frames"], s["height"], s["width"])
    lat = sample(teacher.family, unet, teacher.scheduler, cond, uncond, seeds, shape, s["steps"], s["cfg"],
                 s["eta"], s["x0_rescale"], bf16=s.get("precision") == "bf16")
    return lat, decode(teacher.vae, lat)


# ----------------------------------------------------------------------------- 6. students
class Removed(nn.Module):
    """Identity standing in for a pruned layer; answers the way the caller indexes the original
    (transformers are called with return_dict=False and indexed [0], so they return a 1-tuple)."""

    def __init__(self, returns_tuple):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        x = args[0] if args else next(kwargs[k] for k in ("hidden_states", "input_tensor", "sample") if k in kwargs)
        return (x,) if self.returns_tuple else x


def remove_layers(unet, paths):
    """Swap each module path (e.g. 'down_blocks.0.temp_attentions.1') for an identity, in place."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    for p in paths:
        parent_name, _, child = p.rpartition(".")
        try:
            parent = unet.get_submodule(parent_name) if parent_name else unet
            old = parent.get_submodule(child)
        except AttributeError:
            raise UserError(f"layer '{p}' does not exist in this UNet")
        if isinstance(old, Removed):
            continue
        new = Removed(isinstance(old, (Transformer2DModel, TransformerTemporalModel)))
        if isinstance(parent, nn.ModuleList):
            parent[int(child)] = new
        else:
            setattr(parent, child, new)
    return unet


def removed_layers(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, Removed)]


def save_student(path, family, unet, teacher, round_=0, args=None, **extra):
    """Write a student checkpoint: its own tensors (no removed layers) + provenance metadata."""
    from safetensors.torch import save_file

    sd = unet.state_dict()
    tensors = {k: sd[k].detach().float().cpu().contiguous() for k in trainable_keys(family, unet)}
    meta = {
        "format": STUDENT_FORMAT,
        "family": family.name,
        "teacher": teacher.path,
        "motion_adapter": teacher.motion_adapter,
        "teacher_fingerprint": teacher.fingerprint,
        "removed": json.dumps(removed_layers(unet)),
        "prunable_params": str(count_params(family, unet)),
        "teacher_prunable_params": str(count_params(family, teacher.unet)),
        "round": str(round_),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "made_by": os.path.basename(sys.argv[0]),
        "args": json.dumps(vars(args) if args is not None else {}, default=str),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def read_student_meta(path):
    from safetensors import safe_open

    if not os.path.exists(path):
        raise UserError(f"{path}: no such student checkpoint")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, expected a student checkpoint (.safetensors)")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error (a corrupt or cut file), or an OSError (no permission)
        raise UserError(f"{path}: not a safetensors file ({e})")
    if meta.get("format") != STUDENT_FORMAT:
        raise UserError(f"{path}: not a student checkpoint (format '{meta.get('format')}', "
                        f"expected '{STUDENT_FORMAT}')")
    meta = dict(meta)
    meta["removed"] = json.loads(meta["removed"])
    return meta


def check_student(path, meta, teacher):
    """Refuse a checkpoint made from another family or another teacher, naming both."""
    if meta["family"] != teacher.family.name or meta["teacher_fingerprint"] != teacher.fingerprint:
        raise UserError(
            f"{path}: made from teacher {meta['teacher']} (family {meta['family']}, fingerprint "
            f"{meta['teacher_fingerprint']}), but the loaded teacher is {teacher.path} (family {teacher.family.name}, "
            f"fingerprint {teacher.fingerprint})")
    return meta


def load_student(path, teacher, dtype=None):
    """Rebuild a student: the teacher's architecture, removed layers as identities, strict load, weights
    in `dtype` (None = the teacher's). Refuses a checkpoint made from another family or another teacher."""
    from safetensors.torch import load_file

    meta = check_student(path, read_student_meta(path), teacher)
    fam = teacher.family
    unet = remove_layers(copy.deepcopy(teacher.unet), meta["removed"]).to(dtype or teacher_dtype(teacher))
    sd = load_file(path)
    expected = set(trainable_keys(fam, unet))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise UserError(f"{path}: tensors do not match the pruned architecture "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    device = next(teacher.unet.parameters()).device
    unet.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=not fam.trains_motion_only)
    return unet, meta


def teacher_dtype(teacher):
    return next(teacher.unet.parameters()).dtype


def load_model(teacher, student_path="", dtype=None):
    """The student at `student_path`, or a copy of the teacher when no path is given (round 0), with weights
    in `dtype` (None = the teacher's). A float32 copy of a bf16 teacher is read again from its folder, so
    a student to be trained starts from the teacher's exact weights, not from their bf16 rounding."""
    dtype = dtype or teacher_dtype(teacher)
    if student_path:
        return load_student(student_path, teacher, dtype)
    if dtype == teacher_dtype(teacher):
        return copy.deepcopy(teacher.unet), {"removed": [], "round": "0"}
    device = next(teacher.unet.parameters()).device
    with loading(teacher.path):
        unet = load_unet(teacher.family, teacher.path, teacher.motion_adapter).requires_grad_(False).eval()
    return unet.to(device, dtype), {"removed": [], "round": "0"}


def load_pipeline(teacher_path, student_path="", family="vc2", motion_adapter="", device="cpu"):
    """A diffusers pipeline with the student's UNet inside (the teacher's when `student_path` is ""):
    TextToVideoSDPipeline for vc2 / toy, AnimateDiffPipeline for animatediff (the student's UNetMotionModel,
    pruned motion modules included), with the teacher's VAE, text encoder, tokenizer and the DDIM scheduler
    the family samples with; float32 on `device`. Sample with the family's settings, e.g. for vc2:

        f = models.get_family("vc2")
        pipe(prompt, num_frames=f.frames, height=f.height, width=f.width, num_inference_steps=f.steps,
             guidance_scale=f.cfg, eta=f.eta, generator=[torch.Generator().manual_seed(s) for s in seeds]).frames

    What differs from the family's own sampler (`sample`), so videos differ slightly from ours:
      - vc2: diffusers' DDIM has no x0 rescaling (VC2's scale_t 1.0 -> 0.7 over t = 0..400; `--no-x0-rescale`
        samples like the pipeline).
      - vc2: the pipeline's tokenizer pads with its pad token (<|endoftext|>); VC2 pads with id 0 like
        open_clip, and its UNet attends to the pads. To match the text side pass
        `prompt_embeds=encode_prompts(pipe, prompts)` and `negative_prompt_embeds=encode_prompts(pipe, [""] * n)`
        (the pipeline carries `pipe.family` for this); the toy and animatediff tokenize alike either way.
      - eta > 0 (vc2's default 1.0): the step noise comes from the pipeline's generator, ours from seed + 1.
        The initial noise is the same when the pipeline gets one generator per video seeded with our seed.
      - animatediff: diffusers' DDIM steps from t to t - 1000 // steps, ours to the next of the "linspace"
        timesteps (25 steps: 999 -> 959 there, 999 -> 957 here; the last step is the same).
    With x0 rescaling off, eta 0 and those embeddings, vc2 / toy videos equal ours (tests/test_pipeline.py).
    The pruned UNet has identities where layers were removed: keep the student as its checkpoint, not
    `pipe.save_pretrained` (the UNet config does not know the removed layers).
    """
    from diffusers import AnimateDiffPipeline, TextToVideoSDPipeline

    fam = get_family(family)
    teacher = load_teacher(fam, teacher_path, motion_adapter, resolve_device(device), torch.float32)
    unet, _ = load_model(teacher, student_path) if student_path else (teacher.unet, None)
    parts = dict(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=unet,
                 scheduler=teacher.scheduler)
    if fam.name == "animatediff":
        pipe = AnimateDiffPipeline(**parts, motion_adapter=None)
    else:
        pipe = TextToVideoSDPipeline(**parts)
    pipe.family = fam  # encode_prompts(pipe, prompts) tokenizes as the family does
    return pipe


# ----------------------------------------------------------------------------- 7. devices, DDP
def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return name


def dist_setup(device_arg):
    """(rank, world_size, device): torch.distributed from torchrun's env (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_arg)
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def dist_cleanup():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
