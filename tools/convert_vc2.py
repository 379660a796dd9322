"""Convert the official VideoCrafter2 checkpoint into the diffusers folder that `--model vc2` loads.

Get the checkpoint (one fp32 file, ~10 GB) from Hugging Face, repository VideoCrafter/VideoCrafter2,
file model.ckpt (e.g. `hf download VideoCrafter/VideoCrafter2 model.ckpt --local-dir ckpt/`), then:

    python tools/convert_vc2.py --ckpt ckpt/model.ckpt --out teachers/vc2            # fps 28, as V.I.P.
    python online_loop.py --model vc2 --teacher teachers/vc2

The output is the folder layout TextToVideoSDPipeline saves (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) plus conversion.json (arguments, shapes read, key counts). No network is used.

What is exact (fp32; NOTES.md has the measurements):
  - UNet: lvdm's `openaimodel3d.UNetModel` maps one-to-one onto diffusers' UNet3DConditionModel; the only
    reshape is 1x1 convolutions -> Linear (the first temporal attention's Conv1d projections). lvdm adds
    fps_embedding(timestep_embedding(fps)) to the time embedding after its last Linear, so that vector,
    computed once in fp32, is added to `time_embedding.linear_2.bias`: exact for that one fps (`--fps`).
  - VAE: the SD-layout autoencoder, renamed by diffusers' own `convert_ldm_vae_checkpoint`.
  - Text: OpenCLIP's text tower up to its penultimate block, then ln_final (VC2's "penultimate" layer)
    == a CLIPTextModel with one layer fewer and hidden_act="gelu"; the tokenizer pads with id 0 like
    open_clip.tokenize. The last block, text_projection and logit_scale are dropped (unused by VC2).
  - Not in the folder: VC2's x0 rescaling (scale_t 1.0 -> 0.7); the `vc2` family applies it when sampling.
Widths, depths, levels, attention levels, context and text sizes are read from tensor shapes, so smaller
checkpoints of the same layout convert too; only the head size, text heads and fps are flags. Norms have
32 groups as lvdm hard-codes. A tensor that is missing, left over or of the wrong shape is refused by name.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
from models import UserError  # noqa: E402

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
GROUPS = 32  # lvdm's normalization(), TemporalConvBlock and the SD VAE all use GroupNorm(32, C)
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                 timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)
# diffusers ResnetBlock2D name -> lvdm ResBlock name (temporal convs, transformers: names are identical)
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# transformers CLIPTextModel name -> open_clip text tower name
TEXT_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
TEXT_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


# ----------------------------------------------------------------------------- reading the checkpoint
def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        try:  # memory-mapped: the ~10 GB file is not read into memory at once
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap needs the zip format; an older file loads into memory
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects, truncated file, not a checkpoint...
        raise UserError(f"{path}: cannot load as a torch checkpoint ({type(e).__name__}: {e})".splitlines()[0])
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(UNET) for k in sd):
        raise UserError(f"{path}: no '{UNET}*' tensors: not a VideoCrafter checkpoint")
    return sd


def part(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def shape(sd, key, prefix):
    if key not in sd:
        raise UserError(f"{prefix}{key}: missing from the checkpoint")
    return tuple(sd[key].shape)


def check_groups(width, key):
    if width % GROUPS:
        raise UserError(f"{key}: width {width} is not a multiple of {GROUPS} (lvdm's GroupNorm groups)")


def pull(name, target, sd, prefix, source):
    """Every tensor of `target` (diffusers name -> shape) taken from `sd` via source(name) -> lvdm name.
    A 1x1 convolution feeding a Linear loses its trailing unit axes; anything else must match exactly."""
    out, used = {}, set()
    for key, want in target.items():
        src, chunk = source(key)
        if src not in sd:
            raise UserError(f"{prefix}{src}: missing from the checkpoint (needed for {name} {key})")
        t = sd[src] if chunk is None else sd[src].chunk(3)[chunk].clone()  # q, k, v of a fused in_proj
        if t.ndim > len(want) and all(s == 1 for s in t.shape[len(want):]):
            t = t.reshape(t.shape[:len(want)])  # 1x1 conv -> Linear
        if tuple(t.shape) != tuple(want):
            raise UserError(f"{prefix}{src}: shape {tuple(sd[src].shape)} does not fit {name} {key} {tuple(want)}"
                            f"{' (check --head-dim)' if 'transformer_in' in key else ''}")
        out[key] = t.contiguous()
        used.add(src)
    unused = [k for k in sd if k not in used]
    if unused:
        raise UserError(f"{prefix}{unused[0]}: not used by the {name} read from the shapes "
                        f"({len(unused)} such tensors): the checkpoint does not fit this layout")
    return out


def meta_shapes(cls, config):
    with torch.device("meta"):
        model = cls(**config)
    return model, {k: v.shape for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- UNet
def unet_config(sd, head_dim):
    """UNet3DConditionModel arguments from lvdm tensor shapes, and the input_blocks layout."""
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
    levels, down = [[]], []  # levels[i] = input_blocks holding level i's layers; down[i] = its downsampler
    for n in blocks[1:]:
        if f"input_blocks.{n}.0.op.weight" in sd:
            down.append(n)
            levels.append([])
        else:
            levels[-1].append(n)
    for i, level in enumerate(levels):
        if not level or len(level) != len(levels[0]):
            where = f"{level[0]}" if level else f"{down[i - 1]}.0.op" if i else "1"
            than = f", level 0 has {len(levels[0])}" if i else ""
            raise UserError(f"{UNET}input_blocks.{where}: level {i} has {len(level)} layers{than} "
                            f"(diffusers needs the same number, at least one, on every level)")
    widths = [shape(sd, f"input_blocks.{lv[0]}.0.in_layers.2.weight", UNET)[0] for lv in levels]
    attn = [f"input_blocks.{lv[0]}.1.proj_in.weight" in sd for lv in levels]
    for lv, w in zip(levels, widths):
        check_groups(w, f"{UNET}input_blocks.{lv[0]}.0.in_layers.2.weight")
        if w % head_dim:
            raise UserError(f"{UNET}input_blocks.{lv[0]}.0.in_layers.2.weight: width {w} is not a multiple "
                            f"of --head-dim {head_dim}")
    config = dict(
        in_channels=shape(sd, "input_blocks.0.0.weight", UNET)[1],
        out_channels=shape(sd, "out.2.weight", UNET)[0],
        down_block_types=["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attn],
        up_block_types=["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in attn[::-1]],
        block_out_channels=widths, layers_per_block=len(levels[0]), norm_num_groups=GROUPS,
        cross_attention_dim=shape(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", UNET)[1],
        attention_head_dim=head_dim,  # the head *size* in this class (NOTES.md)
    )
    return config, levels, down, attn


def unet_prefixes(levels, down, attn):
    """diffusers module path -> lvdm module path (the key map of NOTES.md)."""
    m = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "conv_in": "input_blocks.0.0", "transformer_in": "init_attn.0",
         "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.temp_convs.0": "middle_block.0.temopral_conv",
         "mid_block.attentions.0": "middle_block.1", "mid_block.temp_attentions.0": "middle_block.2",
         "mid_block.resnets.1": "middle_block.3", "mid_block.temp_convs.1": "middle_block.3.temopral_conv"}

    def layer(block, j, src):  # lvdm block = [ResBlock (+ its temopral_conv), SpatialT, TemporalT, ...]
        m.update({f"{block}.resnets.{j}": f"{src}.0", f"{block}.temp_convs.{j}": f"{src}.0.temopral_conv",
                  f"{block}.attentions.{j}": f"{src}.1", f"{block}.temp_attentions.{j}": f"{src}.2"})

    n_levels, per_up = len(levels), len(levels[0]) + 1
    for i, level in enumerate(levels):
        for j, n in enumerate(level):
            layer(f"down_blocks.{i}", j, f"input_blocks.{n}")
        if i < len(down):
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{down[i]}.0.op"
    for i in range(n_levels):  # output_blocks: per_up per level, deepest level first
        for j in range(per_up):
            layer(f"up_blocks.{i}", j, f"output_blocks.{i * per_up + j}")
        if i < n_levels - 1:  # the upsampler closes the level's last block, after its transformers
            m[f"up_blocks.{i}.upsamplers.0.conv"] = \
                f"output_blocks.{i * per_up + per_up - 1}.{3 if attn[n_levels - 1 - i] else 1}.conv"
    return m


def unet_source(prefixes):
    def source(key):
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest module path first
            path = ".".join(parts[:cut])
            if path in prefixes:
                rest = parts[cut:]
                if ".resnets." in path:
                    rest = [RESNET.get(rest[0], rest[0])] + rest[1:]
                return ".".join([prefixes[path]] + rest), None
        raise AssertionError(f"no lvdm name for diffusers key {key}")  # a bug here, not in the checkpoint
    return source


def fps_vector(w, fps, channels):
    """lvdm: emb += fps_embedding(timestep_embedding(fps, model_channels)), in fp32: a constant (4c,)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    emb = torch.cat([torch.cos(fps * freqs), torch.sin(fps * freqs)])  # lvdm's order: [cos | sin]
    if channels % 2:
        emb = torch.cat([emb, emb.new_zeros(1)])
    w = {k: v.float() for k, v in w.items()}
    return F.linear(F.silu(F.linear(emb, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])


def convert_unet(sd, args):
    from diffusers import UNet3DConditionModel

    config, levels, down, attn = unet_config(sd, args.head_dim)
    c = config["block_out_channels"][0]
    fps_w = pull("fps embedding", {"0.weight": (4 * c, c), "0.bias": (4 * c,), "2.weight": (4 * c, 4 * c),
                                   "2.bias": (4 * c,)}, part(sd, "fps_embedding."), UNET + "fps_embedding.",
                 lambda k: (k, None))  # lvdm's Sequential(Linear(c, 4c), SiLU, Linear(4c, 4c))
    model, target = meta_shapes(UNet3DConditionModel, config)
    rest = {k: v for k, v in sd.items() if not k.startswith("fps_embedding.")}
    out = pull("unet", target, rest, UNET, unet_source(unet_prefixes(levels, down, attn)))
    bias = out["time_embedding.linear_2.bias"]
    out["time_embedding.linear_2.bias"] = (bias.float() + fps_vector(fps_w, args.fps, c)).to(bias.dtype)
    return model, out


# ----------------------------------------------------------------------------- VAE
def convert_vae(sd):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    if not n:
        raise UserError(f"{VAE}encoder.down.0.block.0.conv1.weight: missing from the checkpoint")
    widths = [shape(sd, f"encoder.down.{i}.block.0.conv1.weight", VAE)[0] for i in range(n)]
    for i, w in enumerate(widths):
        check_groups(w, f"{VAE}encoder.down.{i}.block.0.conv1.weight")
    config = dict(in_channels=shape(sd, "encoder.conv_in.weight", VAE)[1],
                  out_channels=shape(sd, "decoder.conv_out.weight", VAE)[0],
                  down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                  block_out_channels=widths, norm_num_groups=GROUPS, sample_size=512, scaling_factor=0.18215,
                  layers_per_block=len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")}),
                  latent_channels=shape(sd, "quant_conv.weight", VAE)[0] // 2)
    # diffusers' converter knows the SD VAE key map; run it on index-valued probes to learn which ldm
    # tensor feeds each diffusers tensor, then take the real tensors through the same checks as the UNet.
    keys = list(sd)
    probes = {VAE + k: torch.full((1,) * sd[k].ndim, float(i)) for i, k in enumerate(keys)}
    names = {dk: keys[int(t.reshape(-1)[0])] for dk, t in convert_ldm_vae_checkpoint(probes, config).items()}
    model, target = meta_shapes(AutoencoderKL, config)
    return model, pull("vae", target, sd, VAE, lambda k: (names.get(k, f"<no ldm key for {k}>"), None))


# ----------------------------------------------------------------------------- text encoder
def convert_text(sd, heads):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, width = shape(sd, "token_embedding.weight", TEXT)
    if vocab != 49408:
        raise UserError(f"{TEXT}token_embedding.weight: vocabulary {vocab}, but the OpenCLIP tokenizer has 49408")
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    if layers < 2:
        raise UserError(f"{TEXT}transformer.resblocks.1.ln_1.weight: missing (the penultimate layer needs 2 blocks)")
    if width % heads:
        raise UserError(f"--text-heads {heads} does not divide the text width {width} ({TEXT}token_embedding.weight)")
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers - 1,
        intermediate_size=shape(sd, "transformer.resblocks.0.mlp.c_fc.weight", TEXT)[0],
        max_position_embeddings=shape(sd, "positional_embedding", TEXT)[0], hidden_act="gelu",
        layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    dropped = [k for k in sd if k.startswith(("visual.", f"transformer.resblocks.{layers - 1}."))
               or k in ("text_projection", "logit_scale", "attn_mask")]  # parts VC2 never runs

    def source(key):
        if key in TEXT_TOP:
            return TEXT_TOP[key], None
        _, _, n, rest = key.split(".", 3)  # encoder.layers.N.rest
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            return f"transformer.resblocks.{n}.attn.in_proj_{qkv[2]}", "qkv".index(qkv[1])
        for new, old in TEXT_LAYER.items():
            rest = rest.replace(new, old)
        return f"transformer.resblocks.{n}.{rest}", None

    model, target = meta_shapes(CLIPTextModel, dict(config=config))
    kept = {k: v for k, v in sd.items() if k not in dropped}
    return model, pull("text_encoder", target, kept, TEXT, source), dropped


# ----------------------------------------------------------------------------- schedule buffers
def check_schedule(sd):
    """VC2 checkpoints carry lvdm's schedule buffers: check them against what the folder will say."""
    from diffusers import DDIMScheduler

    checks = {"alphas_cumprod": DDIMScheduler(**SCHEDULER).alphas_cumprod}
    if "scale_arr" in sd:
        checks["scale_arr"] = models.x0_scale(models.get_family("vc2"), torch.arange(1000))
    for key, ours in checks.items():
        if key in sd:
            theirs = sd[key].float()[:len(ours)]
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-5):
                raise UserError(f"{key}: the checkpoint's schedule differs from VideoCrafter2's "
                                f"(scaled-linear 0.00085..0.012, x0 scale 1.0 -> 0.7 over t = 0..400)")
    return [k for k in checks if k in sd]


# ----------------------------------------------------------------------------- writing
def save_model(folder, model, tensors, weights_name):
    from safetensors.torch import save_file

    os.makedirs(folder)
    if hasattr(model, "save_config"):
        model.save_config(folder)  # diffusers
    else:
        model.config.save_pretrained(folder)  # transformers
    save_file(tensors, os.path.join(folder, weights_name), metadata={"format": "pt"})


def main(args):
    from diffusers import DDIMScheduler

    out = args.out.rstrip("/\\") or args.out
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out}: already exists and is not an empty folder (refusing to overwrite)")
    if args.head_dim <= 0 or args.text_heads <= 0:
        raise UserError("--head-dim and --text-heads must be positive")
    sd = load_checkpoint(args.ckpt)
    unet_sd, vae_sd, text_sd = part(sd, UNET), part(sd, VAE), part(sd, TEXT)
    if not vae_sd or not text_sd:
        raise UserError(f"{args.ckpt}: no '{VAE if not vae_sd else TEXT}*' tensors in the checkpoint")
    unet, unet_t = convert_unet(unet_sd, args)
    vae, vae_t = convert_vae(vae_sd)
    text, text_t, dropped = convert_text(text_sd, args.text_heads)
    checked = check_schedule(sd)
    other = [k for k in sd if not k.startswith((UNET, VAE, TEXT))]

    tmp = f"{out}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp)
        save_model(os.path.join(tmp, "unet"), unet, unet_t, "diffusion_pytorch_model.safetensors")
        save_model(os.path.join(tmp, "vae"), vae, vae_t, "diffusion_pytorch_model.safetensors")
        save_model(os.path.join(tmp, "text_encoder"), text, text_t, "model.safetensors")
        context = text.config.max_position_embeddings
        models.build_clip_tokenizer(context).save_pretrained(os.path.join(tmp, "tokenizer"))
        DDIMScheduler(**SCHEDULER).save_pretrained(os.path.join(tmp, "scheduler"))
        models.write_pipeline_index(tmp)
        models.write_json(os.path.join(tmp, "conversion.json"), {
            "made_by": "tools/convert_vc2.py", "args": vars(args), "ckpt_bytes": os.path.getsize(args.ckpt),
            "fps_folded": args.fps, "unet_config": dict(unet.config),
            "text_layers_kept": text.config.num_hidden_layers,
            "keys": {"unet": len(unet_sd), "unet_fps_embedding_folded": 4, "unet_written": len(unet_t),
                     "vae": len(vae_sd), "vae_written": len(vae_t), "text": len(text_sd),
                     "text_written": len(text_t), "text_dropped": len(dropped), "other_ignored": len(other)},
            "schedule_buffers_checked": checked, "other_ignored_first": other[:20]})
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"unet: {len(unet_t)} tensors from {len(unet_sd)} keys, widths {list(unet.config.block_out_channels)}, fps "
          f"{args.fps} folded into time_embedding.linear_2.bias; vae: {len(vae_t)} tensors from {len(vae_sd)} keys")
    print(f"text_encoder: {len(text_t)} tensors, {text.config.num_hidden_layers} layers, {len(dropped)} keys dropped "
          f"(last block, projection, visual); {len(other)} other keys ignored (checked: {', '.join(checked) or '-'})")
    print(f"wrote {out}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="the official VideoCrafter2 model.ckpt")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--fps", type=int, default=28, help="fps conditioning folded into the time embedding")
    p.add_argument("--head-dim", type=int, default=64, help="UNet attention head size (lvdm num_head_channels)")
    p.add_argument("--text-heads", type=int, default=16, help="attention heads of the OpenCLIP text tower")
    return p


if __name__ == "__main__":
    models.cli(main, parser())
