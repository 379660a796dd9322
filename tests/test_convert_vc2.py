"""tools/convert_vc2.py on a tiny checkpoint in VideoCrafter2's layout, and the vc2 DDIM step vs lvdm's equations.

The lvdm-layout checkpoint is built here from tiny diffusers / open_clip models by a key map written
independently of the converter's (diffusers -> lvdm, by pattern), so the round trip checks both.
"""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import models
from tiny import VC2_SCHEDULER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_vc2.py")
FPS, HEAD_DIM, TEXT_HEADS = 24, 8, 2
UNET_CFG = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
                cross_attention_dim=64, attention_head_dim=HEAD_DIM)
VAE_CFG = dict(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32, layers_per_block=1)
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def randomize(module, seed):
    """Random non-zero weights everywhere (diffusers zero-inits temporal convs' last layer and proj_out)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if re.search(r"norm|ln_", name) and p.ndim == 1 and "bias" not in name
                    else 0.15 * noise)
    return module.eval()


def sinusoid(t, dim):
    """lvdm's timestep_embedding (dim even): [cos(t f) | sin(t f)], f_k = 10000^(-k / (dim / 2))."""
    f = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    return torch.cat([torch.cos(t * f), torch.sin(t * f)])


# ----------------------------------------------------------------------------- diffusers -> lvdm, by pattern
def lvdm_unet_key(key, lpb, attn_up):
    """The lvdm name of a diffusers UNet3DConditionModel key (attn_up[i]: up level i has transformers)."""
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "transformer_in": "init_attn.0", "conv_norm_out": "out.0",
           "conv_out": "out.2"}
    for d, l in top.items():
        if key.startswith(d + "."):
            return l + key[len(d):]
    sub = {"resnets": "0", "temp_convs": "0.temopral_conv", "attentions": "1", "temp_attentions": "2"}
    m = re.fullmatch(r"mid_block\.(\w+)\.(\d)\.(.+)", key)
    if m:
        kind, j, rest = m.groups()
        block = {("resnets", "0"): 0, ("temp_convs", "0"): 0, ("resnets", "1"): 3, ("temp_convs", "1"): 3,
                 ("attentions", "0"): 1, ("temp_attentions", "0"): 2}[kind, j]
        inner = {"resnets": "", "temp_convs": ".temopral_conv"}.get(kind, "")
        if kind == "resnets":
            first, _, tail = rest.partition(".")
            rest = f"{RESNET[first]}.{tail}"
        return f"middle_block.{block}{inner}.{rest}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(\w+)\.(\d+)\.(.+)", key)
    side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if kind == "resnets":
        first, _, tail = rest.partition(".")
        rest = f"{RESNET[first]}.{tail}"
    if side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op.{rest.split('.', 1)[1]}"
        return f"input_blocks.{1 + i * (lpb + 1) + j}.{sub[kind]}.{rest}"
    if kind == "upsamplers":
        return f"output_blocks.{i * (lpb + 1) + lpb}.{3 if attn_up[i] else 1}.{rest}"
    return f"output_blocks.{i * (lpb + 1) + j}.{sub[kind]}.{rest}"


def lvdm_vae_key(key, n_levels):
    k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    up = lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.{'upsample' if m[2] else 'block'}."  # noqa: E731
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.(?:resnets|(upsamplers)\.0)\.", up, k)
    k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    for d, l in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        k = k.replace(f"mid_block.attentions.0.{d}.", f"mid.attn_1.{l}.")
    return k


