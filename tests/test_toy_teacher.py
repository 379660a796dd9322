"""toy/train_teacher.py end to end with tiny settings, and the shipped toy teacher if it exists."""
import json
import os

import numpy as np
import pytest
import torch

import models
from toy import train_teacher as tt
from toy import world

SHIPPED = models.get_family("toy").default_teacher
JUDGE_FLOOR = 0.45  # judge average of the shipped teacher on one 10-step clip: 0.77 measured (0.50-0.93 over 18)


def folder_mb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20


def run(argv):
    """train_teacher's main on one thread (fastest on a busy CPU); the other tests get theirs back."""
    threads = torch.get_num_threads()
    try:
        return tt.main(tt.build_parser().parse_args(argv + ["--threads", "1"]))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy") / "teacher")
    run(["--out", out, "--steps", "3", "--minutes", "5", "--vae-steps", "2", "--clips", "8", "--batch", "2",
         "--lr", "1e-3", "--log-every", "1", "--seed", "1", "--device", "cpu"])
    return out


def test_help_names_every_flag():
    text = tt.build_parser().format_help()
    for flag in ("--out", "--minutes", "--steps", "--seed", "--threads", "--eval", "--eval-seeds", "--eval-steps",
                 "--init-from"):
        assert flag in text


def test_tiny_training_saves_a_loadable_fp16_teacher(tiny_teacher):
    family = models.get_family("toy")
    t = models.load_teacher(family, tiny_teacher)
    assert {k: t.unet.config[k] for k in tt.UNET_CONFIG} == {k: (list(v) if isinstance(v, tuple) else v)
                                                             for k, v in tt.UNET_CONFIG.items()}
    assert t.vae.config.scaling_factor != 1.0  # set from the latents' std
    assert t.tokenizer.model_max_length == 16
    assert 15 < folder_mb(tiny_teacher) <= 25  # fp16 storage (fp32 would be ~30 MB)
    info = models.read_json(os.path.join(tiny_teacher, "training.json"))
    assert info["steps"] == 3 and info["finished"] and info["vae_steps"] == 2 and np.isfinite(info["final_loss"])
    assert not os.path.isabs(info["args"]["out"])
    index = models.read_json(os.path.join(tiny_teacher, "model_index.json"))  # a pipeline folder, as shipped
    assert index == models.read_json(os.path.join(SHIPPED, "model_index.json")) | {"_diffusers_version": index[
        "_diffusers_version"]}
    # the optimizer stepped: diffusers zero-initialises these layers, training moved them
    fresh = dict(type(t.unet)(**tt.UNET_CONFIG).named_parameters())
    zero = [n for n, p in fresh.items() if p.abs().sum() == 0 and p.ndim > 1]
    assert zero and all(dict(t.unet.named_parameters())[n].abs().sum() > 0 for n in zero)
    # every prompt word is one token of the saved tokenizer
    for p in world.all_prompts():
        assert len(t.tokenizer(p).input_ids) == len(p.split()) + 2, p
    # the text encoder used in training is the one stored: its weights are exact fp16 values
    for p in t.text_encoder.parameters():
        assert torch.equal(p, p.half().float())


def test_init_from_continues_a_teacher(tiny_teacher, tmp_path, monkeypatch):
    family = models.get_family("toy")
    out = str(tmp_path / "more")
    argv = ["--init-from", tiny_teacher, "--out", out, "--steps", "2", "--clips", "4", "--batch", "2", "--lr", "1e-3",
            "--seed", "2", "--device", "cpu"]
    monkeypatch.setattr("sys.argv", ["toy/train_teacher.py", *argv])  # as if run from the command line
    run(argv)
    a, b = models.load_teacher(family, tiny_teacher), models.load_teacher(family, out)
    for part in ("vae", "text_encoder"):  # kept as they were (no VAE phase, the same frozen text encoder)
        assert all(torch.equal(p, q) for p, q in zip(getattr(a, part).parameters(), getattr(b, part).parameters()))
    assert b.vae.config.scaling_factor == a.vae.config.scaling_factor
    moved = [n for (n, p), q in zip(a.unet.named_parameters(), b.unet.parameters()) if not torch.equal(p, q)]
    assert moved  # the UNet (its EMA) went on training from the start
    info = models.read_json(os.path.join(out, "training.json"))
    assert info["init_from"]["fingerprint"] == a.fingerprint and info["init_from"]["steps"] == 3
    assert info["command"].endswith(f"--init-from teacher --out more {' '.join(argv[4:])}")  # no machine path
    assert info["vae_steps"] == 0 and info["steps"] == 2
    with pytest.raises(models.UserError, match="is --out"):
        run(["--init-from", out, "--out", out, "--steps", "1"])


def test_eval_mode_writes_both_rows(tiny_teacher, capsys):
    rows = run(["--out", tiny_teacher, "--eval", "--eval-seeds", "1", "--eval-steps", "2"])
    assert set(rows) == {"teacher", "untrained"}
    for r in rows.values():
        assert set(r) == set(models.DIMS) | {"color", "shape", "direction", "speed"}
        assert all(0 <= v <= 1 for v in r.values())
    saved = json.load(open(os.path.join(tiny_teacher, "eval.json")))
    assert saved["results"] == rows and saved["seeds_per_prompt"] == 1
    assert "| teacher |" in capsys.readouterr().out


def test_eval_of_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(models.UserError):
        tt.main(tt.build_parser().parse_args(["--out", str(tmp_path / "none"), "--eval"]))


def test_stage_files_stay_small():
    for f in ("train_teacher.py", "world.py"):
        assert sum(1 for _ in open(os.path.join(os.path.dirname(tt.__file__), f))) <= 500, f


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHIPPED, "unet")), reason="no shipped toy teacher")
def test_shipped_teacher_samples_a_judged_clip():
    family = models.get_family("toy")
    t = models.load_teacher(family, SHIPPED)
    assert folder_mb(SHIPPED) <= 25
    prompt = world.eval_prompts()[0]
    shape = models.latent_shape(t, family.frames, family.height, family.width)
    lat = models.sample(family, t.unet, t.scheduler, models.encode_prompts(t, [prompt]),
                        models.encode_prompts(t, [""]), [0], shape, 10, family.cfg)
    video = models.decode(t.vae, lat)
    assert video.shape == (1, 8, 32, 32, 3)
    score = world.judge(video, [prompt])[0]
    assert np.mean(list(score.values())) > JUDGE_FLOOR, score
