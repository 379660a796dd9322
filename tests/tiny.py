"""Tiny random models in the real layouts, saved with save_pretrained and loaded like real weights."""
import json
import os

import torch

import models

TINY_TEXT = dict(hidden_size=8, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 vocab_size=49408, bos_token_id=49406, eos_token_id=49407, max_position_embeddings=77)
TINY_VAE = dict(block_out_channels=(8, 8), down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2)
TINY_UNET3D = dict(block_out_channels=(8, 16), norm_num_groups=4,
                   down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                   up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                   cross_attention_dim=8, attention_head_dim=2, layers_per_block=2, sample_size=8)
VC2_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                     timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)


def _common(path, seed, max_length):
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    AutoencoderKL(**TINY_VAE).save_pretrained(os.path.join(path, "vae"))
    CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).save_pretrained(os.path.join(path, "text_encoder"))
    models.build_clip_tokenizer(max_length).save_pretrained(os.path.join(path, "tokenizer"))
    DDIMScheduler(**VC2_SCHEDULER).save_pretrained(os.path.join(path, "scheduler"))


def make_vc2(path, seed=0, max_length=16, **unet_config):
    """A VC2-layout teacher folder (the layout TextToVideoSDPipeline saves) with a tiny random UNet
    (TINY_UNET3D, entries overridden by `unet_config`).
    The UNet's last conv is re-initialised so the random model's outputs are not all zero."""
    from diffusers import UNet3DConditionModel

    _common(path, seed, max_length)
    unet = UNet3DConditionModel(**{**TINY_UNET3D, **unet_config})
    for name, p in unet.named_parameters():  # diffusers zero-inits temporal convs' last layer and proj_out
        if p.abs().sum() == 0 and p.ndim > 1:
            torch.nn.init.normal_(p, std=0.1)
    unet.save_pretrained(os.path.join(path, "unet"))
    return path


def make_animatediff(path, adapter_path, seed=0, max_length=16):
    """An SD-1.5-layout folder plus a MotionAdapter folder, both tiny and random."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    _common(path, seed, max_length)
    UNet2DConditionModel(block_out_channels=(8, 8), layers_per_block=2, sample_size=8, cross_attention_dim=8,
                         norm_num_groups=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).save_pretrained(os.path.join(path, "unet"))
    adapter = MotionAdapter(block_out_channels=(8, 8), motion_layers_per_block=2, motion_norm_num_groups=2,
                            motion_num_attention_heads=4)
    for name, p in adapter.named_parameters():
        if p.abs().sum() == 0 and p.ndim > 1:
            torch.nn.init.normal_(p, std=0.1)
    adapter.save_pretrained(adapter_path)
    return path, adapter_path


TINY_CLIP = dict(embed_dim=32,
                 vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=3))


def make_tiny_clip(path, seed=0):
    """A random tiny open_clip model saved as open_clip's 'local-dir:' layout: config + safetensors."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    os.makedirs(path)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(path, "open_clip_model.safetensors"))
    return path