def lvdm_schedule():
    """lvdm's DDPM buffers for VC2: betas in float64, then float32 (ddpm3d.register_schedule), scale_arr."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    scale_arr = torch.cat([torch.linspace(1.0, 0.7, 400, dtype=torch.float64),
                           torch.full((1000,), 0.7, dtype=torch.float64)])
    return acp, scale_arr  # scale_arr has 1400 entries: lvdm's fix_scale_bug=False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny diffusers/open_clip models, the lvdm-layout model.ckpt made from them, and its conversion."""
    import open_clip
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from diffusers.models.embeddings import TimestepEmbedding

    unet = randomize(UNet3DConditionModel(**UNET_CFG), 0)
    c = UNET_CFG["block_out_channels"][0]
    fps_emb = randomize(TimestepEmbedding(c, 4 * c), 1)
    vae = randomize(AutoencoderKL(**VAE_CFG), 2)
    clip = randomize(open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32,
                                                                  patch_size=8),
                                    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=TEXT_HEADS,
                                                  layers=3)), 3)
    attn_up = ["CrossAttn" in t for t in UNET_CFG["up_block_types"]]
    sd = {}
    for k, v in unet.state_dict().items():
        if k.startswith("transformer_in.proj_") and k.endswith("weight"):
            v = v[..., None]  # lvdm's init_attn projections are Conv1d k=1: (out, in, 1)
        sd["model.diffusion_model." + lvdm_unet_key(k, UNET_CFG["layers_per_block"], attn_up)] = v
    for k, v in fps_emb.state_dict().items():
        k = k.replace("linear_1", "fps_embedding.0").replace("linear_2", "fps_embedding.2")
        sd["model.diffusion_model." + k] = v
    for k, v in vae.state_dict().items():
        if re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight", k):
            v = v[..., None, None]  # the SD VAE's attention projections are 1x1 Conv2d
        sd["first_stage_model." + lvdm_vae_key(k, len(VAE_CFG["block_out_channels"]))] = v
    for k, v in clip.state_dict().items():
        sd["cond_stage_model.model." + k] = v
    acp, scale_arr = lvdm_schedule()
    sd.update(alphas_cumprod=acp.float(), scale_arr=scale_arr.float(), betas=torch.zeros(1000))
    assert "model.diffusion_model.output_blocks.5.3.conv.weight" in sd  # upsampler after the transformers
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd  # upsampler of a level without them
    d = tmp_path_factory.mktemp("vc2ckpt")
    ckpt = str(d / "model.ckpt")
    torch.save({"state_dict": {k: v.clone() for k, v in sd.items()}}, ckpt)
    out = str(d / "converted")
    r = run_tool("--ckpt", ckpt, "--out", out, "--fps", str(FPS), "--head-dim", str(HEAD_DIM),
                 "--text-heads", str(TEXT_HEADS))
    assert r.returncode == 0, r.stderr
    return dict(unet=unet, fps_emb=fps_emb, vae=vae, clip=clip, sd=sd, ckpt=ckpt, out=out, dir=d, stdout=r.stdout)


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


# ----------------------------------------------------------------------------- conversion
def test_unet_round_trip_with_fps_folded(tiny):
    teacher = models.load_teacher(models.get_family("vc2"), tiny["out"])
    unet, c = tiny["unet"], UNET_CFG["block_out_channels"][0]
    assert tuple(teacher.unet.config.block_out_channels) == UNET_CFG["block_out_channels"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)  # (B, C, F, h, w)
    t = torch.tensor([7, 640])
    emb = torch.randn(2, 5, UNET_CFG["cross_attention_dim"], generator=g)
    with torch.no_grad():
        fps_vec = tiny["fps_emb"](sinusoid(float(FPS), c)[None])[0]  # lvdm: emb += fps_embedding(...)
        hook = unet.time_embedding.register_forward_hook(lambda m, i, o: o + fps_vec)
        try:
            want = unet(x, t, encoder_hidden_states=emb).sample
        finally:
            hook.remove()
        plain = unet(x, t, encoder_hidden_states=emb).sample
        got = teacher.unet(x, t, encoder_hidden_states=emb).sample
    assert want.abs().mean() > 0.1 and (want - plain).abs().max() > 1e-2 * want.abs().max()  # fps matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_text_encoder_is_openclip_penultimate(tiny):
    import open_clip

    teacher = models.load_teacher(models.get_family("vc2"), tiny["out"])
    clip, prompts = tiny["clip"], ["a red square moving left", "", "two yellow circles, fast, at 3.5 px/frame"]
    tokens = open_clip.tokenize(prompts)  # (N, 77), padded with 0
    assert torch.equal(models.tokenize(teacher.family, teacher.tokenizer, prompts), tokens)
    with torch.no_grad():
        h = clip.token_embedding(tokens) + clip.positional_embedding  # (N, L, D), batch-first
        for block in clip.transformer.resblocks[:-1]:  # VC2's "penultimate": all blocks but the last
            h = block(h, attn_mask=clip.attn_mask)
        want = clip.ln_final(h)
        got = teacher.text_encoder(tokens).last_hidden_state
    assert teacher.text_encoder.config.num_hidden_layers == 2 and teacher.text_encoder.config.hidden_act == "gelu"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(models.encode_prompts(teacher, prompts), want, rtol=1e-5, atol=1e-5)


