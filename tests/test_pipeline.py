"""Using the result: the shipped toy teacher and the converted vc2 folder are diffusers pipeline folders, and
models.load_pipeline puts a pruned student inside TextToVideoSDPipeline / AnimateDiffPipeline; with x0 rescaling
off, eta 0 and our text embeddings its videos equal our own sampler's."""
import os

import numpy as np
import pytest
import torch

import models
from conftest import PROMPTS, ROOT
from test_convert_vc2 import tiny  # noqa: F401  (fixture: a tiny VideoCrafter2 checkpoint, converted)

pytestmark = pytest.mark.filterwarnings("ignore:.*`torch_dtype` is deprecated:FutureWarning")


def ours(teacher, unet, prompts, seeds, steps, frames, size, cfg, x0_rescale=True):
    """uint8 videos (N, F, H, W, 3) from the family's own sampler (models.sample + models.decode)."""
    cond, uncond = models.encode_prompts(teacher, prompts), models.encode_prompts(teacher, [""])
    shape = models.latent_shape(teacher, frames, size, size)
    lat = models.sample(teacher.family, unet, teacher.scheduler, cond, uncond, seeds, shape, steps, cfg, eta=0.0,
                        x0_rescale=x0_rescale)
    return models.decode(teacher.vae, lat)


def as_uint8(frames):
    """The pipeline's float frames in [0, 1] (N, F, H, W, 3) -> uint8 the way models.decode rounds."""
    return np.round(np.asarray(frames) * 255).astype(np.uint8)


def max_diff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_toy_teacher_is_a_pipeline_folder():
    from diffusers import TextToVideoSDPipeline

    path = os.path.join(ROOT, "toy", "teacher")
    # the toy teacher is stored in fp16; transformers 5 would load the text encoder in fp16, the UNet in fp32
    pipe = TextToVideoSDPipeline.from_pretrained(path, torch_dtype=torch.float32)
    fam = models.get_family("toy")
    seeds = [3, 4]
    frames = pipe(PROMPTS[:2], num_frames=fam.frames, height=fam.height, width=fam.width, num_inference_steps=2,
                  guidance_scale=fam.cfg, generator=[torch.Generator().manual_seed(s) for s in seeds],
                  output_type="np").frames
    assert frames.shape == (2, fam.frames, fam.height, fam.width, 3) and 0 <= frames.min() <= frames.max() <= 1
    # the toy tokenizes alike and samples at eta 0 without rescaling: the pipeline is our sampler
    teacher = models.load_teacher(fam, path)
    expected = ours(teacher, teacher.unet, PROMPTS[:2], seeds, 2, fam.frames, fam.height, fam.cfg)
    assert max_diff(as_uint8(frames), expected) <= 1 and expected.std() > 5  # a real video, not a flat one


def test_converted_vc2_folder_is_a_pipeline_folder(tiny):  # noqa: F811
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(tiny["out"])
    frames = pipe(PROMPTS[0], num_frames=4, height=16, width=16, num_inference_steps=2, output_type="np").frames
    assert frames.shape == (1, 4, 16, 16, 3)


def test_load_pipeline_with_a_pruned_vc2_student(vc2_dir, pruned):
    pipe = models.load_pipeline(vc2_dir, pruned, "vc2")
    removed = models.read_student_meta(pruned)["removed"]
    assert removed and sorted(models.removed_layers(pipe.unet)) == sorted(removed)
    assert pipe.family.name == "vc2" and type(pipe).__name__ == "TextToVideoSDPipeline"

    fam, seeds, cfg = pipe.family, [5, 6], 7.0
    call = lambda **kw: as_uint8(pipe(num_frames=4, height=16, width=16, num_inference_steps=2, guidance_scale=cfg,
                                      eta=0.0, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                      output_type="np", **kw).frames)
    embedded = call(prompt_embeds=models.encode_prompts(pipe, PROMPTS[:2]),
                    negative_prompt_embeds=models.encode_prompts(pipe, [""] * 2))
    assert embedded.shape == (2, 4, 16, 16, 3)
    teacher = models.load_teacher(fam, vc2_dir)
    student, _ = models.load_model(teacher, pruned)
    plain = ours(teacher, student, PROMPTS[:2], seeds, 2, 4, 16, cfg, x0_rescale=False)
    assert max_diff(embedded, plain) <= 1 and plain.std() > 5  # no rescaling + our embeddings: our sampler
    rescaled = ours(teacher, student, PROMPTS[:2], seeds, 2, 4, 16, cfg)  # the vc2 default: x0 rescaling on
    assert max_diff(embedded, rescaled) > 1
    assert max_diff(call(prompt=PROMPTS[:2]), embedded) > 1  # the pipeline's own tokenizer pads differently


def test_load_pipeline_animatediff(animatediff_dirs, tmp_path):
    sd, adapter = animatediff_dirs
    fam = models.get_family("animatediff")
    teacher = models.load_teacher(fam, sd, adapter)
    student = models.remove_layers(teacher.unet, ["down_blocks.0.motion_modules.1", "up_blocks.1.motion_modules.0"])
    path = str(tmp_path / "student.safetensors")
    models.save_student(path, fam, student, teacher)

    pipe = models.load_pipeline(sd, path, "animatediff", motion_adapter=adapter)
    assert type(pipe).__name__ == "AnimateDiffPipeline" and pipe.motion_adapter is None
    assert sorted(models.removed_layers(pipe.unet)) == ["down_blocks.0.motion_modules.1",
                                                       "up_blocks.1.motion_modules.0"]
    assert pipe.scheduler.config.beta_schedule == "linear"  # AnimateDiff's DDIM, as the family samples
    frames = pipe(PROMPTS[0], num_frames=4, height=16, width=16, num_inference_steps=2, guidance_scale=fam.cfg,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, 4, 16, 16, 3) and np.isfinite(frames).all()
