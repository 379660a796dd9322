"""models.py: the student checkpoint format (round trip, identities, refusal), loading, files, sampling."""
import argparse
import copy
import os

import numpy as np
import pytest
import torch

import models
import tiny


def test_pruned_checkpoint_round_trips_and_removed_layers_are_identities(vc2_dir, tmp_path):
    teacher = models.load_teacher(models.get_family("vc2"), vc2_dir)
    fam = teacher.family
    removed = ["transformer_in", "down_blocks.0.temp_attentions.1", "down_blocks.0.temp_convs.0",
               "up_blocks.1.attentions.2", "mid_block.resnets.1"]
    unet = models.remove_layers(copy.deepcopy(teacher.unet), removed)
    with torch.no_grad():  # perturb the kept weights so the round trip cannot pass by reloading the teacher
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = str(tmp_path / "s.safetensors")
    models.save_student(path, fam, unet, teacher, 2, None, stage="test")
    student, meta = models.load_student(path, teacher)
    assert sorted(meta["removed"]) == sorted(removed) == sorted(models.removed_layers(student))
    assert meta["round"] == "2" and meta["teacher_fingerprint"] == teacher.fingerprint
    assert int(meta["prunable_params"]) == models.count_params(fam, unet) < models.count_params(fam, teacher.unet)
    x = torch.randn(5, 8, 4, 4, 4)
    for path_ in removed:  # an identity: what goes in comes out (a 1-tuple for transformers)
        layer = student.get_submodule(path_)
        out = layer(x, num_frames=4, return_dict=False)
        assert (out[0] if isinstance(out, tuple) else out) is x
    assert isinstance(student.get_submodule("transformer_in")(x)[0], torch.Tensor)
    xt, t = torch.randn(2, 4, 4, 8, 8), torch.tensor([3, 900])
    emb = models.encode_prompts(teacher, ["a", "b"])
    with torch.no_grad():
        assert torch.equal(models.predict_noise(fam, student, xt, t, emb), models.predict_noise(fam, unet, xt, t, emb))
        assert not torch.allclose(models.predict_noise(fam, student, xt, t, emb),
                                  models.predict_noise(fam, teacher.unet, xt, t, emb))


def test_foreign_checkpoint_is_refused_naming_both(vc2_dir, animatediff_dirs, tmp_path):
    fam = models.get_family("vc2")
    teacher = models.load_teacher(fam, vc2_dir)
    other = models.load_teacher(fam, tiny.make_vc2(str(tmp_path / "other"), seed=1))
    path = str(tmp_path / "s.safetensors")
    models.save_student(path, fam, copy.deepcopy(other.unet), other)
    with pytest.raises(models.UserError) as e:
        models.load_student(path, teacher)
    msg = str(e.value)
    assert other.fingerprint in msg and teacher.fingerprint in msg and str(tmp_path / "other") in msg
    ad = models.load_teacher(models.get_family("animatediff"), *animatediff_dirs)
    with pytest.raises(models.UserError, match="family vc2.*family animatediff"):
        models.load_student(path, ad)


def test_animatediff_student_holds_only_motion_modules(animatediff_dirs, tmp_path):
    fam = models.get_family("animatediff")
    teacher = models.load_teacher(fam, *animatediff_dirs)
    assert models.count_params(fam, teacher.unet) == sum(
        p.numel() for n, p in teacher.unet.named_parameters() if ".motion_modules." in n)
    unet = models.remove_layers(copy.deepcopy(teacher.unet), ["down_blocks.0.motion_modules.1", "mid_block.motion_modules.0"])
    path = str(tmp_path / "s.safetensors")
    models.save_student(path, fam, unet, teacher, 1)
    from safetensors.torch import load_file

    keys = set(load_file(path))
    assert keys and all(".motion_modules." in k for k in keys)
    assert not any(k.startswith("mid_block.motion_modules.0.") for k in keys)
    student, meta = models.load_student(path, teacher)
    x = torch.randn(1, 4, 4, 8, 8)
    emb = models.encode_prompts(teacher, ["a"])
    with torch.no_grad():
        assert torch.equal(models.predict_noise(fam, student, x, torch.tensor([5]), emb),
                           models.predict_noise(fam, unet, x, torch.tensor([5]), emb))