def test_vc2_token_ids_equal_open_clip_including_padding_and_exclamation_marks():
    import open_clip

    prompts = ["a cat jumps!", "wow!! a dog", "two yellow circles, fast!"]
    ids = models.tokenize(models.get_family("vc2"), models.build_clip_tokenizer(77), prompts)
    assert torch.equal(ids, open_clip.tokenize(prompts))


def test_vae_round_trip_and_folder(tiny):
    import json

    teacher = models.load_teacher(models.get_family("vc2"), tiny["out"])
    assert teacher.vae.config.scaling_factor == 0.18215
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    img = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(teacher.vae.decode(z).sample, tiny["vae"].decode(z).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(teacher.vae.encode(img).latent_dist.mean, tiny["vae"].encode(img).latent_dist.mean,
                                   rtol=1e-5, atol=1e-5)
    out = tiny["out"]
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "TextToVideoSDPipeline" and index["unet"] == ["diffusers", "UNet3DConditionModel"]
    conv = json.load(open(os.path.join(out, "conversion.json")))
    n_unet = sum(k.startswith("model.diffusion_model.") for k in tiny["sd"])
    assert conv["args"]["fps"] == FPS and conv["keys"]["unet"] == n_unet
    assert conv["keys"]["unet_written"] == n_unet - 4 == len(tiny["unet"].state_dict())
    assert conv["schedule_buffers_checked"] == ["alphas_cumprod", "scale_arr"]
    s = teacher.scheduler.config
    assert {k: s[k] for k in VC2_SCHEDULER} == VC2_SCHEDULER
    assert teacher.family.pad_id == 0 and teacher.tokenizer.model_max_length == 77
    assert not [p for p in os.listdir(tiny["dir"]) if ".tmp" in p]
    assert "fps 24 folded" in tiny["stdout"] and "checked: alphas_cumprod, scale_arr" in tiny["stdout"]


def converter():
    """The tool as a module, to run its main() in-process (a subprocess costs ~10 s of imports)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_vc2", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def convert_in_process(*argv):
    tool = converter()
    return tool.main(tool.parser().parse_args(list(argv)))


@pytest.mark.parametrize("case", ["missing", "shape", "unused", "schedule"])
def test_bad_checkpoint_is_refused(tiny, tmp_path, case):
    sd = dict(tiny["sd"])
    key = {"shape": "model.diffusion_model.output_blocks.4.1.proj_in.weight",
           "missing": "model.diffusion_model.input_blocks.4.0.temopral_conv.conv2.3.weight",
           "unused": "model.diffusion_model.input_blocks.2.3.proj_in.weight",
           "schedule": "alphas_cumprod"}[case]
    if case == "shape":
        sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    elif case == "missing":
        del sd[key]
    elif case == "unused":
        sd[key] = torch.zeros(3, 3)
    else:
        sd[key] = sd[key] * 0.99
    ckpt, out = str(tmp_path / "bad.ckpt"), str(tmp_path / "out")
    torch.save(sd, ckpt)  # no "state_dict" level this time: both forms load
    flags = ["--ckpt", ckpt, "--out", out, "--fps", str(FPS), "--head-dim", str(HEAD_DIM),
             "--text-heads", str(TEXT_HEADS)]
    if case == "missing":  # the command line: exit 2, one line, no traceback
        r = run_tool(*flags)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    else:
        with pytest.raises(models.UserError, match=re.escape(key)):
            convert_in_process(*flags)
    assert sorted(os.listdir(tmp_path)) == ["bad.ckpt"]  # nothing written, no temporary folder left


def test_wrong_flags_and_existing_output_are_refused(tiny, tmp_path):
    ckpt, out = tiny["ckpt"], str(tmp_path / "o")
    with pytest.raises(models.UserError, match=r"width 32 is not a multiple of --head-dim 64"):  # the default
        convert_in_process("--ckpt", ckpt, "--out", out, "--text-heads", str(TEXT_HEADS))
    with pytest.raises(models.UserError, match=r"init_attn\.0\.proj_in\.weight.*--head-dim"):  # 8 x 16 != 8 x 8
        convert_in_process("--ckpt", ckpt, "--out", out, "--head-dim", "16", "--text-heads", str(TEXT_HEADS))
    with pytest.raises(models.UserError, match="--text-heads 5"):
        convert_in_process("--ckpt", ckpt, "--out", out, "--head-dim", str(HEAD_DIM), "--text-heads", "5")
    with pytest.raises(models.UserError, match="refusing to overwrite"):
        convert_in_process("--ckpt", ckpt, "--out", tiny["out"])
    with pytest.raises(models.UserError, match="no such checkpoint"):
        convert_in_process("--ckpt", str(tmp_path / "nope.ckpt"), "--out", out)
    assert sorted(os.listdir(tmp_path)) == []


def test_help():
    r = run_tool("--help")
    assert r.returncode == 0 and "--ckpt" in r.stdout and "--head-dim" in r.stdout


# ----------------------------------------------------------------------------- DDIM step vs lvdm
def lvdm_ddim_step(x, e, index, steps, eta, noise):
    """VideoCrafter2's DDIMSampler.p_sample_ddim with use_scale, from its equations (index 0 = last step)."""
    acp, scale_arr = lvdm_schedule()
    acp = acp.float().double()  # lvdm keeps alphas_cumprod as a float32 buffer
    ts = torch.arange(0, 1000, 1000 // steps) + 1  # make_ddim_timesteps('uniform') + 1
    a_t, s_t = acp[ts[index]], scale_arr[ts[index]]
    a_prev = acp[0] if index == 0 else acp[ts[index - 1]]
    s_prev = scale_arr[0] if index == 0 else scale_arr[ts[index - 1]]
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
    pred_x0 = pred_x0 / s_t
    return a_prev.sqrt() * s_prev * pred_x0 + (1 - a_prev - sigma ** 2).sqrt() * e + sigma * noise, int(ts[index])


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("index", [10, 0])  # t = 201 (inside the x0-scale ramp) and t = 1 (the last step)
def test_ddim_step_matches_lvdm(eta, index):
    from diffusers import DDIMScheduler

    fam, steps = models.get_family("vc2"), 50
    sched = DDIMScheduler(**VC2_SCHEDULER)
    sched.set_timesteps(steps)
    ts = sched.timesteps.tolist()
    assert ts == list(range(981, 0, -20))  # lvdm's DDIM timesteps, reversed
    g = torch.Generator().manual_seed(index)
    x, e, noise = (torch.randn(2, 4, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    want, t = lvdm_ddim_step(x, e, index, steps, eta, noise)
    i = ts.index(t)
    prev_t = ts[i + 1] if i + 1 < len(ts) else -1  # as models.sample passes it
    got = models.ddim_step(fam, sched, x.float(), e.float(), t, prev_t, eta=eta, noise=noise.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [501, 1])
def test_ddim_step_without_rescaling_is_diffusers_ddim(t):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**VC2_SCHEDULER)
    sched.set_timesteps(50)
    x, e = torch.randn(2, 2, 4, 3, 3, 3, generator=torch.Generator().manual_seed(t)).unbind(0)
    want = sched.step(e, t, x, eta=0.0).prev_sample
    got = models.ddim_step(models.get_family("vc2"), sched, x, e, t, t - 20 if t > 20 else -1, x0_rescale=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