def test_teacher_folder_errors_name_the_folder(tmp_path):
    (tmp_path / "t" / "unet").mkdir(parents=True)
    with pytest.raises(models.UserError, match="missing 'vae/'"):
        models.load_teacher(models.get_family("vc2"), str(tmp_path / "t"))
    with pytest.raises(models.UserError, match="not found"):
        models.load_teacher(models.get_family("vc2"), str(tmp_path / "nope"))
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(models.UserError, match="x.safetensors: not a safetensors file"):
        models.read_student_meta(str(tmp_path / "x.safetensors"))
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(models.UserError, match="y.safetensors: not a student checkpoint"):
        models.read_student_meta(str(tmp_path / "y.safetensors"))


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 1, "x": {"y": 2}}\n\n[1, 2]\n')
    with pytest.raises(models.UserError, match=r"a.jsonl:3: expected a JSON object"):
        models.read_jsonl(str(p))
    p.write_text('{"id": 1, "x": {"y": 2}}\n{"id": 2, "x": {}}\n')
    with pytest.raises(models.UserError, match=r"a.jsonl:2: missing field 'x.y'"):
        models.read_jsonl(str(p), required=("id", "x.y"))
    p.write_text('{"id": 1,\n')
    with pytest.raises(models.UserError, match=r"a.jsonl:1: not valid JSON"):
        models.read_jsonl(str(p))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    models.write_json(str(target), {"a": 1})
    with pytest.raises(TypeError):
        models.write_json(str(target), {"a": object()})
    assert models.read_json(str(target)) == {"a": 1} and os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_removes_what_a_killed_writer_left(tmp_path):
    """A SIGKILLed writer leaves its temporary file; the next write into the folder removes it, but not a
    live process's nor another host's."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / os.path.basename(models.temporary_name(tmp_path / "a.safetensors")).replace(
        f".tmp{os.getpid()}-", f".tmp{dead.pid}-")
    live = tmp_path / os.path.basename(models.temporary_name(tmp_path / "b.json")).replace(
        f".tmp{os.getpid()}-", f".tmp{os.getppid()}-")
    other_host = tmp_path / f"c.tmp{dead.pid}-00000000.mp4"
    for p in (stale, live, other_host):
        p.write_text("partial")
    models.write_json(str(tmp_path / "d.json"), {"x": 1})
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, "d.json"])


def test_video_round_trip(tmp_path):
    frames = np.zeros((6, 16, 24, 3), np.uint8)
    for f in range(6):
        frames[f, 4:12, 2 + 2 * f:8 + 2 * f] = (255, 40, 40)
    models.write_video(str(tmp_path / "v.mp4"), frames, 8)
    back = models.read_video(str(tmp_path / "v.mp4"))
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames).mean() < 12
    # many at once, on threads: each file comes back in its own place
    paths = [str(tmp_path / f"m{k}.mp4") for k in range(5)]
    models.write_videos(paths, [np.roll(frames, 3 * k, axis=2) for k in range(5)], 8)
    backs = models.read_videos(paths)
    assert [np.abs(b.astype(int) - np.roll(frames, 3 * k, axis=2)).mean() < 12 for k, b in enumerate(backs)] == [True] * 5
    assert np.abs(backs[0].astype(int) - backs[1]).mean() > 1  # the videos differ, so the order is tested


def test_same_seed_same_initial_noise_and_cfg_batched(vc2_dir):
    teacher = models.load_teacher(models.get_family("vc2"), vc2_dir)
    cond = models.encode_prompts(teacher, ["a red square", "a blue circle"])
    uncond = models.encode_prompts(teacher, [""])
    s = {"steps": 3, "cfg": 5.0, "eta": 1.0, "x0_rescale": True, "frames": 4, "height": 16, "width": 16}
    a, va = models.generate(teacher, teacher.unet, cond, uncond, [7, 8], s)
    b, _ = models.generate(teacher, teacher.unet, cond[1:], uncond, [8], s)
    assert torch.allclose(a[1:], b, rtol=1e-4, atol=1e-4)  # one sample does not depend on its batch-mates
    assert va.shape == (2, 4, 16, 16, 3) and va.dtype == np.uint8
    c, _ = models.generate(teacher, teacher.unet, cond, uncond, [7, 9], s)
    assert torch.allclose(a[0], c[0], rtol=1e-4, atol=1e-4) and not torch.allclose(a[1], c[1])


def test_x0_scale_schedule():
    fam = models.get_family("vc2")
    s = models.x0_scale(fam, torch.tensor([0, 399, 400, 999]))
    assert torch.allclose(s, torch.tensor([1.0, 0.7, 0.7, 0.7]))
    assert torch.equal(models.x0_scale(fam, torch.tensor([500]), enabled=False), torch.ones(1))
    assert torch.equal(models.x0_scale(models.get_family("toy"), torch.tensor([500])), torch.ones(1))


def test_first_change_counts_a_setting_missing_from_an_old_record_as_its_default():
    p = argparse.ArgumentParser()
    p.add_argument("--a", type=int, default=1)
    p.add_argument("--b", default="x")
    assert models.first_change({"a": 1}, {"a": 1, "b": "x"}, p) is None  # "b" newer than the record: its default
    assert models.first_change({"a": 1}, {"a": 1, "b": "y"}, p) == ("b", "x", "y")
    assert models.first_change({"a": 2, "b": "y"}, {"a": 1, "b": "y"}, p) == ("a", 2, 1)  # the first that differs
    assert models.first_change({"a": 2}, {"a": 1, "b": "x"}, p, skip=("a",)) is None


def test_for_speed_options(vc2_dir):
    """channels-last puts every Conv2d weight in NHWC (the temporal Conv3d's stay as they are) and leaves the outputs
    as they were; compile-blocks marks each down, mid and up block compiled (compiling happens at the first call,
    not here); an unknown option is a UserError naming the choices."""
    unet = models.load_teacher(models.get_family("vc2"), vc2_dir).unet
    fast = models.for_speed(copy.deepcopy(unet), ["channels-last"])
    conv2d = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv2d and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in conv2d)
    assert all(m.weight.is_contiguous() for m in fast.modules() if isinstance(m, torch.nn.Conv3d))
    x, t, emb = torch.randn(1, 4, 2, 8, 8), torch.tensor([500]), torch.randn(1, 16, unet.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t, emb).sample, unet(x, t, emb).sample, rtol=1e-4, atol=1e-5)
    blocks = models.for_speed(copy.deepcopy(unet), ["compile-blocks"])
    assert all(b._compiled_call_impl is not None for b in [*blocks.down_blocks, blocks.mid_block, *blocks.up_blocks])
    assert unet.down_blocks[0]._compiled_call_impl is None  # the original is untouched
    with pytest.raises(models.UserError, match="warp-speed.*cudnn-benchmark"):
        models.for_speed(unet, ["warp-speed"])
